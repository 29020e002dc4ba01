"""The backend registry keyed by AttentionMode.

Availability is decided once per (backend, device) by :func:`.base.check` (needs -> import ->
tiny real call). The result and the loaded :class:`~.base.Kernel` are cached, so dispatch never
probes.
"""

from __future__ import annotations

import torch

from ..errors import BackendUnavailableError
from ..options import AttentionMode
from . import base, flash, memory_efficient, sage, sdpa
from .base import AttentionBackend, Availability, Kernel

BACKENDS: dict[AttentionMode, AttentionBackend] = {
    AttentionMode.SDPA: sdpa.SDPA,
    AttentionMode.FLASH_ATTN: flash.FLASH_ATTN,
    AttentionMode.FLASH_ATTN_2: flash.FLASH_ATTN_2,
    AttentionMode.FLASH_ATTN_3: flash.FLASH_ATTN_3,
    AttentionMode.SAGEATTN: sage.SAGEATTN,
    AttentionMode.SAGEATTN_3: sage.SAGEATTN_3,
    AttentionMode.SAGEATTN_3_FP4: sage.SAGEATTN_3_FP4,
    AttentionMode.SAGEATTN_3_FP8: sage.SAGEATTN_3_FP8,
    AttentionMode.XFORMERS: memory_efficient.XFORMERS,
}

check = base.check  # where it lives: below the backends (flash_attn checks its candidates)


def availability(mode: AttentionMode, device: torch.device) -> Availability:
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
