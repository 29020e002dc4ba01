"""Fuse the elementwise work around the kernels: ``compile_blocks(model)``.

A Wan block spends ~25% of its time outside its GEMMs and attention (H200, 14B, 480p): fp32
LayerNorm + modulation, RMSNorm, RoPE, GELU and the gated residual adds each read and write
the whole [L, D] stream. ``torch.compile`` of each block's ``forward`` lets Inductor fuse them.
Kernel wrappers — :func:`wanstudio.attention.attention` and ``QuantizedLinear.forward`` — are
excluded from tracing (``torch.compiler.disable`` at their definitions), so backend dispatch and
layout contracts run exactly as in eager mode; only the code between kernels is compiled.
Hooks (block swap, inspector) stay outside the compiled region: ``forward`` is compiled, not
``__call__``.
"""

from __future__ import annotations

import torch
from torch import nn


def compile_blocks(model: nn.Module, *, mode: str | None = None) -> nn.Module:
    """Compile every block's forward in place (first call per input shape compiles). Returns model."""
    for block in model.blocks:
        if not getattr(block, "_wanstudio_compiled", False):
            block.forward = torch.compile(block.forward, mode=mode, dynamic=False)
            block._wanstudio_compiled = True
    return model


def uncompile_blocks(model: nn.Module) -> nn.Module:
    """Back to eager blocks."""
    for block in model.blocks:
        if getattr(block, "_wanstudio_compiled", False):
            del block.forward  # the instance attribute; the class method is back
            block._wanstudio_compiled = False
    return model
