"""Packing: the recorded layout of a swapped unit, and its tensors as views of flat buffers.

Every parameter and buffer of a unit sits at a PLACEMENT_ALIGN-aligned offset of one flat uint8
buffer, with its resident shape, dtype and strides; :func:`_view` rebuilds it there and
:func:`_check_view` checks the result against the recorded layout and BLOCK_SWAP_CONTRACT.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import layout
from ..errors import BlockSwapError, LayoutError
from ..layout import ALIGN_BYTES, LayoutContract, Operand, describe_tensor
from .transfer import _align_up

# What every swapped tensor must satisfy where it lands (slot view and host master): the
# 16-byte alignment the fp8 / fp4 kernels need. Shape, dtype and strides must equal the
# resident tensor's; that part is checked against the recorded layout (see _check_view).
BLOCK_SWAP_CONTRACT = LayoutContract(
    kernel="block_swap_copy",
    operands=(Operand("swapped", align=ALIGN_BYTES),),
)


def _span_bytes(shape: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes from a tensor's first element to one past its last (gaps of a strided view included)."""
    if any(s == 0 for s in shape):
        return 0
    return (1 + sum((s - 1) * st for s, st in zip(shape, stride))) * dtype.itemsize


def _raw_bytes(t: torch.Tensor, span: int) -> torch.Tensor:
    """The ``span`` bytes under ``t`` from its first element, as uint8 on t's device (no copy)."""
    raw = torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())
    start = t.storage_offset() * t.element_size()
    return raw[start : start + span]


# --- the recorded layout of one swapped unit ----------------------------------------------------
@dataclass(eq=False)
class _Entry:
    """One tensor of a swapped unit: the registered object (kept, re-pointed) and its layout."""

    name: str  # qualified name in the model, e.g. 'blocks.39.ffn.0.weight'
    owners: list[tuple[nn.Module, str, str]]  # (module, attribute, 'param' | 'buffer'), aliases too
    tensor: torch.Tensor
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # bytes into the unit's flat buffer, a multiple of PLACEMENT_ALIGN
    span: int
    was_aligned: bool  # resident tensor was 16-byte aligned (always, unless it was a view)
    host: torch.Tensor | None = None  # view into the pinned host master


def _point(e: _Entry, new: torch.Tensor) -> None:
    """Make the registered tensor show ``new`` (same object, so every reference follows).

    A meta tensor cannot take real data in place: it is replaced, in every module that
    registers it, by a new object on ``new``.
    """
    if e.tensor.device.type != "meta":
        e.tensor.data = new
        return
    kind = e.owners[0][2]
    obj = nn.Parameter(new, requires_grad=e.tensor.requires_grad) if kind == "param" else new.detach()
    for owner, attr, k in e.owners:
        (owner._parameters if k == "param" else owner._buffers)[attr] = obj
    e.tensor = obj


def _view(flat: torch.Tensor, offset: int, e: _Entry) -> torch.Tensor:
    """The tensor described by ``e`` placed at ``offset`` in a flat uint8 buffer."""
    region = flat[offset : offset + e.span]
    return region.view(e.dtype).as_strided(e.shape, e.stride)


def _unit_entries(name: str, module: nn.Module) -> tuple[list[_Entry], int]:
    """Every parameter and buffer of ``module`` (de-duplicated by identity), laid out flat."""
    entries: list[_Entry] = []
    by_id: dict[int, _Entry] = {}
    cursor = 0
    for kind, named in (
        ("param", module.named_parameters(prefix=name, remove_duplicate=False)),
        ("buffer", module.named_buffers(prefix=name, remove_duplicate=False)),
    ):
        for qual, t in named:
            path, _, attr = qual[len(name) + 1 :].rpartition(".")
            owner = module.get_submodule(path) if path else module
            if id(t) in by_id:
                by_id[id(t)].owners.append((owner, attr, kind))
                continue
            if type(t.data) is not torch.Tensor or t.layout is not torch.strided:
                raise BlockSwapError(
                    f"block swap moves plain dense tensors; {qual} is a {type(t.data).__name__} "
                    f"with layout {t.layout}. Dequantize that layer (or keep its block resident: "
                    f"swap fewer blocks)."
                )
            shape, stride = tuple(t.shape), tuple(t.stride())
            span = _span_bytes(shape, stride, t.dtype)
            cursor = _align_up(cursor)
            aligned = t.device.type == "meta" or layout.is_aligned(t)
            e = _Entry(qual, [(owner, attr, kind)], t, shape, stride, t.dtype, cursor, span, aligned)
            entries.append(e)
            by_id[id(t)] = e
            cursor += span
    _warn_tensor_attributes(name, module, by_id)
    return entries, _align_up(cursor)


def _warn_tensor_attributes(name: str, module: nn.Module, registered: Mapping[int, Any]) -> None:
    """Tensors held as plain attributes are not moved (they may be caches); say so once."""
    stray = [
        f"{mname}.{k}"
        for mname, m in module.named_modules(prefix=name)
        for k, v in vars(m).items()
        if isinstance(v, torch.Tensor) and id(v) not in registered
    ]
    if stray:
        warnings.warn(
            f"block swap moves parameters and buffers only; {', '.join(stray)} "
            "are plain tensor attributes and stay where they are (fine for caches derived on the "
            "device; register real state with register_buffer)",
            RuntimeWarning,
            stacklevel=4,
        )


def _signature(entries: Iterable[_Entry]) -> tuple:
    return tuple((e.shape, e.stride, e.dtype, e.offset) for e in entries)


def _check_view(view: torch.Tensor, e: _Entry, where: str) -> None:
    """A swapped tensor has its resident shape / dtype / strides, and 16-byte alignment."""
    same = tuple(view.shape) == e.shape and tuple(view.stride()) == e.stride and view.dtype == e.dtype
    bad = [] if not e.was_aligned else BLOCK_SWAP_CONTRACT.violations(swapped=view)
    if not same or bad:
        raise LayoutError(
            f"{e.name}: block swap {where} does not match the resident layout (a bug in "
            f"wanstudio.offload; please report it).\n"
            f"  required: shape {e.shape}, stride {e.stride}, dtype {e.dtype}, 16-byte aligned\n"
            f"  found:    {describe_tensor(view)}"
        )


def _check_no_shared_tensors(model: nn.Module, swapped: set[str]) -> None:
    """A tensor object registered both in a swapped unit and elsewhere cannot be swapped."""
    prefixes = tuple(sorted(swapped))

    def unit_of(name: str) -> str | None:
        for p in prefixes:
            if name.startswith(p + "."):
                return p
        return None

    seen: dict[int, tuple[str | None, str]] = {}
    for name, t in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        unit = unit_of(name)
        prev = seen.setdefault(id(t), (unit, name))
        if prev[0] != unit:
            raise BlockSwapError(
                f"{name} and {prev[1]} are the same tensor, but only one of them is in a swapped "
                "unit: block swap would move it for both. Untie them (clone one), or choose "
                "blocks_to_swap / offload options that keep both on the same side."
            )


def _resident_bytes(model: nn.Module, swapped_ids: set[int]) -> int:
    seen: set[tuple] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in swapped_ids or t.device.type == "meta":
            continue
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total
