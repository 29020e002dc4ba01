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
The inspector (``inspector.py``) subscribes to the events emitted here (:func:`listen`).
``set_strict_layout(model)`` makes every forward of a model run in strict mode.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from enum import Enum

import torch
from torch import nn

from .errors import LayoutError

ALIGN_BYTES = 16


class StrideRule(Enum):
    """What an operand's strides must satisfy (the value is how messages name the rule)."""

    ANY = "any"
    CONTIGUOUS = "contiguous"  # C-contiguous, any rank
    LAST_DIM_CONTIGUOUS = "stride(-1) == 1"
    ROW_MAJOR = "row-major 2-D (stride == (cols, 1))"
    COL_MAJOR = "column-major 2-D (stride == (1, rows))"


def is_row_major(t: torch.Tensor) -> bool:
    """2-D with stride(1) == 1 and stride(0) >= cols (padded rows allowed)."""
    return t.dim() == 2 and t.stride(1) == 1 and t.stride(0) >= max(1, t.shape[1])


def is_col_major(t: torch.Tensor) -> bool:
    """2-D with stride(0) == 1 and stride(1) >= rows (padded columns allowed)."""
    return t.dim() == 2 and t.stride(0) == 1 and t.stride(1) >= max(1, t.shape[0])


def majorness(t: torch.Tensor) -> str:
    """'row' / 'col' / 'both' / 'strided' for 2-D tensors, '' otherwise."""
    if t.dim() != 2:
        return ""
    row, col = is_row_major(t), is_col_major(t)
    return "both" if row and col else "row" if row else "col" if col else "strided"


def is_aligned(t: torch.Tensor, align: int = ALIGN_BYTES) -> bool:
    """Whether the first element sits on an ``align``-byte boundary (meta tensors: always)."""
    if t.is_meta or t.numel() == 0:
        return True
    return t.data_ptr() % align == 0


def _stride_ok(t: torch.Tensor, rule: StrideRule) -> bool:
    if rule is StrideRule.ANY:
        return True
    if rule is StrideRule.CONTIGUOUS:
        return t.is_contiguous()
    shape, st = t.shape, t.stride()  # one call each: this runs before every kernel launch
    if rule is StrideRule.LAST_DIM_CONTIGUOUS:
        return not st or st[-1] == 1 or shape[-1] == 1
    if len(st) != 2:
        return False
    if rule is StrideRule.ROW_MAJOR:
        return st[1] == 1 and st[0] >= max(1, shape[1])
    return st[0] == 1 and st[1] >= max(1, shape[0])


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

    def __post_init__(self) -> None:
        object.__setattr__(self, "_ok", _compile_check(self))  # the hot-path check

    def __reduce__(self):  # pickle by fields (the compiled check is rebuilt)
        return (type(self), tuple(getattr(self, f.name) for f in fields(self)))

    def describe(self) -> str:
        """The operand's requirements as one phrase ('anything' when there are none)."""
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
    """One broken requirement of one operand: the rule, what was required and found, and
    whether a copy fixes it."""

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


def format_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError  # pragma: no cover


def tensor_nbytes(t: torch.Tensor) -> int:
    """Bytes of the elements a tensor addresses (a view: its own elements, not its storage)."""
    return t.numel() * t.element_size()


def describe_tensor(t: torch.Tensor) -> str:
    """Everything a layout error needs about one tensor, in one line (metadata only)."""
    offset = t.storage_offset()
    if t.device.type == "meta":
        align = "alignment n/a (meta)"
    else:
        mod = t.data_ptr() % ALIGN_BYTES
        align = f"data_ptr % 16 = {mod} ({'16-byte aligned' if mod == 0 else 'NOT 16-byte aligned'})"
    major = majorness(t)
    return (
        f"shape {tuple(t.shape)}, stride {tuple(t.stride())}, dtype {str(t.dtype).replace('torch.', '')}, "
        f"storage offset {offset} ({offset * t.element_size()} bytes), {align}, "
        f"contiguous {t.is_contiguous()}{f', {major}-major' if major in ('row', 'col') else ''}"
        f"{', ' + major if major in ('both', 'strided') else ''}, device {t.device}"
    )


