"""Block swap: run a DiT whose last N blocks live in pinned host memory.

Semantics are in ``shared/design/MODES.md`` (Block swap). How it is done here:

* **Units.** The swapped units are the last N of ``model.blocks`` plus, when asked,
  ``text_embedding`` and ``img_emb``. Each one is packed once into its own pinned host buffer:
  every parameter and buffer of the unit (whatever the module types: quantized weights, their
  scales, packed fp4 bytes, non-persistent buffers) sits at a 512-byte-aligned offset with its
  shape, dtype and strides. That host copy is the master; nothing is ever copied back.
* **Slots.** On the device a pool of ``min(prefetch + 1, swapped units)`` slots is allocated
  once, each one flat buffer as large as the largest unit. A unit's tensors are views into a
  slot at the offsets of its host buffer, so one copy moves a whole unit and each tensor
  arrives with the layout it had resident, 512-byte aligned like a fresh allocation from the
  CUDA caching allocator. (cuBLASLt's heuristics take pointer alignment into account, up to
  256 bytes: with the same alignment the swapped model gets the same kernels, and the GPU tests
  check that its outputs are bit-identical.)
* **Schedule.** Before unit i runs (forward pre-hook), the swapped units among
  i+1 .. i+prefetch are copied on a side stream; the model's own pre-hook starts units
  0 .. prefetch-1. Compute waits for the copy event of its unit; before a slot is rewritten,
  the copy stream waits for the event recorded when the slot's previous unit finished
  (forward post-hook, which also points the unit's tensors back at the host master). Every
  forward copies every swapped unit once from its host master, so in-place edits of the
  weights between forwards are seen.
* **No trace when off.** :func:`disable_block_swap` removes every hook and puts the weights
  back on the device, each tensor in its own allocation.

The device is behind :class:`TransferBackend`. :class:`CudaTransferBackend` is the real one;
:class:`FakeTransferBackend` simulates the two streams on the CPU with a virtual clock and logs
every operation: the bookkeeping is tested with it, without a GPU.

Loader hook: :func:`swap_placement` says where each tensor of a model goes; a loader that
wants the swapped blocks never to touch the GPU either loads them on the CPU and calls
:func:`enable_block_swap` (it packs them unit by unit, releasing each CPU copy as it goes), or
calls :func:`plan_block_swap` on a meta model first and copies the checkpoint tensors into the
pinned host views in place (no extra host copy at all).
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import operator
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch
from torch import nn

from . import layout
from .errors import BlockSwapError, LayoutError
from .layout import ALIGN_BYTES, LayoutContract, Operand, describe_tensor

__all__ = [
    "BLOCK_SWAP_CONTRACT",
    "BlockSwapPlan",
    "BlockSwapStats",
    "BlockSwapStep",
    "CudaTransferBackend",
    "FakeTransferBackend",
    "HostBuffer",
    "TimelineEntry",
    "TransferBackend",
    "disable_block_swap",
    "enable_block_swap",
    "plan_block_swap",
    "swap_placement",
]

PLACEMENT_ALIGN = 512  # bytes: the CUDA caching allocator's granularity, so >= any resident tensor
HOST_HEADROOM_BYTES = 1 << 30  # host memory left free after pinning (the OS, Python, the loader)
STATS_HISTORY = 1000  # forwards kept in BlockSwapStats.steps
ON_DEVICE = "cuda"
ON_HOST = "cpu_pinned"

# What every swapped tensor must satisfy where it lands (slot view and host master): the
# 16-byte alignment the fp8 / fp4 kernels need. Shape, dtype and strides must equal the
# resident tensor's; that part is checked against the recorded layout (see _check_view).
BLOCK_SWAP_CONTRACT = LayoutContract(
    kernel="block_swap_copy",
    operands=(Operand("swapped", align=ALIGN_BYTES),),
)


# --- small helpers ------------------------------------------------------------------------------
def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if abs(n) >= 1e8 else f"{n / 1e6:.1f} MB"


def _align_up(n: int, a: int = PLACEMENT_ALIGN) -> int:
    return -(-n // a) * a


def _aligned_empty(nbytes: int, device: torch.device | str, pin_memory: bool = False) -> torch.Tensor:
    """A uint8 buffer of ``nbytes`` starting on a PLACEMENT_ALIGN boundary."""
    t = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device, pin_memory=pin_memory)
    if t.data_ptr() % PLACEMENT_ALIGN == 0:
        return t[:nbytes]
    t = torch.empty(nbytes + PLACEMENT_ALIGN, dtype=torch.uint8, device=device, pin_memory=pin_memory)
    off = (-t.data_ptr()) % PLACEMENT_ALIGN
    return t[off : off + nbytes]


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


# --- transfer backends --------------------------------------------------------------------------
@dataclass(eq=False)
class HostBuffer:
    """One unit's host master: a flat uint8 buffer in page-locked memory."""

    flat: torch.Tensor  # uint8 [nbytes], PLACEMENT_ALIGN-aligned
    reserved: int  # bytes actually page-locked (>= nbytes: page or power-of-two rounding)
    method: str  # 'cudaHostRegister' | 'pin_memory' | 'simulated'
    _finalizer: Any = None

    def release(self) -> None:
        """Unpin (the caller has synchronised: no copy may still read the buffer)."""
        if self._finalizer is not None:
            self._finalizer()


