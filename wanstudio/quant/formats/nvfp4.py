"""NVFP4 storage (``fp4_scaled``, ``fp4_scaled_fast``): e2m1 codes, an e4m3 scale per 16 weights
along K, and one fp32 scale per tensor.

Stored: ``weight_packed`` uint8 [N, K_pad / 2] (two codes per byte, element 2j in the low
nibble), ``weight_scale`` float8_e4m3fn [N, K_pad / 16], ``weight_scale_2`` fp32 []. The layout
is the one Blackwell's FP4 tensor cores read (``native_fp4``). Numerics: ``quant/fp4.py``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .. import fp4, kernels
from .base import Buffer, StorageFormat, dequantize_how, real_weight


class Nvfp4Format(StorageFormat):
    """e2m1 + e4m3 block scale per 16 + fp32 tensor scale (4.5 bits per weight)."""

    name = "nvfp4"
    label = "NVFP4"
    block_size = fp4.NVFP4_BLOCK
    bits_per_weight = 4.5
    native_fp4 = True

    @property
    def names(self) -> tuple[str, ...]:
        return ("weight_packed", "weight_scale", "weight_scale_2")

    def buffers(self, n: int, k: int) -> tuple[Buffer, ...]:
        kp = fp4.padded_k(k, self.block_size)
        return (
            Buffer("weight_packed", (n, kp // 2), torch.uint8),
            Buffer("weight_scale", (n, kp // self.block_size), torch.float8_e4m3fn),
            Buffer("weight_scale_2", (), torch.float32, fill=1.0),
        )

    def expected_shape(self, name: str, t: torch.Tensor, n: int, k: int) -> tuple[int, ...]:
        if name == "weight_scale_2":  # one value, [] or [1]
            return tuple(t.shape) if t.numel() == 1 else ()
        return super().expected_shape(name, t, n, k)

    def quantize(self, weight: torch.Tensor, scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
        packed, block_scale, tensor_scale = fp4.quantize_nvfp4(real_weight(weight, scale))
        return {"weight_packed": packed, "weight_scale": block_scale, "weight_scale_2": tensor_scale}

    def dequantize(
        self, tensors: Mapping[str, torch.Tensor], k: int, dtype: torch.dtype, where: str
    ) -> torch.Tensor:
        return kernels.dequantize_fp4(
            tensors["weight_packed"], tensors["weight_scale"], tensors["weight_scale_2"], k, dtype, where
        )

    def describe(self) -> str:
        return "NVFP4: e2m1 weights + e4m3 scale per 16 along K + fp32 scale per tensor"

    def dequantize_detail(self, device: torch.device) -> str:
        return f"NVFP4 weight dequantized per layer ({dequantize_how(device)}), then F.linear"


FORMAT = Nvfp4Format
