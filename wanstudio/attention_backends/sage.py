"""SageAttention: ``sageattn`` (INT8 QK), SageAttention3 (FP4, Blackwell) and the INT8-QK /
FP8-PV kernel (sageattention's own, or wanstudio's Triton one where sageattention >= 2 is missing).

Facts about the packages that shape these wrappers (read from their sources):

* sageattention 1.x (PyPI 1.0.6, Triton only) smooths k *in place* (``k -= k.mean(...)``);
  SageAttention3's ``sageattn3_blackwell`` does the same. The wrappers hand those kernels a
  centred copy of k, so the caller's tensor is never written.
* sageattention 1.x's Triton kernel loads a partial last block of 64 keys with a mask but
  does not mask the scores: each missing key scores 0 against (mean-centred) keys and
  dilutes the softmax, by at most missing / Lk. For 32 760 keys that is 8 / 32 760 (0.02 %,
  far below the kernel's own 1.4 %); for 257 image tokens 25 %, for 32 audio tokens 100 %.
  Calls where it can exceed 0.5 % are outside the kernel's domain (``Kernel.key_block``)
  and run SDPA. Fixed in sageattention 2.2's Triton kernel; 2.x's CUDA kernels mask.
* ``sageattn`` and the 8-bit kernels take ``tensor_layout="NHD"`` ([B, L, H, D], no transpose)
  and need stride(-1) == 1; SageAttention3 takes [B, H, L, D] only and copies what it needs.
"""

from __future__ import annotations

from ..layout import StrideRule
from ..options import AttentionMode
from . import base
from .base import HALF, AttentionBackend, DeviceInfo, Kernel, Needs, Unavailable, qkv_contract

_SAGE_INSTALL = "pip install sageattention"
_SAGE3_INSTALL = "build it from SageAttention/sageattention3_blackwell"


def _centred(k):
    return k - k.mean(dim=1, keepdim=True)  # (B, Lk, H, D), a new tensor


def _load_sageattn(info: DeviceInfo) -> Kernel:
    sage = base.load_module("sageattention", _SAGE_INSTALL)
    version = base.package_version("sageattention") or (0,)
    fn = sage.sageattn
    if version < (2,):

        def run(q, k, v):
            # 1.x would centre the caller's k in place: centre a copy, switch its own off
            return fn(q, _centred(k), v, tensor_layout="NHD", is_causal=False, smooth_k=False)

    else:

        def run(q, k, v):
            return fn(q, k, v, tensor_layout="NHD", is_causal=False)  # (B, Lq, H, D)

    triton = version < (2,) or (version < (2, 2) and info.capability == (8, 6))
    label = f"sageattention {base.version_text(version)} ({'Triton' if triton else 'CUDA'})"
    if not triton:
        return Kernel(run, label)
    return Kernel(
        run,
        label,
        key_block=64,
        max_key_padding=0.005,
        key_rule=(
            f"sageattention {base.version_text(version)}'s Triton kernel does not mask a partial "
            "block of 64 keys: the missing keys dilute the softmax by up to missing / keys, "
            "more than 0.5 % for short key sets (image and audio tokens)"
        ),
    )


def _load_sage3(per_block_mean: bool):
    def load(info: DeviceInfo) -> Kernel:
        sage3 = base.load_module("sageattn3", _SAGE3_INSTALL)
        fn = sage3.sageattn3_blackwell

        def run(q, k, v):
            qh, vh = q.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, D) views
            kh = _centred(k).transpose(1, 2)  # its kernel centres k in place: give it a copy
            out = fn(qh, kh, vh, is_causal=False, per_block_mean=per_block_mean)  # (B, H, Lq, D)
            return out.transpose(1, 2)  # (B, Lq, H, D)

        smoothing = "per-block mean smoothing" if per_block_mean else "no smoothing"
        version = base.version_text(base.package_version("sageattn3"))
        return Kernel(run, f"SageAttention3 FP4 {version} ({smoothing})")

    return load


def _load_sage_fp8(info: DeviceInfo) -> Kernel:
    """SageAttention's own INT8-QK / FP8-PV CUDA kernel when sageattention >= 2 is installed (the
    upstream kernel, tuned per architecture); else wanstudio's Triton kernel of the same recipe
    (:mod:`.fp8_triton`), which needs only Triton."""
    try:
        return _load_sageattention_fp8(info)
    except Unavailable as upstream:
        why_not_upstream = upstream.short
        try:
            base.load_module("triton", "pip install triton")
        except Unavailable as no_triton:
            raise Unavailable(
                f"{upstream}; wanstudio's own FP8 kernel needs Triton: {no_triton}", upstream.short
            ) from None
    from .fp8_triton import fp8_attention

    return Kernel(
        fp8_attention,
        f"wanstudio FP8 attention (Triton: INT8 QK, FP8 PV; SageAttention's kernel: {why_not_upstream})",
        # text (512), image (257) and audio (32) keys stay exact in SDPA: a small share of the
        # time, and the FP8 kernel's speed there is not measured
        sdpa_below_keys=FP8_SDPA_BELOW_KEYS,
    )


