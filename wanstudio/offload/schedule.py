"""The per-model block swap state (``model._block_swap``): host masters, slots, hooks, stats.

:meth:`_BlockSwap.plan` packs the swapped units into host masters; :meth:`_BlockSwap.activate`
allocates the device slots and installs the hooks that copy each unit in ahead of its use
(the schedule is described in the package docstring).
"""

from __future__ import annotations

import functools
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import layout
from ..errors import BlockSwapError
from .packing import (
    BLOCK_SWAP_CONTRACT,
    _check_no_shared_tensors,
    _check_view,
    _Entry,
    _point,
    _raw_bytes,
    _resident_bytes,
    _signature,
    _unit_entries,
    _view,
)
from .placement import _units
from .stats import BlockSwapStats, BlockSwapStep, TimelineEntry
from .transfer import HostBuffer, TransferBackend, _gb

HOST_HEADROOM_BYTES = 1 << 30  # host memory left free after pinning (the OS, Python, the loader)
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
