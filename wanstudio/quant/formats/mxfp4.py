"""MXFP4 storage (``fp4_experimental``): e2m1 codes and a power-of-two (e8m0) scale per 32
weights along K.

Stored: ``weight_packed`` uint8 [N, K_pad / 2] (two codes per byte, element 2j in the low
nibble) and ``weight_scale`` e8m0 [N, K_pad / 32] (``torch.float8_e8m0fnu`` where torch has
it, uint8 otherwise: the biased exponent byte). Numerics: ``quant/fp4.py``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .. import fp4, kernels
from .base import Buffer, StorageFormat, dequantize_how, real_weight


class Mxfp4Format(StorageFormat):
    """e2m1 + e8m0 block scale per 32 (4.25 bits per weight)."""

    name = "mxfp4"
    label = "MXFP4"
    block_size = fp4.MXFP4_BLOCK
    bits_per_weight = 4.25

    @property
    def names(self) -> tuple[str, ...]:
        return ("weight_packed", "weight_scale")

    def buffers(self, n: int, k: int) -> tuple[Buffer, ...]:
        kp = fp4.padded_k(k, self.block_size)
        return (
            Buffer("weight_packed", (n, kp // 2), torch.uint8),
            Buffer("weight_scale", (n, kp // self.block_size), fp4.E8M0_DTYPE),
        )

    def quantize(self, weight: torch.Tensor, scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
        packed, block_scale = fp4.quantize_mxfp4(real_weight(weight, scale))
        return {"weight_packed": packed, "weight_scale": block_scale}

    def dequantize(
        self, tensors: Mapping[str, torch.Tensor], k: int, dtype: torch.dtype, where: str
    ) -> torch.Tensor:
        return kernels.dequantize_fp4(
            tensors["weight_packed"], tensors["weight_scale"], None, k, dtype, where
        )

    def describe(self) -> str:
        return "MXFP4: e2m1 weights + power-of-two (e8m0) scale per 32 along K"

    def dequantize_detail(self, device: torch.device) -> str:
        return f"MXFP4 weight dequantized per layer ({dequantize_how(device)}), then F.linear"


FORMAT = Mxfp4Format
