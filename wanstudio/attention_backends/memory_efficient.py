"""xformers ``memory_efficient_attention``.

A wheel built for another torch imports fine but loads no kernels (docs/MODES.md: xformers 0.0.35
under torch 2.11), and then fails at the first call with "No operator found": the probe's
tiny call finds this, and the reason quotes xformers' own build metadata.
"""

from __future__ import annotations

import torch

from ..layout import StrideRule
from ..options import AttentionMode
from . import base
from .base import AttentionBackend, DeviceInfo, Kernel, Needs, qkv_contract

_DTYPES = (*base.HALF, torch.float32)


def _load(info: DeviceInfo) -> Kernel:
    base.load_module("xformers", "pip install xformers (a wheel built for this torch)")
    ops = base.load_module("xformers.ops", "pip install xformers")
    fn = ops.memory_efficient_attention

    def run(q, k, v):
        return fn(q, k, v)  # (B, Lq, H, D): xformers' BMHK layout is the model's

    version = base.version_text(base.package_version("xformers"))
    return Kernel(run, f"xformers {version} memory_efficient_attention")


def _diagnose() -> str:
    """xformers' own account of why its C++/CUDA library did not load, if it has one."""
    try:
        cpp = base.import_module("xformers._cpp_lib")
    except Exception:
        return ""
    error = getattr(cpp, "_cpp_library_load_exception", None)
    if error is None:
        return ""
    return " ".join(str(error).split())  # one line: "xFormers was built for: PyTorch 2.10 ..."


XFORMERS = AttentionBackend(
    name="xformers",
    needs=Needs(min_capability=(5, 0), dtypes=_DTYPES),
    contract=qkv_contract("memory_efficient_attention", _DTYPES, StrideRule.LAST_DIM_CONTIGUOUS),
    load=_load,
    diagnose=_diagnose,
)

# the modes this module serves: the registry collects every backend module's MODES
MODES = {AttentionMode.XFORMERS: XFORMERS}
