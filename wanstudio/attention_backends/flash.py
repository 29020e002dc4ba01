"""FlashAttention 2 (``flash_attn``), 3 (``flash_attn_interface``) and 4 (``flash_attn.cute``).

All three take q / k / v as [B, L, H, D] — the model's layout — so no conversion is needed;
each only needs stride(-1) == 1 (its own ``maybe_contiguous`` would copy otherwise).
``flash_attn`` is the best one that works on the device: FA3 on Hopper, FA4 on Blackwell,
FA2 elsewhere, then the others in turn.
"""

from __future__ import annotations

from ..layout import StrideRule
from ..options import AttentionMode
from . import base
from .base import HALF, AttentionBackend, DeviceInfo, Kernel, Needs, Unavailable, qkv_contract


def _load_fa2(info: DeviceInfo) -> Kernel:
    fa = base.load_module("flash_attn", "pip install flash-attn --no-build-isolation")
    version = str(getattr(fa, "__version__", "?"))
    if not version.startswith("2.") or not hasattr(fa, "flash_attn_func"):
        raise Unavailable(
            f"flash_attn {version} is installed; flash_attn_2 needs FlashAttention 2.x",
            "needs FlashAttention 2.x",
        )
    fn = fa.flash_attn_func

    def run(q, k, v):
        return fn(q, k, v)  # (B, Lq, H, D): FlashAttention's native layout

    return Kernel(run, f"FA2 (flash_attn {version})")


def _load_fa3(info: DeviceInfo) -> Kernel:
    fa3 = base.load_module("flash_attn_interface", "build FlashAttention 3 from flash-attention/hopper")
    fn = fa3.flash_attn_func

    def run(q, k, v):
        out = fn(q, k, v)  # (B, Lq, H, D)
        return out[0] if isinstance(out, tuple) else out  # older FA3 builds also return the LSE

    version = base.package_version("flash_attn_3") or base.package_version("flash-attn-3")
    return Kernel(run, f"FA3 (flash_attn_interface {base.version_text(version)})")


FA4_SDPA_BELOW_KEYS = 64


def _load_fa4(info: DeviceInfo) -> Kernel:
    cute = base.load_module("flash_attn.cute", "pip install flash-attn-4")
    fn = cute.flash_attn_func

    def run(q, k, v):
        out = fn(q, k, v)  # (out [B, Lq, H, D], lse)
        return out[0] if isinstance(out, tuple) else out

    # H200, torch 2.11, flash-attn-4 4.0.0b36: InfiniteTalk's audio attention (32 keys) 0.49 ms
    # in FA4 vs 0.31 ms in SDPA (measured for issue 18; self-attention at L = 32,760: FA4 32.4 ms,
    # cuDNN SDPA 38.5 ms): short key sets go to SDPA
    return Kernel(
        run, f"FA4 (flash_attn.cute {getattr(cute, '__version__', '?')})", sdpa_below_keys=FA4_SDPA_BELOW_KEYS
    )


_CONTRACT = qkv_contract("flash_attn_func", HALF, StrideRule.LAST_DIM_CONTIGUOUS)

FLASH_ATTN_2 = AttentionBackend(
    name="flash_attn_2",
    needs=Needs(min_capability=(8, 0), arch_label="Ampere or newer", max_head_dim=256),
    contract=_CONTRACT,
    load=_load_fa2,
)
FLASH_ATTN_3 = AttentionBackend(
    name="flash_attn_3",
    # Hopper is FA3's target; recent builds also run on Ampere (the probe finds out)
    needs=Needs(min_capability=(8, 0), arch_label="Hopper", max_head_dim=256),
    contract=_CONTRACT,
    load=_load_fa3,
)
FA4 = AttentionBackend(
    name="fa4",
    needs=Needs(min_capability=(8, 0), arch_label="Hopper / Blackwell", max_head_dim=128),
    contract=_CONTRACT,
    load=_load_fa4,
)
CANDIDATES = (FLASH_ATTN_3, FLASH_ATTN_2, FA4)


def _order(info: DeviceInfo) -> tuple[AttentionBackend, ...]:
    major = info.capability[0] if info.capability else 0
    if major == 9:
        return (FLASH_ATTN_3, FA4, FLASH_ATTN_2)
    if major >= 10:  # FA3 has no Blackwell kernels
        return (FA4, FLASH_ATTN_2)
    return (FLASH_ATTN_2, FLASH_ATTN_3, FA4)


def _load_best(info: DeviceInfo) -> Kernel:
    reasons, shorts = [], set()
    for candidate in _order(info):
        found, kernel = base.check(candidate, info.device)
        if kernel is not None:
            return kernel
        reasons.append(f"{candidate.name}: {found.reason}")
        shorts.add(found.short)
    short = shorts.pop() if len(shorts) == 1 else "no FlashAttention works"  # all alike: say it
    raise Unavailable("no FlashAttention works here (" + "; ".join(reasons) + ")", short)


FLASH_ATTN = AttentionBackend(
    name="flash_attn",
    needs=Needs(min_capability=(8, 0), arch_label="Ampere or newer", max_head_dim=256),
    contract=_CONTRACT,
    load=_load_best,
    probe=False,  # the candidate it returns was probed
)

# the modes this module serves: the registry collects every backend module's MODES
MODES = {
    AttentionMode.FLASH_ATTN: FLASH_ATTN,
    AttentionMode.FLASH_ATTN_2: FLASH_ATTN_2,
    AttentionMode.FLASH_ATTN_3: FLASH_ATTN_3,
}
