"""Layout incidents, reproduced on a model (notebook 03 and the layout panel).

The misaligned-weight incident (:func:`misalign` / :func:`realign`), strict mode naming the
layer (:func:`strict_forward_error`), what a hidden contract copy costs (:func:`hidden_copy_cost`),
the inspector on one forward (:func:`inspect_model`), and the block-swap timeline
(:func:`swap_timeline`, :func:`simulated_block_swap` for CPU machines).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LayoutError
from ..inspector import inspect_layout
from ..layout import listen, strict_layout
from ..offload import FakeTransferBackend, enable_block_swap
from ._format import gib
from .inputs import forward


def _set_tensor(module: nn.Module, attr: str, tensor: torch.Tensor) -> None:
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        setattr(module, attr, tensor)


def misalign(model: nn.Module, layer: str, attr: str = "weight") -> torch.Tensor:
    """Move ``<layer>.<attr>`` into a storage that starts one element late: its data_ptr() is
    no longer 16-byte aligned, exactly like a weight sliced out of a packed / merged tensor.

    Values, shape and strides are unchanged; only the address moves. Returns the new tensor.
    """
    module = model.get_submodule(layer)
    t = getattr(module, attr)
    storage = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)  # (1 + N*K,)
    moved = storage[1:].view(t.shape)  # (N, K), storage offset 1
    moved.copy_(t.detach())
    _set_tensor(module, attr, moved)
    return moved


def realign(model: nn.Module, layer: str, attr: str = "weight") -> torch.Tensor:
    """Undo :func:`misalign`: one fresh (aligned) allocation."""
    module = model.get_submodule(layer)
    fixed = getattr(module, attr).detach().clone()
    _set_tensor(module, attr, fixed)
    return fixed


def contract_layers(model: nn.Module, inputs: Mapping, operand: str = "") -> list[tuple[str, str, str]]:
    """(module, kernel, operand) of every layout-contract check one forward makes."""
    seen: dict[tuple[str, str, str], None] = {}

    def record(event) -> None:
        seen[(event.where, event.kernel, event.operand.name)] = None

    with listen(record):
        forward(model, inputs)
    return [k for k in seen if not operand or k[2] == operand]


def fast_linear_layers(model: nn.Module, inputs: Mapping) -> list[str]:
    """Modules whose weight reaches ``torch._scaled_mm`` (the kernel with an alignment rule)."""
    names = []
    for where, kernel, _operand in contract_layers(model, inputs):
        if "scaled_mm" in kernel and where not in names:
            names.append(where)
    return names


def strict_forward_error(model: nn.Module, inputs: Mapping) -> LayoutError | None:
    """Run one forward under ``strict_layout()``; the LayoutError it raises, or None."""
    try:
        with strict_layout():
            forward(model, inputs)
    except LayoutError as e:
        return e
    return None


@dataclass(frozen=True)
class CopyCost:
    """What a layout violation costs outside strict mode (the contract copies, every call)."""

    copies_per_forward: int
    bytes_per_forward: int
    ms_violating: float
    ms_clean: float
    copied: tuple[str, ...]  # 'module: kernel operand' of each hidden copy

    @property
    def overhead(self) -> float:
        """How much slower the forward is with the violation (0.25: 25 %)."""
        return self.ms_violating / self.ms_clean - 1 if self.ms_clean else float("nan")

    def __str__(self) -> str:
        return (
            f"{self.copies_per_forward} hidden cop{'y' if self.copies_per_forward == 1 else 'ies'} "
            f"per forward ({gib(self.bytes_per_forward)}): {', '.join(self.copied) or 'none'}\n"
            f"forward {self.ms_violating:.2f} ms with the violation, {self.ms_clean:.2f} ms without "
            f"({self.overhead:+.0%})"
        )


def _time_ms(model: nn.Module, inputs: Mapping, repeats: int) -> float:
    forward(model, inputs)  # warm-up
    best = math.inf
    for _ in range(repeats):
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        t0 = time.perf_counter()
        forward(model, inputs)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        best = min(best, (time.perf_counter() - t0) * 1000)
    return best


def hidden_copy_cost(
    model: nn.Module, inputs: Mapping, layer: str, attr: str = "weight", repeats: int = 5
) -> CopyCost:
    """Misalign ``<layer>.<attr>``, count and time the copies the contracts then make on every
    forward (outside strict mode), realign, time again. The model is left aligned."""
    misalign(model, layer, attr)
    copied: dict[str, int] = {}

    def record(event) -> None:
        if event.copied:
            key = f"{event.where}: {event.kernel} {event.operand.name}"
            copied[key] = event.tensor.numel() * event.tensor.element_size()

    try:
        with listen(record):
            forward(model, inputs)
        slow = _time_ms(model, inputs, repeats)
    finally:
        realign(model, layer, attr)
    fast = _time_ms(model, inputs, repeats)
    return CopyCost(len(copied), sum(copied.values()), slow, fast, tuple(copied))


# --- the inspector -------------------------------------------------------------------------------------
def inspect_model(model: nn.Module, inputs: Mapping, *, strict: bool = False):
    """``wanstudio.inspect_layout`` on :func:`example_inputs`-style inputs, under strict mode if asked.

    In strict mode a violated contract raises LayoutError (naming the layer) instead of a report.
    """
    with strict_layout(strict):
        return inspect_layout(model, dict(inputs))


def report_rows(report) -> list:
    """The rows of an inspector report (a LayoutReport, a filtered one, or a list of rows)."""
    rows = getattr(report, "rows", report)
    return list(rows() if callable(rows) else rows)


def row_field(row, name: str, default=""):
    """A field of an inspector row (a LayoutRow attribute, or a key of a mapping row)."""
    if isinstance(row, Mapping):
        return row.get(name, default)
    return getattr(row, name, default)


# --- block swap timeline -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Span:
    """One bar of the block-swap timeline."""

    unit: str  # 'blocks.39'
    kind: str  # 'copy' (side stream), 'wait' (compute waiting for the copy) or 'compute'
    start: float  # ms from the forward's start
    end: float


def swap_timeline(stats) -> list[Span]:
    """The last forward of ``model.block_swap_stats`` as copy / wait / compute spans (ms)."""
    if stats is None:
        return []
    spans = []
    for e in getattr(stats, "timeline", ()) or ():
        spans.append(Span(e.unit, "copy", e.copy_start, e.copy_end))
        if e.compute_start > e.compute_ready:
            spans.append(Span(e.unit, "wait", e.compute_ready, e.compute_start))
        spans.append(Span(e.unit, "compute", e.compute_start, e.compute_end))
    return spans


def block_swap(model: nn.Module, blocks_to_swap: int, *, prefetch: int = 1) -> nn.Module:
    """Block swap for real on a CUDA model; on the CPU, :func:`simulated_block_swap`."""
    if model.device.type == "cuda":
        return enable_block_swap(model, blocks_to_swap, prefetch=prefetch)
    return simulated_block_swap(model, blocks_to_swap, prefetch=prefetch)


def simulated_block_swap(
    model: nn.Module,
    blocks_to_swap: int,
    *,
    prefetch: int = 1,
    copy_gb_per_s: float = 25.0,
    compute_ms: float = 1.0,
) -> nn.Module:
    """Block swap on the CPU with a simulated device (``offload.FakeTransferBackend``): the
    bookkeeping and the timeline are real, the clock is virtual. For CPU notebooks and tests."""
    backend = FakeTransferBackend(copy_bytes_per_ms=copy_gb_per_s * 1e6, compute_ms=compute_ms)
    return enable_block_swap(model, blocks_to_swap, prefetch=prefetch, backend=backend)