def likely_cause(op: Operand, v: Violation, t: torch.Tensor) -> str:
    """The most probable origin of one violation, from the tensor's own metadata."""
    if v.rule == "align":
        off = t.storage_offset() * t.element_size()
        if off % op.align:
            return (
                f"the view starts {off} bytes into its storage (a slice or view of a larger or packed "
                "tensor); materialise it once, at quantize / load time, in its own allocation"
            )
        return (
            "the storage itself is not aligned (an external buffer: e.g. a memory-mapped file or "
            "torch.frombuffer on an odd offset); copy it once into a fresh tensor at load time"
        )
    if v.rule == "stride":
        if op.stride is StrideRule.COL_MAJOR and is_row_major(t):
            return (
                "a row-major matrix where a column-major one is needed: for _scaled_mm store the "
                "weight row-major [N, K] and pass weight.t() (do not call .contiguous() on the "
                "transposed view)"
            )
        if op.stride is StrideRule.LAST_DIM_CONTIGUOUS:
            return (
                "the last dim is not innermost in memory (a transpose / permute that moved it, or a "
                "strided slice of it); produce the tensor in [..., D] order or let the wrapper copy"
            )
        return _CAUSES["stride"]
    return v.cause


@dataclass(frozen=True)
class LayoutContract:
    """A kernel's declared needs, checked by its wrapper before every launch."""

    kernel: str
    operands: tuple[Operand, ...]

    def __post_init__(self) -> None:
        names = [o.name for o in self.operands]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.kernel}: duplicate operand names {names}")
        object.__setattr__(self, "_by_name", {o.name: o for o in self.operands})
        object.__setattr__(self, "_checks", {o.name: o._ok for o in self.operands})

    def operand(self, name: str) -> Operand:
        """The declared operand ``name``; KeyError naming the kernel if there is none."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"{self.kernel} has no operand {name!r}") from None

    def violations(self, **tensors: torch.Tensor | None) -> list[Violation]:
        """Every requirement the tensors (by operand name) break; a missing required one counts."""
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

        ``where`` names the calling module (its qualified name, :func:`layout_name`). Returns
        the (possibly copied) tensors by operand name, in the given order. Every check is
        reported to the :func:`listen` listeners, also one that is about to raise.
        """
        by_name = self._by_name
        if not _LISTENERS:  # the hot path: every operand fine, nobody listening
            checks = self._checks
            try:
                for name, t in tensors.items():
                    if t is not None and not checks[name](t):
                        break
                else:
                    return tensors  # our own **kwargs dict: same names, same order
            except KeyError:
                pass  # an unknown operand name: the loop below raises the full message
        result: dict[str, torch.Tensor | None] = {}
        strict = _strict_depth > 0
        for name, t in tensors.items():
            op = by_name.get(name) or self.operand(name)
            if t is None:
                result[name] = None
                continue
            found = None if op._ok(t) else _check_operand(op, t)
            if not found:
                if _LISTENERS:
                    _emit(KernelOperandEvent(where, self.kernel, op, t, (), False, t))
                result[name] = t
                continue
            hard = [v for v in found if not v.fixable]
            if strict or hard:
                if _LISTENERS:
                    _emit(KernelOperandEvent(where, self.kernel, op, t, tuple(found), False, None, True))
                raise LayoutError(self.message(where, op, t, hard or found, strict=strict))
            fixed = t
            if any(v.rule == "stride" for v in found):
                fixed = _fix_stride(fixed, op.stride)
            if not is_aligned(fixed, op.align or 1):
                fixed = fixed.clone()  # a fresh allocation is aligned
            COPY_COUNTS[(where, self.kernel, name)] += 1
            if _LISTENERS:
                _emit(KernelOperandEvent(where, self.kernel, op, t, tuple(found), True, fixed))
            result[name] = fixed
        return result

    def message(
        self, where: str, op: Operand, t: torch.Tensor, found: list[Violation], *, strict: bool = True
    ) -> str:
        """The LayoutError text: module, kernel, operand, required, found, likely cause."""
        when = "strict layout mode: raised before the launch" if strict else "no copy can fix this"
        lines = [
            f"{where}: kernel {self.kernel}, operand {op.name!r} violates its layout contract ({when}).",
            f"  required: {op.describe()}",
            f"  found:    {describe_tensor(t)}",
        ]
        for v in found:
            lines.append(f"  - {v.rule}: required {v.required}, found {v.found}")
        causes = list(dict.fromkeys(c for c in (likely_cause(op, v, t) for v in found) if c))
        if causes:
            lines.append("  likely cause: " + "; ".join(causes))
        if strict and all(v.fixable for v in found):
            lines.append(
                f"  outside strict mode the wrapper would copy it ({format_bytes(tensor_nbytes(t))}) "
                "on every call; the inspector (wanstudio.inspect_layout) lists such copies"
            )
        return "\n".join(lines)


