"""fp8 helpers: saturating casts, per-channel weight scales, per-token activation scales.

Convention (the one scaled-fp8 checkpoints use): the real weight is ``weight.float() *
scale_weight``, with ``scale_weight`` fp32, one value per output channel ([N]) or one per
tensor ([] / [1]).
"""

from __future__ import annotations

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
ACT_DTYPE = torch.float8_e4m3fn  # activations of the _fast modes are e4m3 whatever the weight
_TINY = 1e-12  # floor of a scale: an all-zero row quantizes to zeros, never to NaN


def fp8_max(dtype: torch.dtype) -> float:
    """The largest finite value of fp8 ``dtype`` (448 for e4m3fn, 57344 for e5m2)."""
    return float(torch.finfo(dtype).max)


def saturating_cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast to fp8, clamping to its finite range first (a bare ``.to()`` makes NaN / inf)."""
    m = fp8_max(dtype)
    return t.clamp(-m, m).to(dtype)  # clamp returns a new tensor: the input is untouched


def channel_scales(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N, K] -> [N] fp32 scales so each row's |w| max maps to the fp8 max (1.0 for zero rows)."""
    amax = w.abs().amax(dim=1).float()
    return torch.where(amax > 0, amax / fp8_max(dtype), torch.ones_like(amax))


def quantize_fp8(w: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Real weight [N, K] (any float dtype) -> fp8 [N, K], dividing by ``scale`` ([N] or [])."""
    if scale is None:
        return saturating_cast(w, dtype)
    s = scale.float().reshape(-1, 1) if scale.numel() > 1 else scale.float().reshape(())
    return saturating_cast(w.float() / s, dtype)


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """fp8 [N, K] (+ scale [N] / []) -> [N, K] in ``dtype`` (the upcast of the dequantize path)."""
    w = weight.to(dtype)  # exact: fp8 values fit every compute dtype
    if scale is None:
        return w
    s = scale.to(dtype)
    return w * (s.view(-1, 1) if s.numel() > 1 else s.reshape(()))


def quantize_rows_eager(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token e4m3 quantization: x [M, K] -> (q e4m3 [M, K], scale fp32 [M, 1]); x unchanged.

    The eager reference of the fused kernel in ``kernels.py`` (same rounding: x / scale, RNE;
    on CUDA torch divides by the scalar 448 through its rounded reciprocal: see ``kernels.py``).
    """
    xf = x2d.float()
    amax = xf.abs().amax(dim=1, keepdim=True)  # (M, 1)
    scale = (amax / fp8_max(ACT_DTYPE)).clamp(min=_TINY)
    return saturating_cast(xf / scale, ACT_DTYPE), scale
