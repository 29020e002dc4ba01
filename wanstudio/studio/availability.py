"""What runs on this device: every registry mode's :class:`~wanstudio.availability.Availability`
(the kernel it runs, or why it cannot), for the dropdown labels, the load summary and the modes
table. Each answer is decided where the knowledge lives (attention backends, ``quant.spec``)
and carries its own label-sized ``short`` reason.
"""

from __future__ import annotations

import html

import torch

from ..attention import available_attention_modes
from ..availability import NEEDS_CUDA, Availability, too_old
from ..errors import UnsupportedModeError
from ..options import AttentionMode, BasePrecision, QuantMode
from ..quant import kernel_path
from ..quant import spec as quant_spec
from ._format import dtype_name

BF16_MIN_CAPABILITY = (8, 0)  # bfloat16 tensor cores: Ampere and newer


def attention_availability(device: torch.device | str = "cpu") -> dict[AttentionMode, Availability]:
    """Every AttentionMode on ``device``: the kernel it runs, or the reason it cannot."""
    return available_attention_modes(device)


def quant_kernel_path(mode: QuantMode | str, device: torch.device | str = "cpu") -> str:
    """What runs the matmul of a quantization mode on ``device``, as one line: the detail of
    :func:`wanstudio.quant.kernel_path`, the one description of the paths."""
    return kernel_path(mode, device)[1]


def _quant_short(mode: QuantMode) -> str:
    """The label-sized reason ``quant.spec.check_device`` refuses ``mode`` for."""
    if mode in quant_spec.REFUSED:
        return "not implemented"
    if quant_spec.SPECS[mode].needs_fp8_tensor_cores:  # check_device's only device requirement
        return too_old(quant_spec.FP8_MIN_CAPABILITY)
    return "not available here"


def quant_availability(device: torch.device | str = "cpu") -> dict[QuantMode, Availability]:
    """Every QuantMode on ``device``: its kernel path, or why it cannot run (UnsupportedModeError)."""
    device = torch.device(device)
    out = {}
    for mode in QuantMode:
        try:
            quant_spec.check_device(mode, device)
        except UnsupportedModeError as e:
            out[mode] = Availability.refused(_quant_short(mode), str(e))
            continue
        out[mode] = Availability.runs(quant_kernel_path(mode, device))
    return out


def precision_availability(device: torch.device | str = "cpu") -> dict[BasePrecision, Availability]:
    """Every BasePrecision on ``device`` (the checks of ``RuntimeModes.check_device``, and bf16
    on GPUs without bfloat16 support)."""
    device = torch.device(device)
    out = {}
    for p in BasePrecision:
        if p is BasePrecision.FP16_FAST and device.type != "cuda":
            out[p] = Availability.refused(NEEDS_CUDA, "needs a CUDA GPU (fp16 matmul accumulation)")
        elif p is BasePrecision.FP16_FAST and not hasattr(
            torch.backends.cuda.matmul, "allow_fp16_accumulation"
        ):
            out[p] = Availability.refused(
                "needs torch >= 2.7",
                f"needs torch >= 2.7 (allow_fp16_accumulation); this is {torch.__version__}",
            )
        elif p is BasePrecision.BF16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            out[p] = Availability.refused(
                too_old(BF16_MIN_CAPABILITY), "needs an Ampere or newer GPU (compute capability >= 8.0)"
            )
        else:
            out[p] = Availability.runs(f"torch {dtype_name(p.dtype)}")
    return out


def swap_availability(device: torch.device | str = "cpu") -> Availability:
    """Block swap streams blocks from pinned host memory to a GPU: meaningless on the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return Availability.refused(
            NEEDS_CUDA, "needs a CUDA GPU (on the CPU every block is already in host memory)"
        )
    return Availability.runs("pinned host copies, side-stream prefetch")


def default_precision(device: torch.device | str) -> BasePrecision:
    """fp32 on the CPU (the tiny preset's dtype), bf16 on a GPU (what the real weights are)."""
    return BasePrecision.BF16 if torch.device(device).type == "cuda" else BasePrecision.FP32


def default_device() -> str:
    """The first CUDA device if there is one, else the CPU."""
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def modes_table(device: torch.device | str = "cpu") -> str:
    """HTML: every quantization and attention mode on this device — what runs, or why not."""
    rows = []
    for title, statuses in (
        ("quantization", quant_availability(device)),
        ("attention", attention_availability(device)),
    ):
        for mode, s in statuses.items():
            what = (
                html.escape(s.kernel or mode.description)
                if s.available
                else f"<span style='color:#b00'>cannot run: {html.escape(s.reason)}</span>"
            )
            rows.append(f"<tr><td>{title}</td><td><code>{mode.value}</code></td><td>{what}</td></tr>")
    return (
        "<table class='wanstudio-modes'><tr><th>setting</th><th>mode</th>"
        f"<th>on {html.escape(str(device))}</th></tr>{''.join(rows)}</table>"
    )
