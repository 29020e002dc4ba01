"""torch scaled_dot_product_attention, with a measured kernel preference on CUDA.

SDPA has several kernels (cuDNN, flash, memory-efficient, math) and picks one per call. Where
we measured that its pick is not the fastest for Wan's shapes, an :class:`SdpaRule` reorders
them with ``torch.nn.attention.sdpa_kernel(..., set_priority=True)``; elsewhere torch's own
order stands. :func:`kernel_choice` says which kernel a call will use.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..layout import StrideRule
from ..options import AttentionMode
from .base import FLOATS, HALF, AttentionBackend, DeviceInfo, Kernel, Needs, qkv_contract

# torch < 2.6 cannot order the kernels, only enable them: keep its default order there
_HAS_SET_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters

KERNEL_NAMES = {
    SDPBackend.CUDNN_ATTENTION: "cudnn",
    SDPBackend.FLASH_ATTENTION: "flash",
    SDPBackend.EFFICIENT_ATTENTION: "efficient",
    SDPBackend.MATH: "math",
}


@dataclass(frozen=True)
class SdpaRule:
    """On these GPUs, dtypes and head dims, try SDPA's kernels in ``order`` (a measured fact)."""

    arch_majors: tuple[int, ...]  # compute-capability majors the measurement covers
    dtypes: tuple[torch.dtype, ...]
    max_head_dim: int  # cuDNN's attention kernels take head dims up to 128
    order: tuple[SDPBackend, ...]
    evidence: str

    def applies(self, capability: tuple[int, int], dtype: torch.dtype, head_dim: int) -> bool:
        """Whether this rule covers a GPU of ``capability`` with this dtype and head dim."""
        return capability[0] in self.arch_majors and dtype in self.dtypes and head_dim <= self.max_head_dim


SDPA_RULES: tuple[SdpaRule, ...] = (
    SdpaRule(
        arch_majors=(9,),  # Hopper (H100 / H200); other archs are not measured: torch's order
        dtypes=HALF,
        max_head_dim=128,
        order=(
            SDPBackend.CUDNN_ATTENTION,
            SDPBackend.FLASH_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION,
            SDPBackend.MATH,
        ),
        evidence=(
            "H200, torch 2.11, bf16, B=1, L=32760, H=40, D=128: cuDNN 37.9 ms (580 TFLOP/s), "
            "flash 59.8 ms (368), efficient 120.6 ms (182); benchmarks/bench_attention.py "
            "re-measures it"
        ),
    ),
)

_ORDERS: dict[tuple[torch.device, torch.dtype, int], tuple[SDPBackend, ...] | None] = {}


def kernel_order(q: torch.Tensor) -> tuple[SDPBackend, ...] | None:
    """The preference order our rules give for q's device / dtype / head dim (None: torch's)."""
    key = (q.device, q.dtype, q.shape[-1])
    try:
        return _ORDERS[key]
    except KeyError:
        pass
    order = None
    if q.device.type == "cuda" and _HAS_SET_PRIORITY:
        capability = tuple(torch.cuda.get_device_capability(q.device))
        rule = next((r for r in SDPA_RULES if r.applies(capability, q.dtype, q.shape[-1])), None)
        order = rule.order if rule else None
    _ORDERS[key] = order
    return order


def clear_cache() -> None:
    """Forget the per-(device, dtype, head dim) orders :func:`kernel_order` remembered."""
    _ORDERS.clear()


def _preference(order: tuple[SDPBackend, ...] | None):
    return nullcontext() if order is None else sdpa_kernel(list(order), set_priority=True)


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [B, Lq, H, D], k / v [B, Lk, H, D] -> [B, Lq, H, D]."""
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, D) views
    order = kernel_order(q) if q.is_cuda else None
    if order is None:
        out = F.scaled_dot_product_attention(qh, kh, vh)
    else:
        with _preference(order):
            out = F.scaled_dot_product_attention(qh, kh, vh)
    return out.transpose(1, 2)  # (B, Lq, H, D)


def kernel_choice(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """Which SDPA kernel :func:`run` will use for these [B, L, H, D] tensors.

    One of ``"cudnn"``, ``"flash"``, ``"efficient"``, ``"math"`` (on the CPU, ``"flash"`` is
    torch's CPU flash kernel), as torch itself decides it under our preference order.
    """
    choose = getattr(torch, "_fused_sdp_choice", None)
    if choose is None:
        return "unknown (this torch does not expose its choice)"
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, D)
    with _preference(kernel_order(q) if q.is_cuda else None):
        index = choose(qh, kh, vh)
    backend = SDPBackend(index)
    return KERNEL_NAMES.get(backend, backend.name.lower())


def _load(info: DeviceInfo) -> Kernel:
    if info.device.type != "cuda":
        return Kernel(run, f"torch SDPA on {info.device.type}")
    if _HAS_SET_PRIORITY and any(info.capability and info.capability[0] in r.arch_majors for r in SDPA_RULES):
        return Kernel(run, "torch SDPA (cuDNN first for fp16/bf16, head dim <= 128: measured)")
    return Kernel(run, "torch SDPA (torch's kernel order)")


SDPA = AttentionBackend(
    name="sdpa",
    needs=Needs(cuda=False, dtypes=FLOATS),
    # SDPA's fused kernels read each head's D values contiguously; torch would otherwise copy
    # silently, so the contract copies (counted, visible in the inspector) instead
    contract=qkv_contract("torch.sdpa", FLOATS, StrideRule.LAST_DIM_CONTIGUOUS),
    load=_load,
    probe=False,  # part of torch
    rel_tol=0.01,
)

# the modes this module serves: the registry collects every backend module's MODES
MODES = {AttentionMode.SDPA: SDPA}
