"""Rotary position embeddings: Wan's 3-D RoPE and InfiniteTalk's 1-D RoPE.

Both rotate interleaved pairs (dims 2i, 2i+1). Angles are computed in float64 and the
rotation is applied in fp32: the official code rotates in float64, which differs from this by
~1e-7 relative — far below the bf16 rounding the result then goes through — at half the bytes.
"""

from __future__ import annotations

import torch

THETA = 10000.0


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Dims given to the (frame, row, column) axes: 44, 42, 42 for head_dim 128."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_angles(positions: torch.Tensor, axis_dim: int) -> torch.Tensor:
    """[N] positions -> [N, axis_dim / 2] angles pos * theta^(-2i / axis_dim), float64."""
    inv_freq = THETA ** (-torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim)
    return positions.to(torch.float64)[:, None] * inv_freq.to(positions.device)[None, :]


def rope_3d_cos_sin(
    grid: tuple[int, int, int], head_dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables for a (f, h, w) token grid, each [f*h*w, head_dim / 2] fp32, row-major."""
    f, h, w = grid
    dt, dh, dw = rope_axis_dims(head_dim)
    at = _axis_angles(torch.arange(f, device=device), dt)  # (f, dt/2)
    ah = _axis_angles(torch.arange(h, device=device), dh)  # (h, dh/2)
    aw = _axis_angles(torch.arange(w, device=device), dw)  # (w, dw/2)
    angles = torch.cat(
        [
            at[:, None, None, :].expand(f, h, w, -1),
            ah[None, :, None, :].expand(f, h, w, -1),
            aw[None, None, :, :].expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, head_dim // 2)  # (L, D/2)
    return angles.cos().float(), angles.sin().float()


def rope_1d_cos_sin(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """InfiniteTalk's 1-D RoPE over all head dims: [N] positions -> cos, sin [N, head_dim / 2]."""
    angles = _axis_angles(positions, head_dim)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, L, H, D] by angles given as cos/sin [L, D/2] (or
    [B, L, D/2]). The arithmetic runs in fp32 (type promotion against the fp32 tables) and is
    stored straight into an output of x's dtype: no fp32 copy of x, no stack."""
    B, L, H, D = x.shape
    x_even, x_odd = x.unflatten(-1, (D // 2, 2)).unbind(-1)  # (B, L, H, D/2) views
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # (B|1, L, 1, D/2)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    pairs = out.unflatten(-1, (D // 2, 2))  # (B, L, H, D/2, 2); indexed, not unbound: autograd-safe
    pairs[..., 0] = x_even * cos - x_odd * sin
    pairs[..., 1] = x_even * sin + x_odd * cos
    return out  # (B, L, H, D)
