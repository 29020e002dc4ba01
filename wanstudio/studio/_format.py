"""Small text helpers shared by the studio's tables and summaries."""

from __future__ import annotations

import math

import torch


def gib(n: int | None) -> str:
    """Bytes for people: '1.50 GiB', '12.0 MiB', '3.0 KiB' ('?' when unknown)."""
    if n is None:
        return "?"
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB"


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16'."""
    return str(dtype).replace("torch.", "")


def db_text(v: float) -> str:
    """An SQNR in dB for a table cell ('' for NaN, 'inf' for exact)."""
    return "" if math.isnan(v) else "inf" if math.isinf(v) else f"{v:.1f}"
