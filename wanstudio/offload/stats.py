"""Block swap statistics: per-unit timeline entries, per-forward steps, ``model.block_swap_stats``."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import BlockSwapError
from .transfer import _gb

STATS_HISTORY = 1000  # forwards kept in BlockSwapStats.steps


@dataclass(frozen=True)
class TimelineEntry:
    """One swapped unit in one forward; times in ms from the forward's start (compute stream).

    ``copy_start`` may be negative for a copy queued before the forward began.
    """

    unit: str
    slot: int
    nbytes: int
    on_demand: bool  # copied when the unit was reached, not prefetched
    copy_start: float
    copy_end: float
    compute_ready: float  # the compute stream reached the unit (everything before it done)
    compute_start: float  # ... and its copy was there
    compute_end: float

    @property
    def copy_ms(self) -> float:
        return self.copy_end - self.copy_start

    @property
    def exposed_ms(self) -> float:
        """Time the compute stream stood waiting for this unit's copy."""
        return max(0.0, self.compute_start - self.compute_ready)

    @property
    def hidden_ms(self) -> float:
        return max(0.0, self.copy_ms - self.exposed_ms)

    @property
    def compute_ms(self) -> float:
        return self.compute_end - self.compute_start


@dataclass(frozen=True)
class BlockSwapStep:
    """One forward of the model."""

    index: int
    forward_ms: float | None  # model forward, compute stream (None: blocks were run by hand)
    timeline: tuple[TimelineEntry, ...]

    @property
    def copies(self) -> int:
        return len(self.timeline)

    @property
    def bytes_copied(self) -> int:
        return sum(e.nbytes for e in self.timeline)

    @property
    def copy_ms(self) -> float:
        return sum(e.copy_ms for e in self.timeline)

    @property
    def exposed_ms(self) -> float:
        return sum(e.exposed_ms for e in self.timeline)

    @property
    def hidden_ms(self) -> float:
        return sum(e.hidden_ms for e in self.timeline)

    @property
    def on_demand(self) -> int:
        return sum(e.on_demand for e in self.timeline)


class BlockSwapStats:
    """``model.block_swap_stats``: sizes, and per forward the copy time hidden / exposed.

    Sizes are fixed at enable time. ``steps`` (the last STATS_HISTORY forwards) and
    ``timeline`` are read from the timing events when accessed, which waits for the device.
    """

    def __init__(self, **sizes: Any):
        self.blocks_to_swap: int = sizes["blocks_to_swap"]
        self.prefetch: int = sizes["prefetch"]
        self.swapped: tuple[str, ...] = sizes["swapped"]  # unit names in pinned host memory
        self.num_slots: int = sizes["num_slots"]
        self.slot_bytes: int = sizes["slot_bytes"]
        self.bytes_resident: int = sizes["bytes_resident"]  # weights that stay on the device
        self.bytes_slots: int = self.num_slots * self.slot_bytes
        self.bytes_on_gpu: int = self.bytes_resident + self.bytes_slots
        self.bytes_pinned: int = sizes["bytes_pinned"]  # page-locked host memory (rounding included)
        self.bytes_swapped: int = sizes["bytes_swapped"]  # payload of the swapped tensors
        self.host_memory: str = sizes["host_memory"]
        self.device: str = sizes["device"]
        self._steps: deque[BlockSwapStep] = deque(maxlen=STATS_HISTORY)
        self._flush: Callable[[], None] | None = None

    @property
    def steps(self) -> list[BlockSwapStep]:
        if self._flush is not None:
            self._flush()
        return list(self._steps)

    @property
    def last_step(self) -> BlockSwapStep | None:
        steps = self.steps
        return steps[-1] if steps else None

    @property
    def timeline(self) -> tuple[TimelineEntry, ...]:
        """The last forward's per-unit entries (for a plot)."""
        last = self.last_step
        return last.timeline if last else ()

    @property
    def copy_ms_per_step(self) -> list[float]:
        return [s.copy_ms for s in self.steps]

    @property
    def hidden_ms_per_step(self) -> list[float]:
        return [s.hidden_ms for s in self.steps]

    @property
    def exposed_ms_per_step(self) -> list[float]:
        return [s.exposed_ms for s in self.steps]

    def reset(self) -> None:
        """Forget the recorded forwards."""
        if self._flush is not None:
            self._flush()
        self._steps.clear()

    def summary(self) -> str:
        """A few lines: pinned and on-device sizes, and the last forward's copies (hidden / exposed)."""
        lines = [
            f"block swap on {self.device}: {len(self.swapped)} unit(s) in pinned host memory "
            f"({self.blocks_to_swap} blocks), {_gb(self.bytes_pinned)} pinned ({self.host_memory})",
            f"  on the device: {_gb(self.bytes_on_gpu)} = resident {_gb(self.bytes_resident)} + "
            f"{self.num_slots} slot(s) x {_gb(self.slot_bytes)} (prefetch {self.prefetch})",
        ]
        last = self.last_step
        if last is not None:
            fwd = f"forward {last.forward_ms:.1f} ms, " if last.forward_ms is not None else ""
            lines.append(
                f"  last forward: {fwd}{last.copies} copies ({_gb(last.bytes_copied)}) taking "
                f"{last.copy_ms:.1f} ms: {last.hidden_ms:.1f} ms hidden, {last.exposed_ms:.1f} ms "
                f"exposed, {last.on_demand} on demand"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()

    def plot_timeline(self, ax=None, step: int = -1):
        """Gantt chart of one forward: copy (side stream), wait, compute per unit (matplotlib)."""
        import matplotlib.pyplot as plt

        steps = self.steps
        if not steps:
            raise BlockSwapError("no forward recorded yet: run the model once, then plot")
        entries = steps[step].timeline
        if ax is None:
            _, ax = plt.subplots(figsize=(10, 0.25 * len(entries) + 1.5))
        for row, e in enumerate(entries):
            ax.barh(row - 0.2, e.copy_ms, left=e.copy_start, height=0.35, color="tab:blue")
            ax.barh(row + 0.2, e.exposed_ms, left=e.compute_ready, height=0.35, color="tab:red")
            ax.barh(row + 0.2, e.compute_ms, left=e.compute_start, height=0.35, color="tab:green")
        ax.set_yticks(range(len(entries)), [e.unit for e in entries])
        ax.invert_yaxis()
        ax.set_xlabel("ms from the forward's start")
        ax.set_title("block swap: copy (blue), waiting for the copy (red), compute (green)")
        return ax
