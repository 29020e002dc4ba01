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
gguf_q8_0          ``weight_q8``              int8 [N, K_pad], row-major
                   ``weight_scale``           fp16 [N, K_pad / 32] (real weight = q8 * scale per
                                              block of 32 along K: GGUF's Q8_0)
=================  =========================  =====================================================

Each format module in ``quant/formats/`` defines its tensors (``buffers``) and how a weight
becomes them (``quantize``). A checkpoint's own per-tensor scale (``scale_weight`` in ComfyUI-style scaled-fp8 files,
``weight_scale`` in others) is passed as ``scale=`` and honoured as stored.
"""

from __future__ import annotations

import torch

from ..errors import CheckpointError
from ..options import QuantMode
from . import fp8
from .formats import format_for
from .spec import spec_for, storage_mode_for


def _checked_scale(scale: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if scale is None:
        return None
    if scale.numel() not in (1, n):
        raise CheckpointError(
            f"a weight scale must hold 1 value (per tensor) or {n} (per output channel); "
            f"got shape {tuple(scale.shape)}"
        )
    return scale.detach().float()


def quantize_weight(
    weight: torch.Tensor, mode: QuantMode | str, *, scale: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Quantize one Linear weight [N, K] for ``mode``; returns the tensors to store, by name.

    ``weight`` may be high precision (bf16 / fp16 / fp32) or fp8 as stored in a checkpoint;
    ``scale`` is a checkpoint's stored scale for it (real weight = weight * scale). An fp8
    weight of the mode's own fp8 dtype is kept exactly as stored, with its scale. A mode that
    differs from the stored format (e5m2 weights in an e4m3 mode, a scaled file in a plain
    mode, fp8 in an fp4 or Q8_0 mode) gets the weight the file means, ``weight * scale`` in
    fp32, quantized in that mode. ``disabled`` returns the weight untouched (fp8 weights need
    their storage mode: see :func:`storage_mode_for`). The input tensors are never modified.
    """
    spec = spec_for(mode)
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"quantize_weight takes a float [N, K] weight, got {weight.dtype} {tuple(weight.shape)}"
        )
    scale = _checked_scale(scale, weight.shape[0])
    weight = weight.detach()
    if spec.storage is None:
        if weight.dtype in fp8.FP8_DTYPES:
            fits = storage_mode_for(weight.dtype, scale is not None).value
            raise CheckpointError(
                f"an {weight.dtype} weight cannot run unquantized; its storage mode is {fits!r}"
            )
        return {"weight": weight}
    return format_for(spec).quantize(weight, scale)
