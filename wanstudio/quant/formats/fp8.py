"""fp8 storage: the weight [N, K] in e4m3fn or e5m2, plus an fp32 scale in the ``_scaled`` modes.

Plain modes cast the weight (saturating); ``_scaled`` modes store ``scale_weight`` fp32 per
output channel ([N], from a quantization here) or per tensor ([] / [1], as scaled-fp8
checkpoints store it): the real weight is ``weight.float() * scale_weight``. A checkpoint's fp8
weight of the mode's own dtype is kept exactly as stored; one of another storage mode (e5m2 in
an e4m3 mode, a scaled weight in a plain mode) is dequantized with its scale and quantized in
this mode (rounded twice). The numerics are in ``quant/fp8.py``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ...layout import LayoutContract, Operand, StrideRule
from .. import fp8
from .base import Buffer, StorageFormat, real_weight

_F32 = torch.float32

DEQUANT_FP8_CONTRACT = LayoutContract(
    "dequantize[fp8]",
    (
        Operand("weight", dtypes=fp8.FP8_DTYPES, ndim=2, stride=StrideRule.CONTIGUOUS),
        Operand("scale_weight", dtypes=(_F32,), stride=StrideRule.CONTIGUOUS, optional=True),
    ),
)


class Fp8Format(StorageFormat):
    """``weight`` fp8 [N, K] (+ ``scale_weight`` fp32 [N] / [] in the ``_scaled`` modes)."""

    name = "fp8"
    label = "fp8"
    bits_per_weight = 8.0

    @property
    def dtype(self) -> torch.dtype:
        """The fp8 dtype of the stored weight."""
        return self.spec.fp8_dtype

    @property
    def scaled(self) -> bool:
        """Whether a ``scale_weight`` is stored (the ``_scaled`` modes)."""
        return self.spec.per_channel_scale

    @property
    def scaled_mm_dtype(self) -> torch.dtype:
        return self.dtype  # a row-major [N, K] fp8 weight is _scaled_mm's mat2, transposed

    @property
    def names(self) -> tuple[str, ...]:
        return ("weight", "scale_weight") if self.scaled else ("weight",)

    @property
    def required(self) -> tuple[str, ...]:
        return ("weight",)  # a missing scale_weight keeps 1.0

    def buffers(self, n: int, k: int) -> tuple[Buffer, ...]:
        weight = Buffer("weight", (n, k), self.dtype)
        return (weight, Buffer("scale_weight", (n,), _F32, fill=1.0)) if self.scaled else (weight,)

    def expected_shape(self, name: str, t: torch.Tensor, n: int, k: int) -> tuple[int, ...]:
        if name == "scale_weight":  # per channel [N] (or [N, 1]), or per tensor [] / [1]
            return tuple(t.shape) if t.numel() in (1, n) and t.dim() <= 2 else (n,)
        return super().expected_shape(name, t, n, k)

    def quantize(self, weight: torch.Tensor, scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if self.holds_as_stored(weight, scale):  # a checkpoint's fp8 weight: kept as stored
            if not self.scaled:
                return {"weight": weight}
            stored = scale if scale is not None else torch.ones((), device=weight.device)
            return {"weight": weight, "scale_weight": stored}
        # float, or fp8 of another storage mode (e5m2 in an e4m3 mode, scaled in a plain one):
        # the weight the file means (stored x scale, fp32), quantized in this mode
        real = real_weight(weight, scale)
        if self.scaled:
            s = fp8.channel_scales(real, self.dtype)
            return {"weight": fp8.quantize_fp8(real, self.dtype, s), "scale_weight": s}
        return {"weight": fp8.saturating_cast(real, self.dtype)}

    def holds_as_stored(self, weight: torch.Tensor, scale: torch.Tensor | None) -> bool:
        """Whether a checkpoint's fp8 ``weight`` (with its ``scale``) is this mode's storage as is:
        the same fp8 dtype, and no scale other than 1 in a plain mode."""
        if weight.dtype != self.dtype:
            return False
        return self.scaled or scale is None or bool((scale == 1).all())

    def dequantize(
        self, tensors: Mapping[str, torch.Tensor], k: int, dtype: torch.dtype, where: str
    ) -> torch.Tensor:
        ops = DEQUANT_FP8_CONTRACT.enforce(
            where, weight=tensors["weight"], scale_weight=tensors.get("scale_weight")
        )
        return fp8.dequantize_fp8(ops["weight"], ops["scale_weight"], dtype)

    def rowwise_scale(self, tensors: Mapping[str, torch.Tensor], n: int) -> torch.Tensor:
        """The weight scale as ``torch._scaled_mm``'s row-wise ``scale_b``: fp32 [1, N], own storage."""
        s = tensors.get("scale_weight")
        if s is None:
            return torch.ones(1, n, dtype=_F32, device=tensors["weight"].device)
        # per channel [N] or per tensor [] -> [1, N], its own contiguous storage
        return s.float().reshape(1, -1).expand(1, n).clone(memory_format=torch.contiguous_format)

    def describe(self) -> str:
        kind = str(self.dtype).removeprefix("torch.float8_")
        scale = " + fp32 scale per output channel" if self.scaled else ""
        return f"fp8 {kind} weight [N, K]{scale}"

    def dequantize_detail(self, device: torch.device) -> str:
        scaled = " x per-channel scale" if self.scaled else ""
        return f"fp8 weight upcast{scaled}, then F.linear"


FORMAT = Fp8Format
