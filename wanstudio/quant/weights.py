"""Tensor-level quantization: one weight in, the tensors a quantized Linear stores out.

The checkpoint loader calls :func:`quantize_weight` tensor by tensor while it streams a file,
so a bf16 / fp32 checkpoint is never held twice. Stored names (state-dict keys of a
``QuantizedLinear``, relative to the layer):

=================  =========================  =====================================================
mode(s)            key                        tensor
=================  =========================  =====================================================
fp8 plain/_fast    ``weight``                 fp8 [N, K] (e4m3fn or e5m2), row-major
fp8 ``_scaled*``   ``weight``                 fp8 [N, K]
                   ``scale_weight``           fp32 [N] per output channel, or [] / [1] per tensor
                                              (real weight = weight * scale_weight)
fp4_experimental   ``weight_packed``          uint8 [N, K_pad / 2], two e2m1 codes per byte,
  (MXFP4)                                     element 2j in the low nibble
                   ``weight_scale``           e8m0 [N, K_pad / 32] (biased exponent bytes)
fp4_scaled(_fast)  ``weight_packed``          uint8 [N, K_pad / 2], as above
  (NVFP4)          ``weight_scale``           float8_e4m3fn [N, K_pad / 16]
                   ``weight_scale_2``         fp32 [] (per tensor)
=================  =========================  =====================================================

A checkpoint's own per-tensor scale (``scale_weight`` in ComfyUI-style scaled-fp8 files,
``weight_scale`` in others) is passed as ``scale=`` and honoured as stored.
"""

from __future__ import annotations

import torch

from ..errors import CheckpointError
from ..options import QuantMode
from . import fp4, fp8
from .spec import FP8, MXFP4, NVFP4, spec_for


def storage_mode_for(dtype: torch.dtype, scaled: bool) -> QuantMode:
    """The storage mode that runs an fp8 checkpoint as stored (what ``disabled`` picks)."""
    table = {
        (torch.float8_e4m3fn, False): QuantMode.FP8_E4M3FN,
        (torch.float8_e4m3fn, True): QuantMode.FP8_E4M3FN_SCALED,
        (torch.float8_e5m2, False): QuantMode.FP8_E5M2,
        (torch.float8_e5m2, True): QuantMode.FP8_E5M2_SCALED,
    }
    try:
        return table[(dtype, bool(scaled))]
    except KeyError:
        raise CheckpointError(f"{dtype} is not an fp8 storage dtype wanstudio runs") from None


def _checked_scale(scale: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if scale is None:
        return None
    if scale.numel() not in (1, n):
        raise CheckpointError(
            f"a weight scale must hold 1 value (per tensor) or {n} (per output channel); "
            f"got shape {tuple(scale.shape)}"
        )
    return scale.detach().float()


def _real_weight(weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The weight a checkpoint means: stored * scale (fp32) or the weight itself."""
    if scale is None:
        return weight.float() if weight.dtype in fp8.FP8_DTYPES else weight
    s = scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(())
    return weight.float() * s


def quantize_weight(
    weight: torch.Tensor, mode: QuantMode | str, *, scale: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Quantize one Linear weight [N, K] for ``mode``; returns the tensors to store, by name.

    ``weight`` may be high precision (bf16 / fp16 / fp32) or fp8 as stored in a checkpoint;
    ``scale`` is a checkpoint's stored scale for it (real weight = weight * scale). An fp8
    weight of the mode's own fp8 dtype is kept exactly as stored, with its scale. A mode that
    contradicts the stored format (e5m2 weights in an e4m3 mode, a scaled file in a plain
    mode) raises :class:`CheckpointError` naming the mode that fits. ``disabled`` returns the
    weight untouched (fp8 weights need their storage mode: see :func:`storage_mode_for`).
    The input tensors are never modified.
    """
    spec = spec_for(mode)
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"quantize_weight takes a float [N, K] weight, got {weight.dtype} {tuple(weight.shape)}"
        )
    n = weight.shape[0]
    scale = _checked_scale(scale, n)
    stored_fp8 = weight.dtype in fp8.FP8_DTYPES
    weight = weight.detach()

    if spec.storage is None:
        if stored_fp8:
            fits = storage_mode_for(weight.dtype, scale is not None).value
            raise CheckpointError(
                f"an {weight.dtype} weight cannot run unquantized; its storage mode is {fits!r}"
            )
        return {"weight": weight}

    if spec.storage == FP8:
        if stored_fp8:
            if weight.dtype != spec.fp8_dtype:
                fits = storage_mode_for(weight.dtype, spec.per_channel_scale).value
                raise CheckpointError(
                    f"the checkpoint stores {weight.dtype} weights but {spec.mode.value!r} stores "
                    f"{spec.fp8_dtype}; use {fits!r} (or a bf16 checkpoint to re-quantize)"
                )
            if not spec.per_channel_scale:
                if scale is not None and not bool((scale == 1).all()):
                    fits = storage_mode_for(weight.dtype, True).value
                    raise CheckpointError(
                        f"the checkpoint stores scaled fp8 weights (a scale_weight / weight_scale "
                        f"per tensor) that {spec.mode.value!r} cannot hold; use {fits!r}"
                    )
                return {"weight": weight}
            stored = scale if scale is not None else torch.ones((), device=weight.device)
            return {"weight": weight, "scale_weight": stored}
        real = _real_weight(weight, scale)
        if spec.per_channel_scale:
            s = fp8.channel_scales(real, spec.fp8_dtype)
            return {"weight": fp8.quantize_fp8(real, spec.fp8_dtype, s), "scale_weight": s}
        return {"weight": fp8.saturating_cast(real, spec.fp8_dtype)}

    real = _real_weight(weight, scale)
    if spec.storage == NVFP4:
        packed, block_scale, tensor_scale = fp4.quantize_nvfp4(real)
        return {"weight_packed": packed, "weight_scale": block_scale, "weight_scale_2": tensor_scale}
    if spec.storage == MXFP4:
        packed, block_scale = fp4.quantize_mxfp4(real)
        return {"weight_packed": packed, "weight_scale": block_scale}
    raise AssertionError(f"unhandled storage {spec.storage}")  # pragma: no cover