def _compile_check(op: Operand) -> Callable[[torch.Tensor], bool]:
    """The hot-path check of one operand: a straight-line function with only the rules it
    declares, constants inlined. Same verdict as ``not _check_operand(op, t)``.

    It runs before every kernel launch, right after compute that has evicted the interpreter's
    caches, so its cost is mostly bytecodes and metadata reads: shape and strides are read
    once, ``numel()`` only when the pointer is misaligned (``data_ptr()`` is host metadata, 0
    for meta tensors). Nothing here allocates, dispatches an op or syncs.
    """
    nd = op.ndim
    body = ["shape = t.shape", "nd = len(shape)"]
    if nd is not None:
        body.append(f"if nd != {nd}: return False")
    if op.dtypes:
        body.append("if t.dtype not in dtypes: return False")
    for dim, mult in op.divisible:
        if nd is None:
            body.append(f"if {-dim - 1 if dim < 0 else dim} < nd and shape[{dim}] % {mult}: return False")
        elif -nd <= dim < nd:
            body.append(f"if shape[{dim}] % {mult}: return False")
    rule = op.stride
    if rule is StrideRule.CONTIGUOUS:
        body.append("if not t.is_contiguous(): return False")
    elif rule is StrideRule.LAST_DIM_CONTIGUOUS:
        if nd != 0:
            body.append("st = t.stride()")
            body.append(("if " if nd else "if nd and ") + "st[-1] != 1 and shape[-1] != 1: return False")
    elif rule in (StrideRule.ROW_MAJOR, StrideRule.COL_MAJOR):
        if nd is None:
            body.append("if nd != 2: return False")
        elif nd != 2:
            body.append("return False")
        body.append("st = t.stride()")
        if rule is StrideRule.ROW_MAJOR:
            body.append("if st[1] != 1 or st[0] < max(1, shape[1]): return False")
        else:
            body.append("if st[0] != 1 or st[1] < max(1, shape[0]): return False")
    if op.align:
        body.append(f"return not (t.data_ptr() % {op.align} and not t.is_meta and t.numel())")
    else:
        body.append("return True")
    source = "def check(t):\n" + "".join(f"    {line}\n" for line in body)
    namespace: dict = {"dtypes": op.dtypes}
    exec(compile(source, f"<layout check {op.name}>", "exec"), namespace)
    check = namespace["check"]
    check.__doc__ = source
    return check


def _check_operand(op: Operand, t: torch.Tensor) -> list[Violation]:
    """Every violation of ``op`` by ``t``, described (the slow path, after a failed check)."""
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
                op.name,
                "align",
                f"data_ptr % {op.align} == 0",
                f"data_ptr % {op.align} = {t.data_ptr() % op.align} (storage offset "
                f"{t.storage_offset()} elements = {t.storage_offset() * t.element_size()} bytes)",
                True,
            )
        )
    return out


