"""What ``torch._scaled_mm`` accepts on a device, probed once per (device, weight dtype, output
dtype, bias): the plan the fp8 ``_fast`` layers of ``linear.py`` call it with."""

from __future__ import annotations

import torch

from . import fp8

_F32 = torch.float32


class _MMPlan:
    """How to call ``torch._scaled_mm`` for one (device, weight dtype, activation dtype, bias).

    ``rowwise``: scale_a [M, 1] and scale_b [1, N] go to the GEMM. Otherwise (a torch that
    refuses row-wise scales for this weight dtype) the GEMM runs with unit tensor-wise scales
    and the row / column scales multiply its output afterwards (one more pass over it).
    """

    def __init__(self, rowwise: bool, out_dtype: torch.dtype, bias_in_kernel: bool, note: str = ""):
        self.rowwise, self.out_dtype, self.bias_in_kernel = rowwise, out_dtype, bias_in_kernel
        self.note = note


_PLANS: dict[tuple, _MMPlan | str] = {}
_UNIT_SCALES: dict[str, torch.Tensor] = {}


def unit_scale(device: torch.device) -> torch.Tensor:
    """A cached fp32 scalar 1 on ``device`` (the scales of a tensor-wise ``_scaled_mm``)."""
    key = str(device)
    if key not in _UNIT_SCALES:
        _UNIT_SCALES[key] = torch.ones((), dtype=_F32, device=device)
    return _UNIT_SCALES[key]


def scaled_mm_plan(device: torch.device, w_dtype, out_dtype, has_bias: bool) -> _MMPlan | str:
    """Probe once what this torch / device accepts (host-side checks only, tiny operands); a
    str is the reason nothing works. Preference: row-wise scales with the output in the
    activation dtype and the bias fused; then the bias added after; then a bf16 output cast
    back; then the tensor-wise GEMM with the scales applied to its output."""
    key = (str(device), w_dtype, out_dtype, has_bias)
    if key in _PLANS:
        return _PLANS[key]
    candidates = [(True, out_dtype, has_bias)]
    if has_bias:
        candidates.append((True, out_dtype, False))
    if out_dtype != torch.bfloat16:
        candidates.append((True, torch.bfloat16, False))
    candidates += [(False, out_dtype, False)] + (
        [(False, torch.bfloat16, False)] if out_dtype != torch.bfloat16 else []
    )
    reason = ""
    a = torch.zeros(16, 32, dtype=fp8.ACT_DTYPE, device=device)
    b = torch.zeros(16, 32, dtype=w_dtype, device=device)
    for rowwise, od, fused_bias in candidates:
        if rowwise:
            sa = torch.ones(16, 1, dtype=_F32, device=device)
            sb = torch.ones(1, 16, dtype=_F32, device=device)
        else:
            sa = sb = unit_scale(device)
        try:
            torch._scaled_mm(
                a,
                b.t(),
                scale_a=sa,
                scale_b=sb,
                bias=torch.zeros(16, dtype=od, device=device) if fused_bias else None,
                out_dtype=od,
            )
        except (RuntimeError, NotImplementedError, TypeError, ValueError) as exc:
            reason = reason or str(exc).strip().splitlines()[0]
            continue
        notes = []
        if not rowwise:
            notes.append(
                f"row-wise scales refused here ({reason}): tensor-wise GEMM, "
                "per-token and per-channel scales applied to its output"
            )
        if has_bias and not fused_bias:
            notes.append("bias added after the GEMM")
        if od != out_dtype:
            notes.append(f"{str(od)[6:]} output cast to {str(out_dtype)[6:]}")
        _PLANS[key] = _MMPlan(rowwise, od, fused_bias, "; ".join(notes))
        return _PLANS[key]
    _PLANS[key] = f"torch._scaled_mm rejects {w_dtype} weights here: {reason}"
    return _PLANS[key]
