"""Small building blocks of the Wan DiT: fp32 norms, the time sinusoid, fp32 linear islands."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back (Wan's ``WanLayerNorm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., C] -> LayerNorm(x) computed in fp32, cast back to x's dtype."""
        return self.fp32(x).type_as(x)

    def fp32(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised x in fp32 (not rounded back: the modulation that follows is fp32 too)."""
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)

    def modulate(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """LN(x) * (1 + scale) + shift in fp32, cast to x's dtype (Wan's adaLN modulation)."""
        return torch.addcmul(shift, self.fp32(x), 1 + scale).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim: normalise in fp32, cast back, then scale (Wan's ``WanRMSNorm``)."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., dim] -> x / rms(x) (in fp32, cast back) * weight, in x's dtype."""
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight.to(x.dtype)


def time_sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] timesteps -> [B, dim] float64 embedding [cos(t w_i), sin(t w_i)], w_i = 10000^(-i/half)."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.to(torch.float64)[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def fp32_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Run an unquantized Linear in fp32 whatever its storage dtype (the official fp32 islands)."""
    bias = layer.bias.float() if layer.bias is not None else None
    return F.linear(x.float(), layer.weight.float(), bias)
