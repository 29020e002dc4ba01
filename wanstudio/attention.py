"""Attention dispatch (placeholder: the full backend registry lands with the attention issue).

The model calls only :func:`attention`. q, k, v are [B, L, H, D] (the model's native layout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .options import AttentionMode, parse_option


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mode: AttentionMode | str = AttentionMode.SDPA,
    where: str = "attention",
) -> torch.Tensor:
    """Softmax attention with scale D^-0.5. q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D]."""
    parse_option(AttentionMode, mode)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)  # (B, Lq, H, D)