FP8_SDPA_BELOW_KEYS = 1024


def _load_sageattention_fp8(info: DeviceInfo) -> Kernel:
    sage = base.load_module("sageattention", _SAGE_INSTALL)
    version = base.package_version("sageattention") or (0,)
    if version < (2,):
        raise Unavailable(
            f"sageattention {base.version_text(version)} is installed (Triton only); "
            "sageattn_3_fp8 needs sageattention >= 2, whose CUDA kernels are built from source",
            "needs sageattention >= 2",
        )
    name = "sageattn_qk_int8_pv_fp8_cuda"
    kwargs = dict(tensor_layout="NHD", is_causal=False, pv_accum_dtype="fp32+fp32")
    if info.capability[0] == 9:
        name += "_sm90"  # Hopper's own kernel (it supports only fp32+fp32 accumulation)
    elif info.capability[0] == 12:
        kwargs["qk_quant_gran"] = "per_warp"  # as sageattn itself does on sm120
    fn = getattr(sage, name, None)
    if fn is None:
        try:
            fn = getattr(base.import_module("sageattention.core"), name, None)
        except ImportError:
            fn = None
    if fn is None:
        raise Unavailable(
            f"sageattention {base.version_text(version)} has no {name}", "kernel missing in this build"
        )

    def run(q, k, v):
        return fn(q, k, v, **kwargs)  # (B, Lq, H, D)

    return Kernel(run, f"sageattention {base.version_text(version)} {name} (INT8 QK, FP8 PV)")


_NHD_CONTRACT = qkv_contract("sageattn", HALF, StrideRule.LAST_DIM_CONTIGUOUS)
_BLACKWELL = Needs(capabilities=((10, 0), (12, 0), (12, 1)), arch_label="Blackwell", max_head_dim=128)

SAGEATTN = AttentionBackend(
    name="sageattn",
    needs=Needs(min_capability=(8, 0), arch_label="Ampere or newer", head_dims=(64, 96, 128)),
    contract=_NHD_CONTRACT,
    load=_load_sageattn,
    rel_tol=0.03,  # docs/MODES.md: 1.4 % at Wan-14B shapes (sageattention 1.0.6, H200)
)
SAGEATTN_3 = AttentionBackend(
    name="sageattn_3",
    needs=_BLACKWELL,
    # the kernel transposes and pads to 128 itself: any strides will do
    contract=qkv_contract("sageattn3_blackwell", HALF, StrideRule.ANY),
    load=_load_sage3(per_block_mean=True),
    rel_tol=0.15,  # FP4 P and V; not yet measured on a Blackwell card
)
SAGEATTN_3_FP4 = AttentionBackend(
    name="sageattn_3_fp4",
    needs=_BLACKWELL,
    contract=qkv_contract("sageattn3_blackwell", HALF, StrideRule.ANY),
    load=_load_sage3(per_block_mean=False),
    rel_tol=0.15,
)
SAGEATTN_3_FP8 = AttentionBackend(
    name="sageattn_3_fp8",
    # head dims 64 / 128: our kernel's; SageAttention's own pads any D <= 128, but one rule per mode
    needs=Needs(min_capability=(8, 9), arch_label="Ada / Hopper or newer", head_dims=(64, 128)),
    contract=qkv_contract("sageattn_qk_int8_pv_fp8_cuda", HALF, StrideRule.LAST_DIM_CONTIGUOUS),
    load=_load_sage_fp8,
    rel_tol=0.05,  # FP8 P and V: ~3.5 % on zero-mean random V, 0.17 % on Wan-like inputs (H200)
)

# the modes this module serves: the registry collects every backend module's MODES
MODES = {
    AttentionMode.SAGEATTN: SAGEATTN,
    AttentionMode.SAGEATTN_3: SAGEATTN_3,
    AttentionMode.SAGEATTN_3_FP4: SAGEATTN_3_FP4,
    AttentionMode.SAGEATTN_3_FP8: SAGEATTN_3_FP8,
}
