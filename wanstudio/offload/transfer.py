"""Transfer backends: how block swap allocates host masters and device slots, copies and times.

:class:`CudaTransferBackend` is the real device; :class:`FakeTransferBackend` simulates its two
streams on the CPU. :func:`is_page_locked` says whether a host tensor is page-locked as CUDA sees
it (pinned by torch or registered with ``cudaHostRegister``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import glob
import importlib.util
import mmap
import os
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil
import torch

PLACEMENT_ALIGN = 512  # bytes: the CUDA caching allocator's granularity, so >= any resident tensor


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

    def alloc_host(self, nbytes: int, fill: Callable[[torch.Tensor], None] | None = None) -> HostBuffer:
        """A page-locked host buffer of ``nbytes`` (it records how it was pinned).

        ``fill(flat)`` writes the contents; where the backend can, it runs before the pages are
        locked, so they are committed as they are written and the caller's sources can be freed
        one by one. It may be called again on a second buffer if locking the first one fails.
        """
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
        """Whether ``event`` has completed (never blocks)."""
        raise NotImplementedError

    def event_synchronize(self, event: Any) -> None:
        """Block the host until ``event`` has completed."""
        raise NotImplementedError

    def elapsed_ms(self, start: Any, end: Any) -> float:
        """Time between two recorded events, in ms."""
        raise NotImplementedError

    def synchronize(self) -> None:
        """Block the host until all work queued on the device has finished."""
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
    with contextlib.suppress(Exception):  # a sticky CUDA error: unregister all the same
        torch.cuda.synchronize()
    with contextlib.suppress(Exception):  # interpreter shutdown: the driver may be gone already
        torch.cuda.cudart().cudaHostUnregister(ptr)


class _RegistrationFailed(RuntimeError):
    """cudaHostRegister refused the pages, or left them pageable (CudaTransferBackend)."""


# --- is host memory page-locked? ----------------------------------------------------------------
# Tensor.is_pinned() does not see memory registered with cudaHostRegister on every torch version
# (torch 2.11 says False while copies from it run at pinned speed), so CUDA is asked directly.
_CUDA_ERROR_INVALID_VALUE = 1
_CUDA_MEMORY_TYPE_HOST = 1  # cudaMemoryTypeHost: from cudaHostAlloc, or cudaHostRegister'ed
_POINTER_ATTRIBUTES_BYTES = 256  # >= sizeof(cudaPointerAttributes) in every CUDA release


def _cudart_candidates() -> Iterator[str | None]:
    """Where the CUDA runtime may be; the copy torch already loaded comes first."""
    yield None  # the process's global symbols (a runtime loaded with RTLD_GLOBAL)
    try:
        with open("/proc/self/maps") as maps:  # Linux: the shared libraries mapped now
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and os.path.basename(parts[5].strip()).startswith("libcudart"):
                    yield parts[5].strip()
    except OSError:
        pass
    yield from sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libcudart*.so*")))
    spec = importlib.util.find_spec("nvidia")  # the CUDA wheels (nvidia-cuda-runtime-cu12, ...)
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        yield from sorted(glob.glob(os.path.join(root, "*", "lib", "libcudart.so*")))
    name = ctypes.util.find_library("cudart")
    if name:
        yield name


@functools.cache
def _cudart() -> ctypes.CDLL | None:
    """The CUDA runtime through ctypes (torch's bindings lack the pointer queries), or None."""
    seen: set[str | None] = set()
    for where in _cudart_candidates():
        if where in seen:
            continue
        seen.add(where)
        try:
            lib = ctypes.CDLL(where)
        except OSError:
            continue
        if not hasattr(lib, "cudaGetLastError"):
            continue
        lib.cudaGetLastError.restype = ctypes.c_int
        lib.cudaGetLastError.argtypes = []
        if hasattr(lib, "cudaPointerGetAttributes"):
            lib.cudaPointerGetAttributes.restype = ctypes.c_int
            lib.cudaPointerGetAttributes.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
            return lib
        if hasattr(lib, "cudaHostGetFlags"):
            lib.cudaHostGetFlags.restype = ctypes.c_int
            lib.cudaHostGetFlags.argtypes = [ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p]
            return lib
    return None


def _cuda_host_query(ptr: int) -> bool | None:
    """Whether CUDA sees host address ``ptr`` as page-locked; None when CUDA cannot be asked."""
    lib = _cudart()
    if lib is None or not ptr:
        return None
    if hasattr(lib, "cudaPointerGetAttributes"):
        attrs = ctypes.create_string_buffer(_POINTER_ATTRIBUTES_BYTES)
        err = lib.cudaPointerGetAttributes(attrs, ctypes.c_void_p(ptr))
        # `type` is the struct's first field since CUDA 11; unregistered memory is type 0
        locked = err == 0 and ctypes.c_int.from_buffer(attrs).value == _CUDA_MEMORY_TYPE_HOST
    else:
        flags = ctypes.c_uint()
        err = lib.cudaHostGetFlags(ctypes.byref(flags), ctypes.c_void_p(ptr))
        locked = err == 0  # cudaSuccess only for cudaHostAlloc'ed or registered memory
    if err != 0:
        lib.cudaGetLastError()  # clear it, or torch's next launch check would report it
    if err not in (0, _CUDA_ERROR_INVALID_VALUE):
        return None  # no device, driver too old, ...: no answer
    return locked


def is_page_locked(t: torch.Tensor) -> bool:
    """Whether ``t``'s host memory is page-locked for CUDA (host -> device copies by DMA).

    True for memory from ``pin_memory`` / ``cudaHostAlloc`` and for memory registered with
    ``cudaHostRegister`` (which ``Tensor.is_pinned()`` misses on some torch versions: the CUDA
    runtime is asked about the pointer). False for device tensors, and without CUDA.
    """
    if t.device.type != "cpu":
        return False
    if t.is_pinned():
        return True
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return False  # no CUDA context in this process: nothing was registered
    return _cuda_host_query(t.data_ptr()) is True


class CudaTransferBackend(TransferBackend):
    """Copies on a side CUDA stream, ordered with CUDA events.

    Host masters are page-locked with ``cudaHostRegister`` on exact-size (page-rounded)
    buffers. ``torch.empty(..., pin_memory=True)`` would round every buffer up to a power of two
    (a 0.73 GB block would pin 1 GB); it is the fallback when registration is unavailable,
    fails, or leaves memory CUDA does not report as page-locked (asked like :func:`is_page_locked`).
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

    def alloc_host(self, nbytes: int, fill: Callable[[torch.Tensor], None] | None = None) -> HostBuffer:
        if self._register:
            try:
                return self._registered(nbytes, fill)
            except _RegistrationFailed as exc:  # fill's own errors are not this: they propagate
                warnings.warn(
                    f"cudaHostRegister failed ({exc}); falling back to pin_memory, which rounds "
                    "each block's host buffer up to a power of two",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._register = False
                self.host_memory = "pin_memory"
        flat = _aligned_empty(nbytes, "cpu", pin_memory=True)
        if fill is not None:
            fill(flat)
        return HostBuffer(flat, self.host_reserved_bytes(nbytes), "pin_memory")

    def _registered(self, nbytes: int, fill: Callable[[torch.Tensor], None] | None = None) -> HostBuffer:
        page = mmap.PAGESIZE
        size = _align_up(max(nbytes, 1), page)
        # pageable memory from numpy: the tensor's storage keeps the array alive, so the array's
        # death (which runs the finalizer, before numpy frees the memory) is the last view's
        # death — only an explicit buf.release() ends the registration earlier
        array = np.empty(size + page, dtype=np.uint8)
        base = torch.from_numpy(array)
        off = (-base.data_ptr()) % page
        flat = base[off : off + size]
        if fill is not None:  # written while pageable: pages are committed only as they are filled
            fill(flat[:nbytes])
        ptr = flat.data_ptr()
        err = int(torch.cuda.cudart().cudaHostRegister(ptr, size, 1))  # 1: cudaHostRegisterPortable
        if err != 0:
            raise _RegistrationFailed(f"cudaError {err} registering {_gb(size)}")
        if not flat.is_pinned() and _cuda_host_query(ptr) is False:  # None: cannot tell, trust err
            torch.cuda.cudart().cudaHostUnregister(ptr)
            raise _RegistrationFailed(
                f"the {_gb(size)} it registered is not page-locked as CUDA sees it (cudaPointerGetAttributes)"
            )
        buf = HostBuffer(flat[:nbytes], size, "cudaHostRegister")
        buf._finalizer = weakref.finalize(array, _unregister, ptr)  # or earlier, by buf.release()
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
    """An event of :class:`FakeTransferBackend`: its stream, label and virtual time in ms."""

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

    def alloc_host(self, nbytes: int, fill: Callable[[torch.Tensor], None] | None = None) -> HostBuffer:
        self.ops.append(("alloc_host", nbytes))
        flat = _aligned_empty(nbytes, "cpu")
        if fill is not None:
            fill(flat)
        return HostBuffer(flat, nbytes, "simulated")

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
