"""The backend registry keyed by AttentionMode.

Availability is decided once per (backend, device) by :func:`.base.check` (needs -> import ->
tiny real call). The result and the loaded :class:`~.base.Kernel` are cached, so dispatch never
probes.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import torch

from ..errors import BackendUnavailableError
from ..options import AttentionMode
from . import base, flash, sdpa  # reset() clears their own caches too
from .base import AttentionBackend, Availability, Kernel


def _collect() -> dict[AttentionMode, AttentionBackend]:
    """Every backend module's ``MODES``: adding a backend is one module (and its option)."""
    found: dict[AttentionMode, AttentionBackend] = {}
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name in ("base", "registry"):
            continue
        module = importlib.import_module(f"{__package__}.{info.name}")
        for mode, backend in getattr(module, "MODES", {}).items():
            if mode in found:
                raise RuntimeError(f"attention mode {mode.value!r} is served by two backend modules")
            found[mode] = backend
    return {mode: found[mode] for mode in AttentionMode if mode in found}  # registry order


BACKENDS: dict[AttentionMode, AttentionBackend] = _collect()

check = base.check  # where it lives: below the backends (flash_attn checks its candidates)


def availability(mode: AttentionMode, device: torch.device) -> Availability:
    """Whether attention ``mode`` can run on ``device``, and if not, why (the checker's answer)."""
    return check(BACKENDS[mode], device)[0]


def kernel_for(backend: AttentionBackend, device: torch.device, where: str = "attention") -> Kernel:
    """The kernel for a device, remembered on the backend (the dispatcher's cache)."""
    found, kernel = check(backend, device)
    if kernel is None:
        raise BackendUnavailableError(
            f"{where}: attention mode {backend.name!r} cannot run on {device}: {found.reason}"
        )
    backend.kernels[device] = kernel
    return kernel


def clear() -> None:
    """Forget every availability result and loaded kernel (after installing a package)."""
    base.clear_checks()
    for backend in (*BACKENDS.values(), *flash.CANDIDATES):
        backend.kernels.clear()
    sdpa.clear_cache()
