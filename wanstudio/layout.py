"""Kernel layout contracts and strict mode.

Every kernel wrapper (fp8 ``_scaled_mm``, fp4 paths, attention backends, block-swap copies)
owns a :class:`LayoutContract` saying what it needs of each operand: dtype, stride pattern,
16-byte alignment of ``data_ptr()``, divisibility of dims. The wrapper calls
``contract.enforce(where, x=..., w=...)`` right before launching:

* in strict mode (``with strict_layout():``) any violation raises :class:`LayoutError` naming
  the module, the kernel, the operand, what was required and what was found — *before* the
  launch, so an asynchronous "misaligned address" never happens;
* otherwise a violation that a copy can fix (stride, alignment) is fixed with the one copy it
  needs, counted, and shown by the inspector; violations no copy fixes (dtype, sizes) raise.

Checks read tensor metadata only: no device sync, no ``.item()``.
The inspector (``inspect.py``) subscribes to the events emitted here.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from .errors import LayoutError

ALIGN_BYTES = 16


class StrideRule(Enum):
    ANY = "any"
    CONTIGUOUS = "contiguous"  # C-contiguous, any rank
    LAST_DIM_CONTIGUOUS = "stride(-1) == 1"
    ROW_MAJOR = "row-major 2-D (stride == (cols, 1))"
    COL_MAJOR = "column-major 2-D (stride == (1, rows))"


def is_row_major(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.stride(1) == 1 and t.stride(0) >= max(1, t.shape[1])


def is_col_major(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.stride(0) == 1 and t.stride(1) >= max(1, t.shape[0])


def majorness(t: torch.Tensor) -> str:
    """'row' / 'col' / 'both' / 'strided' for 2-D tensors, '' otherwise."""
    if t.dim() != 2:
        return ""
    row, col = is_row_major(t), is_col_major(t)
    return "both" if row and col else "row" if row else "col" if col else "strided"


def is_aligned(t: torch.Tensor, align: int = ALIGN_BYTES) -> bool:
    """Whether the first element sits on an ``align``-byte boundary (meta tensors: always)."""
    if t.device.type == "meta" or t.numel() == 0:
        return True
    return t.data_ptr() % align == 0


def _stride_ok(t: torch.Tensor, rule: StrideRule) -> bool:
    if rule is StrideRule.ANY:
        return True
    if rule is StrideRule.CONTIGUOUS:
        return t.is_contiguous()
    if rule is StrideRule.LAST_DIM_CONTIGUOUS:
        return t.dim() == 0 or t.stride(-1) == 1 or t.shape[-1] == 1
    if rule is StrideRule.ROW_MAJOR:
        return is_row_major(t)
    return is_col_major(t)


def _fix_stride(t: torch.Tensor, rule: StrideRule) -> torch.Tensor:
    if rule is StrideRule.COL_MAJOR:
        return t.t().contiguous().t()
    return t.contiguous()


@dataclass(frozen=True)
class Operand:
    """What one kernel operand must look like. ``None`` / empty fields are not checked."""

    name: str
    dtypes: tuple[torch.dtype, ...] | None = None
    stride: StrideRule = StrideRule.ANY
    align: int = 0  # required data_ptr alignment in bytes (0 = not checked)
    divisible: tuple[tuple[int, int], ...] = ()  # (dim, multiple) pairs
    ndim: int | None = None
    optional: bool = False  # the wrapper may pass None

    def describe(self) -> str:
        parts = []
        if self.ndim is not None:
            parts.append(f"{self.ndim}-D")
        if self.dtypes:
            parts.append("dtype in {" + ", ".join(str(d).replace("torch.", "") for d in self.dtypes) + "}")
        if self.stride is not StrideRule.ANY:
            parts.append(self.stride.value)
        if self.align:
            parts.append(f"data_ptr % {self.align} == 0")
        for dim, mult in self.divisible:
            parts.append(f"shape[{dim}] % {mult} == 0")
        return ", ".join(parts) or "anything"


@dataclass(frozen=True)
class Violation:
    operand: str
    rule: str  # 'dtype' | 'ndim' | 'divisible' | 'stride' | 'align'
    required: str
    found: str
    fixable: bool  # a copy fixes it

    @property
    def cause(self) -> str:
        return _CAUSES.get(self.rule, "")


_CAUSES = {
    "align": "a view that starts inside a larger storage (a slice of a packed or merged tensor, "
    "a storage offset that is not a multiple of 16 bytes); materialise the tensor once, at "
    "quantize / load time, in its own allocation",
    "stride": "a transpose / permute / slice produced a view the kernel cannot read; for "
    "_scaled_mm store the weight row-major [N, K] and pass weight.t()",
    "dtype": "the tensor was cast (or not cast) on the way here; check the mode's dtypes",
    "divisible": "the kernel needs this dim to be a multiple of 16; use a dequantize path",
    "ndim": "the wrapper received a tensor of the wrong rank",
}


def describe_tensor(t: torch.Tensor) -> str:
    ptr_mod = "n/a" if t.device.type == "meta" else str(t.data_ptr() % ALIGN_BYTES)
    return (
        f"shape {tuple(t.shape)}, stride {tuple(t.stride())}, dtype {str(t.dtype).replace('torch.', '')}, "
        f"storage offset {t.storage_offset()}, data_ptr % 16 = {ptr_mod}, device {t.device}"
    )


@dataclass(frozen=True)
class LayoutContract:
    """A kernel's declared needs, checked by its wrapper before every launch."""

    kernel: str
    operands: tuple[Operand, ...]

    def __post_init__(self) -> None:
        names = [o.name for o in self.operands]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.kernel}: duplicate operand names {names}")

    def operand(self, name: str) -> Operand:
        for op in self.operands:
            if op.name == name:
                return op
        raise KeyError(f"{self.kernel} has no operand {name!r}")

    def violations(self, **tensors: torch.Tensor | None) -> list[Violation]:
        out: list[Violation] = []
        for op in self.operands:
            t = tensors.get(op.name)
            if t is None:
                if not op.optional:
                    out.append(Violation(op.name, "ndim", "a tensor", "None", False))
                continue
            out.extend(_check_operand(op, t))
        return out

    def enforce(self, where: str, **tensors: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
        """Check every operand; raise in strict mode, else copy what a copy fixes.

        Returns the (possibly copied) tensors by operand name, in the given order.
        """
        result: dict[str, torch.Tensor | None] = {}
        strict = strict_enabled()
        for name, t in tensors.items():
            op = self.operand(name)
            if t is None:
                result[name] = None
                continue
            found = _check_operand(op, t)
            copied = False
            if found:
                hard = [v for v in found if not v.fixable]
                if strict or hard:
                    raise LayoutError(self._message(where, op, t, hard or found))
                fixed = t
                if any(v.rule == "stride" for v in found):
                    fixed = _fix_stride(fixed, op.stride)
                if not is_aligned(fixed, op.align or 1):
                    fixed = fixed.clone()  # a fresh allocation is aligned
                copied = True
                COPY_COUNTS[(where, self.kernel, name)] += 1
            if _LISTENERS:
                for listener in list(_LISTENERS):
                    listener(KernelOperandEvent(where, self.kernel, op, t, tuple(found), copied))
            result[name] = fixed if copied else t
        return result

    def _message(self, where: str, op: Operand, t: torch.Tensor, found: list[Violation]) -> str:
        lines = [
            f"{where}: kernel {self.kernel}, operand {op.name!r} violates its layout contract.",
            f"  required: {op.describe()}",
            f"  found:    {describe_tensor(t)}",
        ]
        for v in found:
            lines.append(f"  - {v.rule}: required {v.required}, found {v.found}")
        causes = {v.cause for v in found if v.cause}
        if causes:
            lines.append("  likely cause: " + "; ".join(sorted(causes)))
        return "\n".join(lines)


def _check_operand(op: Operand, t: torch.Tensor) -> list[Violation]:
    out: list[Violation] = []
    if op.ndim is not None and t.dim() != op.ndim:
        out.append(Violation(op.name, "ndim", f"{op.ndim}-D", f"{t.dim()}-D", False))
        return out
    if op.dtypes and t.dtype not in op.dtypes:
        req = "{" + ", ".join(str(d) for d in op.dtypes) + "}"
        out.append(Violation(op.name, "dtype", req, str(t.dtype), False))
    for dim, mult in op.divisible:
        if t.dim() > abs(dim) - (dim < 0) and t.shape[dim] % mult:
            out.append(
                Violation(op.name, "divisible", f"shape[{dim}] % {mult} == 0", str(t.shape[dim]), False)
            )
    if not _stride_ok(t, op.stride):
        out.append(Violation(op.name, "stride", op.stride.value, f"stride {tuple(t.stride())}", True))
    if op.align and not is_aligned(t, op.align):
        out.append(
            Violation(
                op.name, "align", f"data_ptr % {op.align} == 0",
                f"data_ptr % {op.align} = {t.data_ptr() % op.align} "
                f"(storage offset {t.storage_offset()})", True,
            )
        )
    return out


# --- strict mode -----------------------------------------------------------------------------
# A process-wide depth counter rather than a ContextVar: generation runs in a worker thread
# (the notebook panel), and a strict block opened in the notebook must cover it.
_strict_lock = threading.Lock()
_strict_depth = 0


def strict_enabled() -> bool:
    return _strict_depth > 0


@contextmanager
def strict_layout(enabled: bool = True) -> Iterator[None]:
    """Within this block a violated contract raises LayoutError before the kernel launches."""
    global _strict_depth
    if not enabled:
        yield
        return
    with _strict_lock:
        _strict_depth += 1
    try:
        yield
    finally:
        with _strict_lock:
            _strict_depth -= 1


# --- events for the inspector ------------------------------------------------------------------
@dataclass
class KernelOperandEvent:
    where: str
    kernel: str
    operand: Operand
    tensor: torch.Tensor
    violations: tuple[Violation, ...]
    copied: bool


_LISTENERS: list[Callable[[KernelOperandEvent], None]] = []
COPY_COUNTS: Counter = Counter()  # (where, kernel, operand) -> copies made outside strict mode


@contextmanager
def listen(listener: Callable[[KernelOperandEvent], None]) -> Iterator[None]:
    """Receive every contract check made inside the block (used by the inspector)."""
    _LISTENERS.append(listener)
    try:
        yield
    finally:
        _LISTENERS.remove(listener)


# --- module names ------------------------------------------------------------------------------
def assign_layout_names(model: nn.Module, prefix: str = "") -> None:
    """Give every submodule its qualified name, so kernel wrappers can say where they are."""
    for name, module in model.named_modules(prefix=prefix):
        module._layout_name = name or type(module).__name__


def layout_name(module: nn.Module) -> str:
    return getattr(module, "_layout_name", type(module).__name__)