class TransferBackend:
    """What block swap needs of a device. Streams are named ``'compute'`` (the current stream
    when the call is made) and ``'copy'`` (a side stream owned by the backend)."""

    device: torch.device
    host_memory: str = ""  # how host masters are page-locked (for the stats)

    def host_available_bytes(self) -> int:
        """Host memory available for pinning now."""
        raise NotImplementedError

    def host_reserved_bytes(self, nbytes: int) -> int:
        """Bytes page-locked for a host buffer of ``nbytes`` (allocator rounding included)."""
        return nbytes

    def alloc_host(self, nbytes: int) -> HostBuffer:
        raise NotImplementedError

    def alloc_slot(self, nbytes: int) -> torch.Tensor:
        """A PLACEMENT_ALIGN-aligned uint8 device buffer, allocated once per slot."""
        raise NotImplementedError

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, note: str) -> None:
        """Host -> device copy of flat uint8 buffers, queued on the copy stream."""
        raise NotImplementedError

    def record(self, stream: str, label: str) -> Any:
        """Record a (timing) event on a stream; ``label`` names it in logs."""
        raise NotImplementedError

    def wait(self, stream: str, event: Any, label: str) -> None:
        """Make later work on ``stream`` wait for ``event``."""
        raise NotImplementedError

    def query(self, event: Any) -> bool:
        raise NotImplementedError

    def event_synchronize(self, event: Any) -> None:
        raise NotImplementedError

    def elapsed_ms(self, start: Any, end: Any) -> float:
        raise NotImplementedError

    def synchronize(self) -> None:
        raise NotImplementedError

    def to_device(self, src: torch.Tensor) -> torch.Tensor:
        """A fresh device allocation holding a copy of the uint8 host bytes ``src``."""
        raise NotImplementedError

    def release_cached(self) -> None:
        """Give memory freed on the device back to the driver (after packing)."""


def _host_register_available() -> bool:
    try:
        cudart = torch.cuda.cudart()
    except Exception:  # noqa: BLE001 - no CUDA runtime bindings in this build
        return False
    return hasattr(cudart, "cudaHostRegister") and hasattr(cudart, "cudaHostUnregister")


def _unregister(ptr: int) -> None:
    try:
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:  # noqa: BLE001 - interpreter shutdown: the driver may be gone already
        pass


