"""GGUF Q8_0 storage (``gguf_q8_0``): int8 codes and an fp16 scale per 32 weights along K.

Stored: ``weight_q8`` int8 [N, K_pad] (row-major, K zero-padded to a multiple of 32) and
``weight_scale`` fp16 [N, K_pad / 32]; the weight is ``weight_q8 * weight_scale`` per block.
A GGUF file's Q8_0 tensor is kept exactly as stored (the loader splits its 34-byte blocks
into these two tensors, ``quant/q8_0.py``); any other weight is quantized with GGML's
rounding. Dequantization: one fused Triton pass on CUDA, eager on the CPU, same bits.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .. import kernels, q8_0
from .base import Buffer, StorageFormat, dequantize_how, real_weight


class Q8_0Format(StorageFormat):
    """int8 + fp16 block scale per 32 (8.5 bits per weight)."""

    name = "q8_0"
    label = "Q8_0"
    block_size = q8_0.BLOCK
    bits_per_weight = 8.5

    @property
    def names(self) -> tuple[str, ...]:
        return ("weight_q8", "weight_scale")

    def buffers(self, n: int, k: int) -> tuple[Buffer, ...]:
        kp = q8_0.padded_k(k)
        return (
            Buffer("weight_q8", (n, kp), torch.int8),
            Buffer("weight_scale", (n, kp // q8_0.BLOCK), torch.float16),
        )

    def quantize(self, weight: torch.Tensor, scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
        q, d = q8_0.quantize_q8_0(real_weight(weight, scale))
        return {"weight_q8": q, "weight_scale": d}

    def dequantize(
        self, tensors: Mapping[str, torch.Tensor], k: int, dtype: torch.dtype, where: str
    ) -> torch.Tensor:
        return kernels.dequantize_q8_0(tensors["weight_q8"], tensors["weight_scale"], k, dtype, where)

    def describe(self) -> str:
        return "GGUF Q8_0: int8 weights + fp16 scale per 32 along K"

    def dequantize_detail(self, device: torch.device) -> str:
        return f"Q8_0 weight dequantized per layer ({dequantize_how(device)}), then F.linear"


FORMAT = Q8_0Format
