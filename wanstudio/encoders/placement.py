"""Encoders on the GPU only while they run: move in, run, move out, with an ordered log.

umT5-XXL (11 GB in bf16), CLIP ViT-H (1.3 GB) and wav2vec2 run once per generation; left on the
GPU they sit beside the DiT through every sampling step. :class:`EncoderPlacement` moves an
encoder's weights to the compute device for one call and back afterwards:

* ``park="cpu"``: the weights are copied back to host memory (pinned when ``pin=True``) and
  the device copy is freed; host memory holds the weights only while they are not on the GPU.
* ``park="free"``: the host copy stays (the master: inference never changes weights), the device
  copy is simply dropped after the call; no device-to-host copy, one host copy all along.

Weights move by re-pointing each parameter's and buffer's ``.data``: the ``nn.Parameter``
objects stay the same, so nothing that holds them (optimisers, hooks, tied weights) notices.
``text_device="cpu"`` keeps the text encoder on the CPU instead (it is then never moved to the
GPU) and moves its output to the compute device.

Every move and call is recorded in :attr:`EncoderPlacement.events`, in order, so a test can
check that each encoder is on the device only while it runs. The copies are made by a
:class:`TensorMover`; tests use one that copies on the CPU.

Works with the wrappers of this package (``TextEncoder``, ``ImageEncoder``, ``AudioEncoder``,
``VAE``: anything with a ``.model`` nn.Module) and with plain nn.Modules.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

PARK_MODES = ("cpu", "free")


@dataclass(frozen=True)
class PlacementEvent:
    """One entry of the log: ``action`` is 'to_device', 'run', 'done', 'to_host' or 'drop'."""

    index: int  # position in the log
    encoder: str  # 'text', 'image', 'audio', 'vae' or the given name
    action: str
    device: str  # where the weights are after the action ('run' / 'done': where it runs)
    nbytes: int  # bytes of parameters and buffers moved (0 for 'run' / 'done')


class TensorMover:
    """How weights travel between the host and the device (one tensor at a time).

    ``pin=True`` puts host copies in page-locked memory (faster, asynchronous uploads); it
    needs CUDA, or a simulated ``backend`` (tests). The masters of ``park='free'`` are packed
    into one page-locked buffer per encoder (:meth:`pack`).
    """

    def __init__(self, device: torch.device | str, *, pin: bool = False, backend=None):
        self.device = torch.device(device)
        self.pin = bool(pin) and (
            backend is not None or (self.device.type == "cuda" and torch.cuda.is_available())
        )
        self._backend = backend  # allocates the page-locked buffers (made on first use on CUDA)
        self._buffers: list = []  # HostBuffers holding masters; they own the page-locking

    def _is_master(self, t: torch.Tensor) -> bool:
        ptr = t.data_ptr()
        return any(b.flat.data_ptr() <= ptr < b.flat.data_ptr() + b.flat.numel() for b in self._buffers)

    def _locked(self, t: torch.Tensor) -> bool:
        """Host tensor ``t`` is page-locked: one of our masters, pinned, or registered by anyone."""
        from ..offload.transfer import is_page_locked

        return t.device.type == "cpu" and (self._is_master(t) or is_page_locked(t))

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of host tensor ``t`` on the device (``t`` itself if it is there already)."""
        return t.to(self.device, non_blocking=self.pin and self._locked(t))

    def pack(self, tensors: list[torch.Tensor]) -> None:
        """Make ``tensors`` (one encoder's parameters and buffers) host masters for
        ``park='free'``, by re-pointing their ``.data``.

        With ``pin``: all in ONE page-locked buffer of their exact size (registered like block
        swap's). Pinning each tensor on its own goes through torch's caching host allocator,
        which rounds every allocation up to a power of two: 2.3 GiB more for umT5-XXL in fp8,
        2.9 GiB with CLIP and wav2vec2. Each original is released as soon as it is copied, before
        the buffer is page-locked, so packing a freshly loaded encoder holds it once, not twice
        (measured: +7.2 GiB host peak for umT5 fp8 when all originals lived until the end).
        Tensors already page-locked (packed earlier, by this mover or another) stay where they are.
        """
        if not self.pin:
            for t in tensors:
                t.data = self.host_master(t.data)
            return
        todo = [t for t in tensors if not self._locked(t.data)]
        if not todo:
            return
        from ..offload.transfer import PLACEMENT_ALIGN, CudaTransferBackend

        offsets, total = [], 0
        for t in todo:
            total = -(-total // PLACEMENT_ALIGN) * PLACEMENT_ALIGN
            offsets.append(total)
            total += t.nbytes

        def fill(flat: torch.Tensor) -> None:
            for t, offset in zip(todo, offsets):
                master = flat[offset : offset + t.nbytes].view(t.dtype).view(t.shape)  # same shape
                t.data = master.copy_(t.data)  # the original's last reference goes here

        if self._backend is None:
            self._backend = CudaTransferBackend(self.device)
        self._buffers.append(self._backend.alloc_host(total, fill=fill))

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy of device tensor ``t`` (pinned when asked)."""
        if t.device.type == "cpu" and (not self.pin or self._locked(t)):
            return t
        if self.pin:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            return host.copy_(t)
        return t.to("cpu")

    def host_master(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` kept as the host master of ``park='free'`` (pinned once, when asked)."""
        if t.device.type != "cpu":
            return self.to_host(t)
        return t.pin_memory() if self.pin and not t.is_pinned() else t


def module_of(encoder: Any) -> nn.Module:
    """The nn.Module an encoder wrapper runs (``encoder.model``), or the module itself."""
    if isinstance(encoder, nn.Module):
        return encoder
    model = getattr(encoder, "model", None)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"cannot place {type(encoder).__name__}: expected an nn.Module or an encoder wrapper "
            f"with a .model nn.Module (TextEncoder, ImageEncoder, AudioEncoder, VAE)"
        )
    return model