# --- strict mode -----------------------------------------------------------------------------
# A process-wide depth counter rather than a ContextVar: generation runs in a worker thread
# (the notebook panel), and a strict block opened in the notebook must cover it.
_strict_lock = threading.Lock()
_strict_depth = 0


def strict_enabled() -> bool:
    """Whether process-wide strict mode is on (a strict block or a strict forward is running)."""
    return _strict_depth > 0


def _enter_strict() -> None:
    global _strict_depth
    with _strict_lock:
        _strict_depth += 1


def _exit_strict() -> None:
    global _strict_depth
    with _strict_lock:
        _strict_depth -= 1


@contextmanager
def strict_layout(enabled: bool = True) -> Iterator[None]:
    """Within this block a violated contract raises LayoutError before the kernel launches.

    Process-wide: it also covers kernels launched by worker threads while the block is open.
    """
    if not enabled:
        yield
        return
    _enter_strict()
    try:
        yield
    finally:
        _exit_strict()


# Per thread: the modules whose strict forward is running (pre-hook pushed, post-hook pops).
_strict_frames = threading.local()
_STRICT_HANDLES = "_strict_layout_handles"


def _strict_pre_hook(module: nn.Module, args) -> None:
    stack = getattr(_strict_frames, "stack", None)
    if stack is None:
        stack = _strict_frames.stack = []
    _enter_strict()
    stack.append(module)


def _strict_post_hook(module: nn.Module, args, output) -> None:
    # always_call: also runs when the forward raised. Only undo what our pre-hook did (a
    # global pre-hook that raised before ours leaves nothing to undo).
    stack = getattr(_strict_frames, "stack", None)
    if stack and stack[-1] is module:
        stack.pop()
        _exit_strict()


def set_strict_layout(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Make every forward of ``model`` run under :func:`strict_layout` (in place; returns it).

    Installs one forward pre-hook and one always-called forward hook on ``model`` itself
    (none on its submodules); ``enabled=False`` removes them. Idempotent. Used by
    ``load_model(..., strict_layout=True)`` and the pipelines.
    """
    handles = getattr(model, _STRICT_HANDLES, None)
    if enabled and handles is None:
        pre = model.register_forward_pre_hook(_strict_pre_hook, prepend=True)
        post = model.register_forward_hook(_strict_post_hook, always_call=True)
        object.__setattr__(model, _STRICT_HANDLES, (pre, post))  # not a submodule / buffer
    elif not enabled and handles is not None:
        for h in handles:
            h.remove()
        object.__delattr__(model, _STRICT_HANDLES)
    return model


def is_strict_layout(model: nn.Module | None = None) -> bool:
    """Whether layout contracts are checked strictly.

    With ``model``: True when its forwards run strictly, because :func:`set_strict_layout` is
    on for it or because process-wide strict mode is on (a :func:`strict_layout` block, or a
    strict model's forward, possibly in another thread). Without: whether process-wide strict
    mode is on now.
    """
    if model is not None and getattr(model, _STRICT_HANDLES, None) is not None:
        return True
    return strict_enabled()


# --- events for the inspector ------------------------------------------------------------------
@dataclass
class KernelOperandEvent:
    """One contract check of one operand (delivered to :func:`listen` listeners)."""

    where: str  # the calling module's qualified name
    kernel: str
    operand: Operand
    tensor: torch.Tensor  # as the wrapper received it
    violations: tuple[Violation, ...]
    copied: bool  # outside strict mode: a copy fixed it
    result: torch.Tensor | None = None  # what the kernel gets (the copy, or ``tensor``)
    raised: bool = False  # a LayoutError follows this event


_LISTENERS: list[Callable[[KernelOperandEvent], None]] = []
COPY_COUNTS: Counter = Counter()  # (where, kernel, operand) -> copies made outside strict mode


def _emit(event: KernelOperandEvent) -> None:
    for listener in list(_LISTENERS):
        listener(event)


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
    """The name :func:`assign_layout_names` gave ``module``, else its class name."""
    return getattr(module, "_layout_name", type(module).__name__)
