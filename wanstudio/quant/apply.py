"""quantize(model, mode): swap the DiT's Linear layers for QuantizedLinear, in place.

Which layers: every ``nn.Linear`` whose qualified name starts with ``only_under`` (the DiT
blocks by default) and contains none of the ``keep`` substrings. The default keep-list is the
model's own capability metadata, ``config.KEEP_IN_BASE_PRECISION`` (docs/MODES.md).
:func:`swap_linears` does the replacing, for :func:`quantize` and for the checkpoint loader.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from ..config import KEEP_IN_BASE_PRECISION
from ..errors import UnsupportedModeError
from ..options import QuantMode
from .linear import QuantizedLinear
from .spec import check_device, spec_for

DEFAULT_KEEP: tuple[str, ...] = KEEP_IN_BASE_PRECISION


def is_kept(name: str, keep: Sequence[str]) -> bool:
    """Whether a module's qualified name contains one of the keep-list substrings."""
    return any(k in name for k in keep)


def is_quantizable(
    name: str, module: nn.Module, *, keep: Sequence[str] = DEFAULT_KEEP, only_under: str = "blocks."
) -> bool:
    """Whether :func:`quantize` replaces this module: a plain ``nn.Linear`` (not a subclass)
    whose qualified name starts with ``only_under`` and contains no ``keep`` substring."""
    return type(module) is nn.Linear and name.startswith(only_under) and not is_kept(name, keep)


def quantizable_linears(
    model: nn.Module, *, keep: Sequence[str] = DEFAULT_KEEP, only_under: str = "blocks."
) -> Iterator[tuple[str, nn.Linear]]:
    """(qualified name, layer) of every plain ``nn.Linear`` that :func:`quantize` would replace."""
    for name, module in model.named_modules():
        if is_quantizable(name, module, keep=keep, only_under=only_under):
            yield name, module


def _post_order(module: nn.Module, prefix: str = "", seen: set | None = None):
    """(qualified name, module) of every submodule, children before their parent (the root
    itself excluded); a module registered twice comes once, under its first name."""
    seen = set() if seen is None else seen
    for child_name, child in module.named_children():
        if id(child) in seen:
            continue
        seen.add(id(child))
        name = f"{prefix}.{child_name}" if prefix else child_name
        yield from _post_order(child, name, seen)
        yield name, child


def swap_linears(
    model: nn.Module,
    factory: Callable[[str, nn.Linear], nn.Module],
    filter_fn: Callable[[str, nn.Linear], bool],
) -> dict[str, nn.Module]:
    """Replace every ``nn.Linear`` of ``model`` for which ``filter_fn(name, module)`` is true by
    ``factory(name, module)``, in place; returns {qualified name: new module}.

    Children are replaced before their parents (post-order), so a factory sees a module whose
    own sublayers are already swapped. Layers are swapped one at a time: the old one is
    dropped before the next is built. The root module itself is never replaced.
    """
    targets = [
        name
        for name, module in _post_order(model)
        if isinstance(module, nn.Linear) and filter_fn(name, module)
    ]
    swapped: dict[str, nn.Module] = {}
    for name in targets:
        new = factory(name, model.get_submodule(name))
        _set_submodule(model, name, new)
        swapped[name] = new
    return swapped


def _model_device(model: nn.Module) -> torch.device | None:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize(
    model: nn.Module,
    mode: QuantMode | str,
    *,
    keep: Sequence[str] = DEFAULT_KEEP,
    only_under: str = "blocks.",
) -> nn.Module:
    """Replace the model's Linear layers by :class:`QuantizedLinear` in ``mode``; returns ``model``.

    Args:
        model: modified in place. Layers are swapped one at a time, so the peak extra memory
            is one layer's quantized copy.
        mode: a :class:`QuantMode` or its name. ``disabled`` leaves the model as it is.
        keep: substrings of qualified names to leave in base precision.
        only_under: only layers whose qualified name starts with this prefix ("" = all).

    Raises:
        UnsupportedModeError: an fp8 ``_fast`` mode on a CUDA GPU below compute capability 8.9
            (checked before anything changes), or a model already quantized in another mode.
    """
    spec = spec_for(mode)
    mode = spec.mode
    if spec.storage is None:
        return model
    keep = tuple(keep)
    check_device(mode, _model_device(model))
    present = {
        m.mode
        for n, m in model.named_modules()
        if isinstance(m, QuantizedLinear) and n.startswith(only_under)
    }
    if present - {mode}:
        found = ", ".join(sorted(m.value for m in present))
        raise UnsupportedModeError(
            f"the model is already quantized ({found}); cannot re-quantize to {mode.value!r}. "
            f"Call wanstudio.quant.dequantize(model) first, or reload the checkpoint."
        )

    def quantized(name: str, linear: nn.Linear) -> QuantizedLinear:
        q = QuantizedLinear.from_linear(linear, mode)
        q._layout_name = name
        return q

    swap_linears(model, quantized, lambda name, m: is_quantizable(name, m, keep=keep, only_under=only_under))
    return model


def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Reverse of :func:`quantize`: every QuantizedLinear back to an ``nn.Linear`` (lossy once)."""
    targets = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    for name in targets:
        _set_submodule(model, name, model.get_submodule(name).to_linear(dtype))
    return model


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    """Qualified name -> QuantizedLinear, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