def weights_of(module: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of ``module`` once (shared ones once)."""
    seen: set[int] = set()
    out = []
    for t in itertools.chain(module.parameters(), module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _name(encoder: Any) -> str:
    names = {"TextEncoder": "text", "ImageEncoder": "image", "AudioEncoder": "audio", "VAE": "vae"}
    return names.get(type(encoder).__name__, type(encoder).__name__)


def _is_text(encoder: Any) -> bool:
    from .text import TextEncoder

    return isinstance(encoder, TextEncoder)


def move_output(value: Any, device: torch.device) -> Any:
    """Tensors in ``value`` (nested lists / tuples / dicts) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(move_output(v, device) for v in value)
    if isinstance(value, dict):
        return {k: move_output(v, device) for k, v in value.items()}
    return value


class EncoderPlacement:
    """Runs encoders on ``device`` one at a time and parks them on the host in between.

    Args:
        device: the compute device (where the DiT runs).
        park: 'cpu' (copy back to the host after each use) or 'free' (keep the host copy as
            master, drop the device copy); see the module docstring.
        text_device: where the text encoder runs; 'cpu' keeps it there (slower, no device
            memory); None runs it on ``device`` like the others.
        pin: page-locked host copies (CUDA only).
        mover: a :class:`TensorMover` to use instead of the default (tests).

    ``placement.run(encoder, *args)`` calls ``encoder.encode(*args)`` with the encoder on the
    device and returns its output on ``device``; ``with placement.use(encoder):`` does the same
    for any code. ``placement.park(encoder)`` moves one to the host now (after loading).
    """

    def __init__(
        self,
        device: torch.device | str,
        *,
        park: str = "cpu",
        text_device: torch.device | str | None = None,
        pin: bool = False,
        mover: TensorMover | None = None,
    ):
        if park not in PARK_MODES:
            raise ConfigError(f"park must be one of {PARK_MODES}, got {park!r}")
        self.device = torch.device(device)
        self.park_mode = park
        self.text_device = torch.device(text_device) if text_device is not None else None
        self.mover = mover if mover is not None else TensorMover(self.device, pin=pin)
        self.events: list[PlacementEvent] = []

    def _log(self, name: str, action: str, device: torch.device | str, nbytes: int = 0) -> None:
        self.events.append(PlacementEvent(len(self.events), name, action, str(device), nbytes))

    def log(self, encoder: str | None = None) -> list[tuple[str, str]]:
        """(encoder, action) pairs of the log, optionally of one encoder only."""
        return [(e.encoder, e.action) for e in self.events if encoder in (None, e.encoder)]

    def park(self, encoder: Any, *, name: str | None = None) -> None:
        """Move ``encoder``'s weights to host memory now (pinned when asked)."""
        tensors = [t for t in weights_of(module_of(encoder)) if t.device.type != "cpu"]
        if self.park_mode == "free":
            self.mover.pack(tensors)
        else:
            for t in tensors:
                t.data = self.mover.host_master(t.data)
        if tensors:
            self._log(name or _name(encoder), "to_host", "cpu", sum(t.nbytes for t in tensors))

    @contextlib.contextmanager
    def use(self, encoder: Any, *, name: str | None = None) -> Iterator[Any]:
        """``encoder`` with its weights on the device for the duration of the block.

        The text encoder with ``text_device='cpu'`` stays on the CPU (moved there once).
        """
        name = name or _name(encoder)
        module = module_of(encoder)
        if self.text_device is not None and _is_text(encoder):
            where = self.text_device
            moved = [t for t in weights_of(module) if t.device != where]
            for t in moved:
                t.data = t.data.to(where)
            if moved:
                self._log(name, "to_device", where, sum(t.nbytes for t in moved))
            self._log(name, "run", where)
            yield encoder
            self._log(name, "done", where)
            return
        tensors = weights_of(module)
        if self.park_mode == "free":  # pin once; the masters are what the module shows between uses
            self.mover.pack(tensors)
        masters = [t.data for t in tensors] if self.park_mode == "free" else None
        nbytes = sum(t.nbytes for t in tensors)
        try:
            for i, t in enumerate(tensors):
                t.data = self.mover.to_device(masters[i] if masters is not None else t.data)
            self._log(name, "to_device", self.device, nbytes)
            self._log(name, "run", self.device)
            yield encoder
            self._log(name, "done", self.device)
        finally:
            if masters is not None:
                for t, m in zip(tensors, masters):
                    t.data = m  # the device copy goes with its last reference
                self._log(name, "drop", "cpu", nbytes)
            else:
                for t in tensors:
                    t.data = self.mover.to_host(t.data)
                self._log(name, "to_host", "cpu", nbytes)

    def run(self, encoder: Any, *args: Any, method: str = "encode", name: str | None = None, **kwargs: Any):
        """``encoder.<method>(*args, **kwargs)`` on the device; the output moved to ``device``."""
        with self.use(encoder, name=name):
            out = getattr(encoder, method)(*args, **kwargs)
        return move_output(out, self.device)


@contextlib.contextmanager
def on_device(
    encoder: Any,
    device: torch.device | str,
    *,
    park: str = "cpu",
    pin: bool = False,
    placement: EncoderPlacement | None = None,
) -> Iterator[Any]:
    """``with on_device(encoder, 'cuda'):`` encoder on ``device`` inside, parked after.

    A one-off :class:`EncoderPlacement` unless ``placement`` (whose log records it) is given.
    """
    placement = placement or EncoderPlacement(device, park=park, pin=pin)
    with placement.use(encoder) as enc:
        yield enc