class CudaTransferBackend(TransferBackend):
    """Copies on a side CUDA stream, ordered with CUDA events.

    Host masters are page-locked with ``cudaHostRegister`` on exact-size (page-rounded)
    buffers. ``torch.empty(..., pin_memory=True)`` would round every buffer up to a power of two
    (a 0.73 GB block would pin 1 GB); it is the fallback when registration is unavailable.
    """

    def __init__(self, device: torch.device | str = "cuda"):
        device = torch.device(device)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.copy_stream = torch.cuda.Stream(device)
        self._register = _host_register_available()
        self.host_memory = "cudaHostRegister" if self._register else "pin_memory"

    def host_available_bytes(self) -> int:
        return int(psutil.virtual_memory().available)

    def host_reserved_bytes(self, nbytes: int) -> int:
        if self._register:
            return _align_up(max(nbytes, 1), mmap.PAGESIZE)
        return 1 << max(nbytes - 1, 0).bit_length()  # CachingHostAllocator's power-of-two rounding

    def alloc_host(self, nbytes: int) -> HostBuffer:
        if self._register:
            try:
                return self._registered(nbytes)
            except RuntimeError as exc:
                warnings.warn(
                    f"cudaHostRegister failed ({exc}); falling back to pin_memory, which rounds "
                    "each block's host buffer up to a power of two",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._register = False
                self.host_memory = "pin_memory"
        flat = _aligned_empty(nbytes, "cpu", pin_memory=True)
        return HostBuffer(flat, self.host_reserved_bytes(nbytes), "pin_memory")

    def _registered(self, nbytes: int) -> HostBuffer:
        page = mmap.PAGESIZE
        size = _align_up(max(nbytes, 1), page)
        base = torch.empty(size + page, dtype=torch.uint8)  # pageable; registering commits it
        off = (-base.data_ptr()) % page
        flat = base[off : off + size]
        ptr = flat.data_ptr()
        err = int(torch.cuda.cudart().cudaHostRegister(ptr, size, 1))  # 1: cudaHostRegisterPortable
        if err != 0:
            raise RuntimeError(f"cudaError {err} registering {_gb(size)}")
        buf = HostBuffer(flat[:nbytes], size, "cudaHostRegister")
        buf._finalizer = weakref.finalize(buf, _unregister, ptr)
        return buf

    def alloc_slot(self, nbytes: int) -> torch.Tensor:
        return _aligned_empty(nbytes, self.device)

    def _stream(self, stream: str) -> torch.cuda.Stream:
        return self.copy_stream if stream == "copy" else torch.cuda.current_stream(self.device)

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, note: str) -> None:
        with torch.cuda.stream(self.copy_stream):
            dst.copy_(src, non_blocking=True)

    def record(self, stream: str, label: str) -> torch.cuda.Event:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(self._stream(stream))
        return ev

    def wait(self, stream: str, event: torch.cuda.Event, label: str) -> None:
        self._stream(stream).wait_event(event)

    def query(self, event: torch.cuda.Event) -> bool:
        return event.query()

    def event_synchronize(self, event: torch.cuda.Event) -> None:
        event.synchronize()

    def elapsed_ms(self, start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        return start.elapsed_time(end)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def to_device(self, src: torch.Tensor) -> torch.Tensor:
        dst = _aligned_empty(src.numel(), self.device)
        dst.copy_(src, non_blocking=True)  # the caller synchronises before releasing src
        return dst

    def release_cached(self) -> None:
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class FakeEvent:
    stream: str
    label: str
    time_ms: float


class FakeTransferBackend(TransferBackend):
    """A simulated device with two streams, on the CPU, for tests and CPU notebooks.

    Everything stays on the CPU (slots are CPU buffers; copies happen at once), so a model
    runs exactly as on a real device. Time is virtual: each stream has a clock; a copy takes
    ``nbytes / copy_bytes_per_ms``, a swapped unit's compute takes ``compute_ms`` (the clock
    advances when its ``end:`` event is recorded), a wait moves the waiting stream's clock to
    the event's time, and copy-stream work starts no earlier than the compute clock when it is
    issued (the host issues it when the compute stream reaches that point). ``ops`` logs every operation in order:
    ``('alloc_host', nbytes)``, ``('alloc_slot', nbytes)``, ``('copy', note, nbytes)``,
    ``('record', stream, label)``, ``('wait', stream, label)``, ``('sync',)``,
    ``('to_device', nbytes)``; tests may append their own markers.
    """

    host_memory = "simulated"

    def __init__(
        self,
        *,
        host_available: int = 1 << 50,
        copy_bytes_per_ms: float = 1e6,
        compute_ms: float = 1.0,
    ):
        self.device = torch.device("cpu")
        self.host_available = host_available
        self.copy_bytes_per_ms = copy_bytes_per_ms
        self.compute_ms = compute_ms
        self.clock = {"compute": 0.0, "copy": 0.0}
        self.ops: list[tuple] = []

    def host_available_bytes(self) -> int:
        return self.host_available

    def alloc_host(self, nbytes: int) -> HostBuffer:
        self.ops.append(("alloc_host", nbytes))
        return HostBuffer(_aligned_empty(nbytes, "cpu"), nbytes, "simulated")

    def alloc_slot(self, nbytes: int) -> torch.Tensor:
        self.ops.append(("alloc_slot", nbytes))
        return _aligned_empty(nbytes, "cpu")

    def _issue(self, stream: str) -> None:
        if stream == "copy":
            self.clock["copy"] = max(self.clock["copy"], self.clock["compute"])

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, note: str) -> None:
        self.ops.append(("copy", note, src.numel()))
        dst.copy_(src)
        self._issue("copy")
        self.clock["copy"] += src.numel() / self.copy_bytes_per_ms

    def record(self, stream: str, label: str) -> FakeEvent:
        if stream == "compute" and label.startswith("end:"):
            self.clock["compute"] += self.compute_ms
        self._issue(stream)
        self.ops.append(("record", stream, label))
        return FakeEvent(stream, label, self.clock[stream])

    def wait(self, stream: str, event: FakeEvent, label: str) -> None:
        self.ops.append(("wait", stream, label))
        self._issue(stream)
        self.clock[stream] = max(self.clock[stream], event.time_ms)

    def query(self, event: FakeEvent) -> bool:
        return True

    def event_synchronize(self, event: FakeEvent) -> None:
        pass

    def elapsed_ms(self, start: FakeEvent, end: FakeEvent) -> float:
        return end.time_ms - start.time_ms

    def synchronize(self) -> None:
        self.ops.append(("sync",))

    def to_device(self, src: torch.Tensor) -> torch.Tensor:
        self.ops.append(("to_device", src.numel()))
        return _aligned_empty(src.numel(), "cpu").copy_(src)

    def copies(self) -> list[str]:
        """The notes of the copies made so far, in order (``'blocks.1->slot0'``)."""
        return [op[1] for op in self.ops if op[0] == "copy"]


# --- statistics ---------------------------------------------------------------------------------
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


