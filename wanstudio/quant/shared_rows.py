"""Activations quantized once for several fp8 ``_fast`` layers (:class:`SharedRows`).

* :func:`quantize_once` — q, k and v of self-attention read the same tokens: one per-token e4m3
  quantization serves all three.
* :func:`modulated_rows` — the tokens they read are Wan's adaLN modulation of the residual
  stream; on CUDA one kernel goes from the stream to the shared e4m3 rows, and the modulated
  tokens are never written in bf16 (for the FFN's first layer too).

Both hand the input back unchanged wherever a layer does not take the ``scaled_mm`` path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from . import kernels
from .linear import QuantizedLinear, SharedRows
from .spec import SCALED_MM


def _all_scaled_mm(x: torch.Tensor, layers: Sequence[nn.Module]) -> bool:
    """Whether every layer is a QuantizedLinear taking the scaled_mm path for ``x``."""
    return x.numel() > 0 and all(
        isinstance(layer, QuantizedLinear)
        and layer.in_features == x.shape[-1]
        and layer.path_for(x.device, x.dtype)[0] == SCALED_MM
        for layer in layers
    )


def _shared_name(layers: Sequence[nn.Module]) -> str:
    """'blocks.0.self_attn.q+k+v': the layers' common parent and their own names."""
    names = [layer._where() for layer in layers]
    parent = os.path.commonprefix(names).rpartition(".")[0]
    return f"{parent}.{'+'.join(n[len(parent) + 1 :] for n in names)}" if parent else "+".join(names)


@torch.compiler.disable  # a kernel wrapper (fusion.py): decided and run eagerly
def quantize_once(x: torch.Tensor | SharedRows, layers: Sequence[nn.Module]) -> torch.Tensor | SharedRows:
    """``x`` quantized per token once, as :class:`SharedRows`, when every layer in ``layers``
    takes the ``scaled_mm`` path for it; otherwise ``x`` itself (plain Linears, other modes,
    or rows already shared). Saves ``len(layers) - 1`` passes over x: the quantization each
    layer would do is the same."""
    if isinstance(x, SharedRows) or not _all_scaled_mm(x, layers):
        return x
    q, scale = kernels.quantize_rows(x.reshape(-1, x.shape[-1]), _shared_name(layers))  # (M, K), (M, 1)
    return SharedRows(q.view(x.shape), scale.view(*x.shape[:-1], 1), x.dtype)


def modulated_rows(
    norm: nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, layers: Sequence[nn.Module]
) -> torch.Tensor | SharedRows:
    """``norm.modulate(x, shift, scale)`` (Wan's adaLN: LayerNorm(x) * (1 + scale) + shift), as
    the input of ``layers``. Where they all run fp8 ``_fast`` matmuls on CUDA, one fused kernel
    goes from x to the per-token e4m3 rows they share (:class:`SharedRows`), and the modulated
    activations are never written in x's dtype; elsewhere the tensor itself.

    The first test reads only the layers' types and mode, so ``torch.compile`` folds it and
    models without fp8 ``_fast`` layers compile the modulation with what surrounds it."""
    if all(isinstance(layer, QuantizedLinear) and layer.spec.matmul == SCALED_MM for layer in layers):
        return _modulate_for_scaled_mm(norm, x, shift, scale, layers)
    return norm.modulate(x, shift, scale)


@torch.compiler.disable  # a kernel wrapper (fusion.py): decided and run eagerly
def _modulate_for_scaled_mm(
    norm: nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, layers: Sequence[nn.Module]
) -> torch.Tensor | SharedRows:
    fusable = (
        kernels.use_triton(x)
        and x.dim() == 3
        and shift.shape == scale.shape == (x.shape[0], 1, x.shape[2])  # one modulation per sample
        and shift.dtype == scale.dtype == torch.float32
        and norm.weight is None
        and norm.bias is None
        and _all_scaled_mm(x, layers)
    )
    if not fusable:  # the CPU, an affine norm, other shapes, a layer that falls back: modulate, share
        return quantize_once(norm.modulate(x, shift, scale), layers)
    q, row_scale = kernels.modulate_quantize_rows_triton(
        x, shift, scale, norm.eps, _shared_name(layers)
    )  # (B, L, D) e4m3, (B, L, 1) fp32
    return SharedRows(q, row_scale, x.dtype)
