"""Live-tensor byte tracking for memory tests: the activation peak of a computation, on any device.

:class:`PeakBytes` is a ``TorchDispatchMode`` that counts the bytes of every storage an op
creates while it is alive (a storage is freed when the last tensor object viewing it dies), and
keeps the maximum. Tensors that existed before (weights, inputs) are not counted: the peak is
the extra working set of the computation. It runs on the ``meta`` device too, so the peak of a
real-size model at a real resolution is measured in milliseconds, without its memory; allocator
rounding, workspaces and fragmentation are not seen (the GPU benchmark measures those).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakBytes(TorchDispatchMode):
    """``with PeakBytes() as m: fn()`` then ``m.peak`` (bytes) and ``m.live`` (still held)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list[int]] = {}  # storage id -> [tensor objects alive, nbytes]

    def _release(self, key: int) -> None:
        entry = self._refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._refs[key]

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        entry = self._refs.get(key)
        if entry is None:
            entry = self._refs[key] = [0, storage.nbytes()]
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        given = [x for x in tree_flatten((args, kwargs or {}))[0] if isinstance(x, torch.Tensor)]
        # storages the op did not create (in-place results, views of weights and inputs): a view
        # of a tracked storage adds a reference to it; one of an untracked storage is not ours
        external = {x.untyped_storage()._cdata for x in given} - self._refs.keys()
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in external:
                self._track(t)
        return out