# --- plans --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockSwapPlan:
    """What :func:`plan_block_swap` did: the swapped units and where every tensor lives."""

    blocks_to_swap: int
    swapped: tuple[str, ...]
    placement: Mapping[str, str]  # every parameter / buffer name -> 'cpu_pinned' | 'cuda'
    bytes_pinned: int
    device: torch.device


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise BlockSwapError(f"{what} must be an int, got the bool {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise BlockSwapError(f"{what} must be an int, got {value!r} ({type(value).__name__})") from None
    if n < 0:
        raise BlockSwapError(
            f"{what} must be >= 0, got {n}. Use 0 for no block swap"
            + (" and 1 or more to prefetch ahead" if what == "prefetch" else "")
            + "."
        )
    return n


def _units(
    model: nn.Module, blocks_to_swap: Any, offload_txt_emb: bool, offload_img_emb: bool
) -> list[tuple[str, nn.Module, bool]]:
    """(name, module, swapped) for every unit that takes part, in execution order."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise BlockSwapError(
            f"block swap needs a model with a `blocks` nn.ModuleList (a WanModel); "
            f"{type(model).__name__} has {type(blocks).__name__ if blocks is not None else 'none'}"
        )
    n = _count(blocks_to_swap, "blocks_to_swap")
    if n > len(blocks):
        raise BlockSwapError(
            f"blocks_to_swap={n} is more than the model has: found {len(blocks)} blocks. "
            f"Use 0..{len(blocks)} ({len(blocks)} swaps every block)."
        )
    units: list[tuple[str, nn.Module, bool]] = []
    for flag, name in ((offload_txt_emb, "text_embedding"), (offload_img_emb, "img_emb")):
        if flag:
            mod = getattr(model, name, None)
            if not isinstance(mod, nn.Module):
                raise BlockSwapError(
                    f"offload_{'txt' if name == 'text_embedding' else 'img'}_emb=True, but this "
                    f"model has no {name} (t2v models have no img_emb). Leave the option off."
                )
            units.append((name, mod, True))
    first = len(blocks) - n
    units += [(f"blocks.{i}", b, i >= first) for i, b in enumerate(blocks)]
    return units


def swap_placement(
    model_or_config: Any,
    blocks_to_swap: int,
    *,
    offload_txt_emb: bool = False,
    offload_img_emb: bool = False,
) -> dict[str, str]:
    """Where each tensor lives under block swap: ``{name: 'cpu_pinned' | 'cuda'}``.

    ``model_or_config`` is a model (any device, meta included) or a ``WanConfig``. Names are
    every parameter and buffer name (``named_parameters`` / ``named_buffers``, duplicates
    included), i.e. every state-dict key. 'cuda' stands for the device the model runs on.
    Allocates nothing; validates ``blocks_to_swap`` like :func:`enable_block_swap`.
    """
    from .config import WanConfig

    model = model_or_config
    if isinstance(model_or_config, WanConfig):
        from .model import WanModel

        model = WanModel(model_or_config, device="meta")
    prefixes = tuple(
        name + "."
        for name, _, swapped in _units(model, blocks_to_swap, offload_txt_emb, offload_img_emb)
        if swapped
    )
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in model.named_buffers(remove_duplicate=False)]
    return {n: ON_HOST if n.startswith(prefixes) else ON_DEVICE for n in names}


def _backend_for(model: nn.Module, device: Any, backend: TransferBackend | None) -> TransferBackend:
    if backend is not None:
        return backend
    if device is None:
        found = {t.device for t in model.parameters() if t.device.type not in ("cpu", "meta")}
        if len(found) == 1:
            device = found.pop()
        elif not found:
            where = next((t.device.type for t in model.parameters()), "nowhere")
            if not torch.cuda.is_available():
                raise BlockSwapError(
                    "block swap is meaningless on a CPU-only machine: it moves blocks between host "
                    f"memory and a GPU, and here the weights already live in host memory (model on "
                    f"{where}, no CUDA device found). Nothing to swap to: run without "
                    "blocks_to_swap."
                )
            raise BlockSwapError(
                f"block swap needs the device the model runs on; the model is on {where} and no "
                "device= was given. Pass device='cuda' (the resident part moves there)."
            )
        else:
            raise BlockSwapError(
                f"the model is spread over {sorted(map(str, found))}; pass device= to say where it runs"
            )
    device = torch.device(device)
    if device.type == "cpu":
        raise BlockSwapError(
            "block swap is meaningless on the CPU: it moves blocks between host memory and a GPU, "
            "and on the CPU the weights already live in host memory (device='cpu'). Nothing to "
            "swap to: run without blocks_to_swap, or pass device='cuda'."
        )
    if device.type != "cuda":
        raise BlockSwapError(
            f"block swap streams weights with CUDA streams and events; device {device} is not "
            "supported. Use a CUDA device or run without blocks_to_swap."
        )
    if not torch.cuda.is_available():
        raise BlockSwapError(
            f"device={device} was asked for, but torch finds no CUDA device (torch "
            f"{torch.__version__}). Block swap is meaningless on a CPU-only machine: run without "
            "blocks_to_swap."
        )
    return CudaTransferBackend(device)


# --- the per-model state ------------------------------------------------------------------------
FREE, PENDING, ACTIVE = "free", "pending", "active"


@dataclass(eq=False)
class _Unit:
    index: int
    name: str
    module: nn.Module
    swapped: bool
    entries: list[_Entry] = field(default_factory=list)
    nbytes: int = 0
    signature: tuple = ()
    host: HostBuffer | None = None
    pending: _Slot | None = None
    active: _Slot | None = None


@dataclass(eq=False)
class _Slot:
    index: int
    flat: torch.Tensor
    views: dict[tuple, list[torch.Tensor]]
    state: str = FREE
    unit: int | None = None
    release: Any = None  # compute event after which the slot may be rewritten
    release_label: str = ""  # its label (logs)
    freed_at: int = -1  # order of release, for least-recently-used reuse
    copy: tuple | None = None  # (copy_start event, copy_end event, on_demand)
    ready: Any = None
    start: Any = None


@dataclass(eq=False)
class _StepRecord:
    index: int
    start: Any = None
    end: Any = None
    entries: list[tuple] = field(default_factory=list)
    last_unit: int = -1


class _BlockSwap:
    """``model._block_swap``: host masters (plan) and, once enabled, slots, hooks and stats."""

    def __init__(self, model: nn.Module, backend: TransferBackend):
        self.model_ref = weakref.ref(model)
        self.backend = backend
        self.device = backend.device
        self.units: list[_Unit] = []
        self.blocks_to_swap = 0
        self.flags = (False, False)
        self.prefetch = 0
        self.slots: list[_Slot] = []
        self.handles: list[Any] = []
        self.lookahead: list[tuple[int, ...]] = []
        self.initial: tuple[int, ...] = ()
        self.stats: BlockSwapStats | None = None
        self.epoch: Any = None
        self.step: _StepRecord | None = None
        self.unresolved: deque[_StepRecord] = deque()
        self.steps_seen = 0
        self.release_seq = 0
        self.check_layout = False

    @property
    def swapped(self) -> list[_Unit]:
        return [u for u in self.units if u.swapped]

    # --- planning: host masters -----------------------------------------------------------------
    def plan(self, blocks_to_swap: int, flags: tuple[bool, bool], *, allow_meta: bool) -> None:
        """Put the units of this configuration in pinned host memory, and no other."""
        model = self.model_ref()
        spec = _units(model, blocks_to_swap, *flags)
        old = {u.name: u for u in self.units if u.swapped}
        units = [_Unit(i, name, mod, swapped) for i, (name, mod, swapped) in enumerate(spec)]
        _check_no_shared_tensors(model, {u.name for u in units if u.swapped})
        todo: list[_Unit] = []
        for u in units:
            if not u.swapped:
                continue
            entries, nbytes = _unit_entries(u.name, u.module)
            prev = old.pop(u.name, None)
            if (
                prev is not None
                and _signature(prev.entries) == _signature(entries)
                and all(a.tensor is b.tensor for a, b in zip(prev.entries, entries))
            ):
                u.entries, u.nbytes, u.host = prev.entries, prev.nbytes, prev.host
                self._refresh(u)
            else:
                if prev is not None:  # the unit changed since it was packed (quantized, replaced)
                    self._release_host(prev)
                u.entries, u.nbytes = entries, nbytes
                todo.append(u)
            u.signature = _signature(u.entries)
        for u in todo:
            _check_materialised(u, allow_meta)
        self._check_host_memory(todo)
        for u in todo:
            self._pack(u)
        # units leaving the swap come back to the device after the new ones left it
        for prev in old.values():
            self._restore(prev)
        self.units, self.blocks_to_swap, self.flags = units, blocks_to_swap, flags
        self.backend.release_cached()

    def _check_host_memory(self, todo: list[_Unit]) -> None:
        if not todo:
            return
        need = sum(self.backend.host_reserved_bytes(u.nbytes) for u in todo)
        freed = [
            sum(e.span for e in u.entries if e.tensor.device.type == "cpu") for u in todo
        ]  # pageable CPU copies released as each unit is packed
        peak = need - sum(freed) + max(freed)
        available = self.backend.host_available_bytes()
        if peak + HOST_HEADROOM_BYTES <= available:
            return
        per_unit = max(self.backend.host_reserved_bytes(u.nbytes) for u in todo)
        fits = max(0, (available - HOST_HEADROOM_BYTES + sum(freed)) // per_unit)
        released = f" ({_gb(sum(freed))} of it replaces CPU copies released on the way)" if any(freed) else ""
        raise BlockSwapError(
            f"not enough host memory to pin: block swap needs {_gb(need)} of pinned host memory "
            f"for {len(todo)} unit(s) of up to {_gb(per_unit)}{released}, plus "
            f"{_gb(HOST_HEADROOM_BYTES)} headroom; {_gb(available)} is available "
            f"(psutil.virtual_memory().available). Swap fewer blocks (about {fits} fit), quantize "
            "the model (fp8 halves a block), or free host memory."
        )

    def _pack(self, u: _Unit) -> None:
        """Copy a unit into a new host buffer and point its tensors there."""
        buf = self.backend.alloc_host(u.nbytes)
        with torch.no_grad():
            for e in u.entries:
                host = _view(buf.flat, e.offset, e)
                _check_view(host, e, "host master")
                if e.tensor.device.type != "meta":
                    buf.flat[e.offset : e.offset + e.span].copy_(_raw_bytes(e.tensor, e.span))
                _point(e, host)
                e.host = host
        u.host = buf

    def _refresh(self, u: _Unit) -> None:
        """After a plan, the loader may have replaced tensors' data: copy those into the master."""
        with torch.no_grad():
            for e in u.entries:
                t = e.tensor
                if t.data_ptr() == e.host.data_ptr() and t.device == e.host.device:
                    continue
                if (tuple(t.shape), t.dtype) != (e.shape, e.dtype):
                    raise BlockSwapError(
                        f"{e.name} changed from {e.shape} {e.dtype} to {tuple(t.shape)} {t.dtype} "
                        "after plan_block_swap; load tensors with the planned shapes and dtypes"
                    )
                if t.device.type != "meta":
                    if tuple(t.stride()) == e.stride:  # bytes as they are (any dtype, gaps too)
                        u.host.flat[e.offset : e.offset + e.span].copy_(_raw_bytes(t, e.span))
                    else:
                        e.host.copy_(t)
                _point(e, e.host)

    def _restore(self, u: _Unit) -> None:
        """Put a unit back on the device, each tensor in its own allocation."""
        with torch.no_grad():
            for e in u.entries:
                flat = self.backend.to_device(u.host.flat[e.offset : e.offset + e.span])
                e.tensor.data = _view(flat, 0, e)
                e.host = None
        self.backend.synchronize()
        self._release_host(u)

    def _release_host(self, u: _Unit) -> None:
        if u.host is not None:
            u.host.release()
            u.host = None

    def move_resident(self, *, allow_meta: bool) -> None:
        swapped = {id(e.tensor) for u in self.swapped for e in u.entries}
        model = self.model_ref()
        with torch.no_grad():
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                if id(t) in swapped or t.device == self.device:
                    continue
                if t.device.type == "meta":
                    if allow_meta:
                        continue
                    raise BlockSwapError(
                        f"{name} is still on the meta device: load the weights before enabling "
                        "block swap (or plan_block_swap on the meta model, then load, then enable)"
                    )
                t.data = t.data.to(self.device)

    # --- enabling: slots, hooks, stats ------------------------------------------------------------
    def activate(self, prefetch: int) -> None:
        model = self.model_ref()
        swapped = self.swapped
        n = len(self.units)
        self.prefetch = prefetch
        num_slots = max(1, min(prefetch + 1, len(swapped)))
        slot_bytes = max(u.nbytes for u in swapped)
        layouts = {u.signature: u for u in swapped}
        self.slots = []
        for i in range(num_slots):
            flat = self.backend.alloc_slot(slot_bytes)
            views: dict[tuple, list[torch.Tensor]] = {}
            for sig, u in layouts.items():
                views[sig] = [_view(flat, e.offset, e) for e in u.entries]
                for v, e in zip(views[sig], u.entries):
                    _check_view(v, e, f"slot {i}")
            self.slots.append(_Slot(i, flat, views))
        self.lookahead = [
            tuple(j for j in range(i + 1, min(i + prefetch, n - 1) + 1) if self.units[j].swapped)
            for i in range(n)
        ]
        self.initial = tuple(j for j in range(min(prefetch, n)) if self.units[j].swapped)
        self.handles = [
            model.register_forward_pre_hook(self._on_step_start, prepend=True),
            model.register_forward_hook(self._on_step_end, always_call=True),
        ]
        for u in self.units:
            if u.swapped or self.lookahead[u.index]:
                hook = functools.partial(self._before, u.index)
                self.handles.append(u.module.register_forward_pre_hook(hook, prepend=True))
            if u.swapped:
                hook = functools.partial(self._after, u.index)
                self.handles.append(u.module.register_forward_hook(hook, always_call=True))
        self.epoch = self.backend.record("compute", "epoch")
        swapped_ids = {id(e.tensor) for u in swapped for e in u.entries}
        self.stats = BlockSwapStats(
            blocks_to_swap=self.blocks_to_swap,
            prefetch=prefetch,
            swapped=tuple(u.name for u in swapped),
            num_slots=num_slots,
            slot_bytes=slot_bytes,
            bytes_resident=_resident_bytes(model, swapped_ids),
            bytes_pinned=sum(u.host.reserved for u in swapped),
            bytes_swapped=sum(e.span for u in swapped for e in u.entries),
            host_memory=self.backend.host_memory,
            device=str(self.device),
        )
        self.stats._flush = self.resolve_all

    def deactivate(self) -> None:
        """Remove hooks and slots; the host masters stay (the plan)."""
        for h in self.handles:
            h.remove()
        self.handles = []
        for u in self.units:
            if u.active is not None:
                self._point_host(u)
            u.pending = u.active = None
        self.backend.synchronize()
        self._close_step()
        if self.stats is not None:
            self.resolve_all()
            self.stats._flush = None
        self.slots = []
        self.step = None

    # --- hooks ----------------------------------------------------------------------------------
    def _on_step_start(self, module: nn.Module, args: Any) -> None:
        for u in self.units:  # a forward that raised midway leaves copies nobody will use
            if u.active is not None:
                self._finish(u)
            if u.pending is not None:
                u.pending.state, u.pending.unit, u.pending = FREE, None, None
        self._close_step()
        self.step = _StepRecord(self.steps_seen, start=self.backend.record("compute", "step_start"))
        self.steps_seen += 1
        self.check_layout = layout.strict_enabled() or bool(layout._LISTENERS)
        for j in self.initial:
            if self.units[j].pending is None:
                self._issue(j, on_demand=False)

    def _on_step_end(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.step is not None and self.step.start is not None:
            self.step.end = self.backend.record("compute", "step_end")
            self._close_step()

    def _before(self, i: int, module: nn.Module, args: Any) -> None:
        u = self.units[i]
        if u.swapped:
            if torch.is_grad_enabled() and any(e.tensor.requires_grad for e in u.entries):
                raise BlockSwapError(
                    f"{u.name} is swapped and autograd is on: block swap is for inference (a slot "
                    "is overwritten while autograd would still hold it). Run the model under "
                    "torch.inference_mode() / torch.no_grad(), or model.requires_grad_(False)."
                )
            for e in u.entries:
                self._check_pointing(e)
            for other in self.units:
                if other.active is not None:  # its post-hook never ran (an exception)
                    self._finish(other)
            if self.step is None or i <= self.step.last_unit:
                self._close_step()  # blocks run by hand, without the model's forward
                self.step = _StepRecord(self.steps_seen)
                self.steps_seen += 1
            self.step.last_unit = i
            slot = u.pending if u.pending is not None else self._issue(i, on_demand=True)
            u.pending = None
            tag = f"{u.name}@{slot.index}"
            slot.ready = self.backend.record("compute", f"ready:{tag}")
            self.backend.wait("compute", slot.copy[1], f"copy_end:{tag}")
            slot.start = self.backend.record("compute", f"start:{tag}")
            check = self.check_layout or layout.strict_enabled()
            for e, v in zip(u.entries, slot.views[u.signature]):
                e.tensor.data = v
                if check and e.was_aligned:
                    BLOCK_SWAP_CONTRACT.enforce(e.name, swapped=v)
            slot.state, slot.unit, u.active = ACTIVE, i, slot
        for j in self.lookahead[i]:
            if self.units[j].pending is None:
                self._issue(j, on_demand=False)

    def _after(self, i: int, module: nn.Module, args: Any, output: Any) -> None:
        u = self.units[i]
        if u.active is not None:
            self._finish(u)

    def _finish(self, u: _Unit) -> None:
        slot = u.active
        tag = f"{u.name}@{slot.index}"
        end = self.backend.record("compute", f"end:{tag}")
        self._point_host(u)
        self.release_seq += 1
        slot.release, slot.release_label, slot.freed_at = end, f"end:{tag}", self.release_seq
        slot.state, slot.unit, u.active = FREE, None, None
        if self.step is not None and len(self.step.entries) < 4 * len(self.units):
            c0, c1, on_demand = slot.copy
            self.step.entries.append(
                (u.name, slot.index, u.nbytes, on_demand, c0, c1, slot.ready, slot.start, end)
            )

    def _point_host(self, u: _Unit) -> None:
        for e in u.entries:
            e.tensor.data = e.host

    def _check_pointing(self, e: _Entry) -> None:
        owner, attr, kind = e.owners[0]
        current = (owner._parameters if kind == "param" else owner._buffers).get(attr)
        if current is not e.tensor or e.tensor.data_ptr() != e.host.data_ptr():
            raise BlockSwapError(
                f"{e.name} no longer points at its pinned host copy: the model was moved (.to / "
                ".cuda), reloaded or modified after enable_block_swap. Call "
                "disable_block_swap(model) before changing the model, then enable it again."
            )

    def _issue(self, j: int, *, on_demand: bool) -> _Slot:
        u = self.units[j]
        slot = self._take_slot(j)
        tag = f"{u.name}@{slot.index}"
        if slot.release is not None:
            self.backend.wait("copy", slot.release, slot.release_label)
        c0 = self.backend.record("copy", f"copy_start:{tag}")
        self.backend.copy_async(slot.flat[: u.nbytes], u.host.flat, f"{u.name}->slot{slot.index}")
        c1 = self.backend.record("copy", f"copy_end:{tag}")
        slot.copy = (c0, c1, on_demand)
        slot.state, slot.unit, u.pending = PENDING, j, slot
        return slot

    def _take_slot(self, j: int) -> _Slot:
        free = [s for s in self.slots if s.state == FREE]
        if not free:  # only when units run out of order: drop the copy needed furthest ahead
            pend = [s for s in self.slots if s.state == PENDING]
            victim = max(pend, key=lambda s: (s.unit - j) % len(self.units))
            self.units[victim.unit].pending = None
            victim.state, victim.unit = FREE, None
            free = [victim]
        return min(free, key=lambda s: s.freed_at)

    # --- stats resolution -----------------------------------------------------------------------
    def _close_step(self) -> None:
        if self.step is not None and (self.step.entries or self.step.end is not None):
            self.unresolved.append(self.step)
        self.step = None
        while self.unresolved and self._done(self.unresolved[0]):
            self._resolve(self.unresolved.popleft())
        while len(self.unresolved) > 16:
            rec = self.unresolved.popleft()
            self.backend.event_synchronize(self._last_event(rec))
            self._resolve(rec)

    def _last_event(self, rec: _StepRecord) -> Any:
        return rec.end if rec.end is not None else rec.entries[-1][-1]

    def _done(self, rec: _StepRecord) -> bool:
        return self.backend.query(self._last_event(rec))

    def resolve_all(self) -> None:
        if not self.unresolved:
            return
        self.backend.synchronize()
        while self.unresolved:
            self._resolve(self.unresolved.popleft())

    def _resolve(self, rec: _StepRecord) -> None:
        el = functools.partial(self.backend.elapsed_ms, self.epoch)
        origin = rec.start if rec.start is not None else (rec.entries[0][6] if rec.entries else None)
        if origin is None:
            return
        t0 = el(origin)
        timeline = tuple(
            TimelineEntry(name, slot, nbytes, on_demand, *(el(ev) - t0 for ev in events))
            for name, slot, nbytes, on_demand, *events in rec.entries
        )
        forward = self.backend.elapsed_ms(rec.start, rec.end) if rec.end is not None else None
        if self.stats is not None:
            self.stats._steps.append(BlockSwapStep(rec.index, forward, timeline))


def _check_materialised(u: _Unit, allow_meta: bool) -> None:
    if allow_meta:
        return
    meta = [e.name for e in u.entries if e.tensor.device.type == "meta"]
    if meta:
        raise BlockSwapError(
            f"{u.name} has tensors on the meta device ({meta[0]}, ...): nothing to copy to host "
            "memory. Load the weights first, or call plan_block_swap on the meta model, load "
            "into the planned host tensors in place, then enable_block_swap."
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


# --- public API ---------------------------------------------------------------------------------
def _state(model: nn.Module) -> _BlockSwap | None:
    return model.__dict__.get("_block_swap")


def _get_state(model: nn.Module, device: Any, backend: TransferBackend | None) -> _BlockSwap:
    state = _state(model)
    if state is not None:
        want = (
            backend.device
            if backend is not None
            else (torch.device(device) if device is not None else state.device)
        )
        if (
            want.type != state.device.type
            or (want.index is not None and want.index != state.device.index)
            or (backend is not None and backend is not state.backend)
        ):
            raise BlockSwapError(
                f"block swap is already set up for {state.device}; call "
                "disable_block_swap(model) before moving it to another device or backend"
            )
        return state
    state = _BlockSwap(model, _backend_for(model, device, backend))
    model.__dict__["_block_swap"] = state
    return state


@contextlib.contextmanager
def _rollback(model: nn.Module, state: _BlockSwap) -> Iterator[None]:
    """On an error (checked before anything moves): leave the model as it was."""
    fresh = not state.units
    was_active = bool(state.handles)
    try:
        yield
    except BaseException:
        if fresh:
            model.__dict__.pop("_block_swap", None)
        elif was_active and not state.handles:
            state.activate(state.prefetch)
            model.__dict__["block_swap_stats"] = state.stats
        raise


def plan_block_swap(
    model: nn.Module,
    blocks_to_swap: int,
    *,
    offload_txt_emb: bool = False,
    offload_img_emb: bool = False,
    device: torch.device | str | None = None,
    backend: TransferBackend | None = None,
) -> BlockSwapPlan:
    """Put the swapped units in pinned host memory now; install nothing yet (the loader hook).

    The model may be on the meta device: then the swapped tensors become uninitialised views of
    pinned host memory, and the loader fills them in place (``param.copy_(t)`` under
    ``torch.no_grad()``, or ``load_state_dict`` without ``assign=True``); they never touch the
    device. The loader materialises the other tensors ('cuda' in the placement) on the device,
    then calls :func:`enable_block_swap` with the same ``blocks_to_swap`` / offload options,
    which copies nothing more (tensors the loader replaced instead of filling are copied in).
    Raises BlockSwapError like :func:`enable_block_swap`, host memory check included.
    """
    flags = (bool(offload_txt_emb), bool(offload_img_emb))
    _units(model, blocks_to_swap, *flags)  # validate before touching anything
    state = _get_state(model, device, backend)
    with _rollback(model, state):
        if state.handles:
            state.deactivate()
            model.__dict__.pop("block_swap_stats", None)
        state.plan(operator.index(blocks_to_swap), flags, allow_meta=True)
    return BlockSwapPlan(
        blocks_to_swap=state.blocks_to_swap,
        swapped=tuple(u.name for u in state.swapped),
        placement=swap_placement(model, blocks_to_swap, offload_txt_emb=flags[0], offload_img_emb=flags[1]),
        bytes_pinned=sum(u.host.reserved for u in state.swapped),
        device=state.device,
    )


def enable_block_swap(
    model: nn.Module,
    blocks_to_swap: int,
    *,
    prefetch: int = 1,
    offload_txt_emb: bool = False,
    offload_img_emb: bool = False,
    device: torch.device | str | None = None,
    backend: TransferBackend | None = None,
) -> nn.Module:
    """Keep the last ``blocks_to_swap`` blocks in pinned host memory, stream them in to run.

    Args:
        model: a WanModel (anything with a ``blocks`` nn.ModuleList), on the device, on the CPU,
            or planned with :func:`plan_block_swap`. Apply quantization before this.
        blocks_to_swap: 0 .. num_layers; the last ones are swapped. 0 without offloads is no
            swap at all (any previous swap is disabled).
        prefetch: how many units ahead copies start (0: copy when reached, fully exposed).
        offload_txt_emb / offload_img_emb: also swap ``text_embedding`` / ``img_emb``.
        device: the CUDA device the model runs on (default: where its parameters are).
        backend: a :class:`TransferBackend` to use instead of CUDA (tests: FakeTransferBackend).

    The resident part moves to ``device``. Calling it again with other settings re-plans in
    place (only the units that change sides move). Run the model under
    ``torch.inference_mode()``. Returns the model; ``model.block_swap_stats`` reports.
    """
    flags = (bool(offload_txt_emb), bool(offload_img_emb))
    _units(model, blocks_to_swap, *flags)
    prefetch = _count(prefetch, "prefetch")
    n = operator.index(blocks_to_swap)
    if n == 0 and not any(flags):
        return disable_block_swap(model)
    state = _get_state(model, device, backend)
    with _rollback(model, state):
        if state.handles:
            state.deactivate()
        state.plan(n, flags, allow_meta=False)
        state.move_resident(allow_meta=False)
        state.activate(prefetch)
    model.__dict__["block_swap_stats"] = state.stats
    return model


def disable_block_swap(model: nn.Module) -> nn.Module:
    """Remove block swap: every tensor back on the device (own allocation), no hook left."""
    state = _state(model)
    if state is None:
        return model
    state.deactivate()
    for u in state.swapped:
        state._restore(u)
    state.move_resident(allow_meta=True)
    model.__dict__.pop("_block_swap", None)
    model.__dict__.pop("block_swap_stats", None)
    return model
