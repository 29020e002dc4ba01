"""The layout inspector: one forward with hooks, one row per tensor that a module or kernel saw.

:func:`inspect_layout` runs one forward of a model under ``torch.no_grad()`` with a forward
pre-hook and a forward hook on every module and a :func:`wanstudio.layout.listen` listener for
the kernel contracts. It records, per module call, the layout of

* ``input``  — every tensor argument (nested tuples / lists / dicts walked, NamedTuples by field),
* ``parameter`` — the module's own parameters and buffers (not its children's),
* ``kernel operand`` — every operand a kernel wrapper checked against its
  :class:`~wanstudio.layout.LayoutContract` during the call (with the contract's verdict and
  any copy the wrapper made to satisfy it: a "hidden copy"),
* ``output`` — every tensor the module returned,

and returns a :class:`LayoutReport` of metadata (no tensor kept alive). The hooks are removed
when the forward returns or raises; with the inspector off a model carries no hooks at all.
"""

from __future__ import annotations

import contextlib
import csv
import html
import inspect
import os
import re
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from . import layout
from .layout import KernelOperandEvent, format_bytes, is_aligned, majorness, tensor_nbytes

__all__ = ["ROLES", "LayoutReport", "LayoutRow", "inspect_layout"]

INPUT, OUTPUT, PARAMETER, KERNEL_OPERAND = "input", "output", "parameter", "kernel operand"
ROLES = (INPUT, PARAMETER, KERNEL_OPERAND, OUTPUT)
_MAX_NESTING = 4  # how deep inputs / outputs nested in containers are walked


@dataclass(frozen=True)
class LayoutRow:
    """The layout of one tensor seen by one module call in one role."""

    call: int  # index of the module call, in the order calls started
    depth: int  # nesting depth of that call (0 = the inspected model)
    module: str  # qualified name ('' for the inspected model itself)
    module_type: str
    role: str  # 'input' | 'parameter' | 'kernel operand' | 'output'
    tensor: str  # argument / parameter / operand name
    shape: tuple[int, ...]
    dtype: str
    device: str
    stride: tuple[int, ...]
    contiguous: bool
    storage_offset: int
    aligned16: bool  # data_ptr() % 16 == 0
    majorness: str  # 2-D tensors: 'row' / 'col' / 'both' / 'strided'; '' otherwise
    nbytes: int  # bytes of the elements this tensor addresses
    kernel: str = ""  # kernel operands: the kernel whose contract was checked
    status: str = "n/a"  # kernel operands: 'ok' or 'violation'; other roles: 'n/a'
    rule: str = ""  # violated rules: 'align: required data_ptr % 16 == 0, found ...; ...'
    required: str = ""  # kernel operands: what the contract asks of this operand
    copies: int = 0  # copies the wrapper made of this operand (outside strict mode)
    copy_bytes: int = 0

    @property
    def is_violation(self) -> bool:
        return self.status == "violation"


def _tensor_row(
    call: int, depth: int, module: str, module_type: str, role: str, name: str, t: torch.Tensor, **extra
) -> LayoutRow:
    if t.layout is not torch.strided:  # sparse / nested tensors have no strides to speak of
        return LayoutRow(
            call,
            depth,
            module,
            module_type,
            role,
            name,
            tuple(t.shape),
            _dtype_name(t.dtype),
            str(t.device),
            (),
            False,
            0,
            True,
            "",
            0,
            **extra,
        )
    return LayoutRow(
        call,
        depth,
        module,
        module_type,
        role,
        name,
        shape=tuple(t.shape),
        dtype=_dtype_name(t.dtype),
        device=str(t.device),
        stride=tuple(t.stride()),
        contiguous=t.is_contiguous(),
        storage_offset=t.storage_offset(),
        aligned16=_aligned(t),
        majorness=majorness(t),
        nbytes=tensor_nbytes(t),
        **extra,
    )


def _aligned(t: torch.Tensor) -> bool:
    try:
        return is_aligned(t)
    except RuntimeError:  # tensors without storage (fake / functional): nothing to misalign
        return True


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _walk(name: str, value, depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor in a (nested) argument or output."""
    if isinstance(value, torch.Tensor):
        yield name, value
    elif depth < _MAX_NESTING:
        if isinstance(value, (tuple, list)):
            fields = getattr(value, "_fields", None)  # a NamedTuple's parts are named: x.q, x.scale
            for i, v in enumerate(value):
                yield from _walk(f"{name}.{fields[i]}" if fields else f"{name}[{i}]", v, depth + 1)
        elif isinstance(value, Mapping):
            for k, v in value.items():
                yield from _walk(f"{name}[{k!r}]", v, depth + 1)


_SIGNATURES: dict[object, inspect.Signature | None] = {}


def _named_arguments(module: nn.Module, args: tuple, kwargs: dict) -> Iterator[tuple[str, object]]:
    """The forward's arguments under their parameter names (``args[i]`` if binding fails)."""
    forward = module.forward
    key = getattr(forward, "__func__", forward)  # per function: an instance may override forward
    if key not in _SIGNATURES:
        try:
            _SIGNATURES[key] = inspect.signature(forward)
        except (TypeError, ValueError):
            _SIGNATURES[key] = None
    sig = _SIGNATURES[key]
    if sig is not None:
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError:
            pass
        else:
            for pname, value in bound.arguments.items():
                kind = sig.parameters[pname].kind
                if kind is inspect.Parameter.VAR_POSITIONAL:
                    for i, v in enumerate(value):
                        yield f"{pname}[{i}]", v
                elif kind is inspect.Parameter.VAR_KEYWORD:
                    yield from value.items()
                else:
                    yield pname, value
            return
    for i, v in enumerate(args):
        yield f"args[{i}]", v
    yield from kwargs.items()


def _violation_text(event: KernelOperandEvent) -> str:
    return "; ".join(f"{v.rule}: required {v.required}, found {v.found}" for v in event.violations)


class _Recorder:
    """The hooks and the listener of one inspection; builds rows as the forward runs."""

    def __init__(self, model: nn.Module):
        self.rows: list[LayoutRow] = []
        named = list(model.named_modules(remove_duplicate=False))
        self.names = {id(m): n for n, m in named}
        self.types = {n: type(m).__name__ for n, m in named}
        self.stack: list[tuple[nn.Module, int, str, str]] = []  # (module, call, name, type)
        self.calls = 0
        # hooks and listeners are visible process-wide: only the inspecting thread's forward counts
        self.thread = threading.get_ident()

    def _name(self, module: nn.Module) -> str:
        return self.names.get(id(module), layout.layout_name(module))

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if threading.get_ident() != self.thread:
            return
        call, depth = self.calls, len(self.stack)
        self.calls += 1
        name, mtype = self._name(module), type(module).__name__
        self.stack.append((module, call, name, mtype))
        rows = self.rows
        for arg_name, value in _named_arguments(module, args, kwargs):
            for tname, t in _walk(arg_name, value):
                rows.append(_tensor_row(call, depth, name, mtype, INPUT, tname, t))
        # captured before the call runs: block swap's own pre-hooks (registered earlier) have
        # put the weights in place by now
        for pname, p in module.named_parameters(recurse=False):
            rows.append(_tensor_row(call, depth, name, mtype, PARAMETER, pname, p))
        for bname, b in module.named_buffers(recurse=False):
            rows.append(_tensor_row(call, depth, name, mtype, PARAMETER, bname, b))

    def post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        # always called, also when the forward raised (then output is None): pop our frame
        if threading.get_ident() != self.thread:
            return
        while self.stack:
            frame = self.stack.pop()
            if frame[0] is module:
                break
        else:
            return
        _, call, name, mtype = frame
        depth = len(self.stack)
        for tname, t in _walk("output", output):
            self.rows.append(_tensor_row(call, depth, name, mtype, OUTPUT, tname, t))

    def on_kernel(self, event: KernelOperandEvent) -> None:
        if threading.get_ident() != self.thread:
            return
        if self.stack:
            _, call, _, mtype = self.stack[-1]
            depth = len(self.stack)
        else:  # a contract checked outside any module (e.g. by a helper called directly)
            call, depth, mtype = -1, 0, ""
        mtype = self.types.get(event.where, mtype)  # where is usually the module's own name
        copied = event.copied and event.result is not None
        self.rows.append(
            _tensor_row(
                call,
                depth,
                event.where,
                mtype,
                KERNEL_OPERAND,
                event.operand.name,
                event.tensor,
                kernel=event.kernel,
                status="violation" if event.violations else "ok",
                rule=_violation_text(event),
                required=event.operand.describe(),
                copies=int(copied),
                copy_bytes=tensor_nbytes(event.result) if copied else 0,
            )
        )


def inspect_layout(model: nn.Module, *inputs, **kwargs) -> LayoutReport:
    """Run one forward of ``model`` and report the layout of every tensor it touched.

    Args:
        model: any module (a :class:`~wanstudio.WanModel`, a block, a layer).
        *inputs, **kwargs: the forward's arguments, as for ``model(*inputs, **kwargs)``.
            A single mapping and nothing else (e.g. a dict of named inputs) is passed as
            keyword arguments: ``inspect_layout(model, dict(x=..., t=..., context=...))``.

    Returns:
        A :class:`LayoutReport`: ``.summary()``, ``.violations()``, ``.filter(...)``,
        ``.to_csv(path)``, and an HTML table in notebooks.

    The forward runs under ``torch.no_grad()``, in strict mode if the caller opened one (then
    a violated contract raises :class:`~wanstudio.LayoutError` as usual). Whatever happens,
    every hook is removed before this returns or raises; an exception raised by the forward
    carries the rows recorded up to that point as ``exc.layout_report``.
    """
    if len(inputs) == 1 and not kwargs and isinstance(inputs[0], Mapping):
        inputs, kwargs = (), dict(inputs[0])
    recorder = _Recorder(model)
    copies_before = Counter(layout.COPY_COUNTS)
    handles = []
    try:
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(recorder.pre_hook, with_kwargs=True))
            # prepend: our post-hook sees the call before others (e.g. block swap dropping
            # its device copy) run; always_call: it also runs when the forward raises
            handles.append(
                module.register_forward_hook(
                    recorder.post_hook, with_kwargs=True, always_call=True, prepend=True
                )
            )
        with layout.listen(recorder.on_kernel), torch.no_grad():
            model(*inputs, **kwargs)
    except BaseException as exc:
        with contextlib.suppress(AttributeError, TypeError):  # exceptions with __slots__
            exc.layout_report = _make_report(model, recorder, copies_before, error=exc)
        raise
    finally:
        for h in handles:
            h.remove()
    return _make_report(model, recorder, copies_before)


def _make_report(
    model: nn.Module, recorder: _Recorder, before: Counter, error: BaseException | None = None
) -> LayoutReport:
    delta = Counter(layout.COPY_COUNTS)
    delta.subtract(before)
    copy_counts = {k: v for k, v in delta.items() if v > 0}
    title = type(model).__name__
    if error is not None:
        title += f" (forward raised {type(error).__name__}: partial)"
    return LayoutReport(recorder.rows, copy_counts=copy_counts, title=title, calls=recorder.calls)


# --- the report ---------------------------------------------------------------------------------
_COLUMNS = [f.name for f in fields(LayoutRow)]
_HTML_COLUMNS = (
    ("call", "call"),
    ("module", "module"),
    ("module_type", "type"),
    ("role", "role"),
    ("tensor", "tensor"),
    ("shape", "shape"),
    ("dtype", "dtype"),
    ("device", "device"),
    ("stride", "stride"),
    ("contiguous", "contig."),
    ("storage_offset", "offset"),
    ("aligned16", "16-B aligned"),
    ("majorness", "major"),
    ("nbytes", "bytes"),
    ("kernel", "kernel"),
    ("status", "contract"),
    ("copies", "copies"),
)
_RED, _AMBER = "#f8d0d0", "#ffe3a8"


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


class LayoutReport:
    """Rows of :class:`LayoutRow` from :func:`inspect_layout`, with views over them.

    ``copy_counts`` maps (module, kernel, operand) to the copies contract wrappers made during
    the forward (from ``wanstudio.layout.COPY_COUNTS``).
    """

    html_max_rows = 300  # rows shown by the notebook table; violations and copies first

    def __init__(
        self,
        rows: Iterable[LayoutRow],
        *,
        copy_counts: Mapping[tuple, int] | None = None,
        title: str = "",
        calls: int | None = None,
    ):
        self.rows: list[LayoutRow] = list(rows)
        self.copy_counts: dict[tuple, int] = dict(copy_counts or {})
        self.title = title
        self.calls = calls if calls is not None else len({r.call for r in self.rows})

    # --- container -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[LayoutRow]:
        return iter(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def __repr__(self) -> str:
        return self.summary()

    # --- views -----------------------------------------------------------------------------------
    def violations(self) -> list[LayoutRow]:
        """Kernel operand rows whose contract was violated (copied, or raised in strict mode)."""
        return [r for r in self.rows if r.status == "violation"]

    def copies(self) -> list[LayoutRow]:
        """Kernel operand rows where the wrapper made a hidden copy."""
        return [r for r in self.rows if r.copies]

    def filter(
        self,
        role: str | Iterable[str] | None = None,
        module: str | re.Pattern | None = None,
        kernel: str | None = None,
        only_violations: bool = False,
        only_non_contiguous: bool = False,
    ) -> LayoutReport:
        """A report of the rows that match every given criterion.

        Args:
            role: one role or several (``'input'``, ``'parameter'``, ``'kernel operand'``,
                ``'output'``).
            module: a substring of the qualified name (a ``str``), or a compiled regular
                expression searched in it (``re.compile(r"blocks\\.\\d+\\.self_attn$")``).
            kernel: a substring of the kernel name (kernel operand rows only match).
            only_violations: only rows whose contract was violated.
            only_non_contiguous: only tensors that are not C-contiguous.
        """
        roles = None
        if role is not None:
            roles = {role} if isinstance(role, str) else set(role)
            unknown = roles - set(ROLES)
            if unknown:
                raise ValueError(f"unknown role(s) {sorted(unknown)}; roles are {list(ROLES)}")
        if module is not None and not isinstance(module, (str, re.Pattern)):
            raise TypeError(f"module= takes a substring or a compiled regex, got {type(module).__name__}")

        def keep(r: LayoutRow) -> bool:
            if roles is not None and r.role not in roles:
                return False
            if module is not None:
                if isinstance(module, str):
                    if module not in r.module:
                        return False
                elif not module.search(r.module):
                    return False
            if kernel is not None and (not r.kernel or kernel not in r.kernel):
                return False
            if only_violations and r.status != "violation":
                return False
            return not (only_non_contiguous and r.contiguous)

        rows = [r for r in self.rows if keep(r)]
        keys = {(r.module, r.kernel, r.tensor) for r in rows if r.copies}
        counts = {k: v for k, v in self.copy_counts.items() if k in keys}
        return LayoutReport(
            rows,
            copy_counts=counts,
            title=f"{self.title} (filtered)".strip(),
            calls=len({r.call for r in rows}),
        )

    # --- text -------------------------------------------------------------------------------------
    def summary(self) -> str:
        """Counts per role, contract checks per kernel, violations and hidden copies."""
        per_role = Counter(r.role for r in self.rows)
        checks = [r for r in self.rows if r.role == KERNEL_OPERAND]
        per_kernel = Counter(r.kernel for r in checks)
        bad = self.violations()
        copied = self.copies()
        non_contig = sum(1 for r in self.rows if not r.contiguous)
        misaligned = sum(1 for r in self.rows if not r.aligned16)
        head = f"LayoutReport{f' of {self.title}' if self.title else ''}: "
        lines = [
            head + f"{len(self.rows)} rows from {self.calls} module calls",
            "  rows by role: " + ", ".join(f"{role} {per_role.get(role, 0)}" for role in ROLES),
            f"  non-contiguous tensors: {non_contig}; not 16-byte aligned: {misaligned}",
            f"  contract checks: {len(checks)}"
            + (" (" + ", ".join(f"{k} {n}" for k, n in per_kernel.most_common()) + ")" if checks else ""),
            f"  violations: {len(bad)}",
        ]
        for r in bad[:10]:
            lines.append(f"    {r.module}: {r.kernel} {r.tensor!r}: {r.rule}")
        if len(bad) > 10:
            lines.append(f"    ... {len(bad) - 10} more (report.violations())")
        total = sum(r.copy_bytes for r in copied)
        lines.append(f"  hidden copies: {len(copied)} ({format_bytes(total)})")
        per_site: dict[tuple[str, str, str], list[int]] = {}
        for r in copied:
            site = per_site.setdefault((r.module, r.kernel, r.tensor), [0, 0])
            site[0] += r.copies
            site[1] += r.copy_bytes
        ranked = sorted(per_site.items(), key=lambda kv: -kv[1][1])
        for (mod, kern, op), (n, b) in ranked[:10]:
            lines.append(f"    {mod}: {kern} {op!r} x{n} ({format_bytes(b)})")
        if len(ranked) > 10:
            lines.append(f"    ... {len(ranked) - 10} more sites (report.copies())")
        return "\n".join(lines)

    # --- export ----------------------------------------------------------------------------------
    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write every row as CSV (atomically: a temp file in the same folder, then rename)."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
        try:
            with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(_COLUMNS)
                for r in self.rows:
                    writer.writerow([_csv_value(v) for v in _row_values(r)])
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return path

    def to_pandas(self):
        """The rows as a pandas DataFrame (needs pandas)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError(
                "LayoutReport.to_pandas() needs pandas (pip install pandas); "
                "LayoutReport.to_csv(path) works without it"
            ) from None
        return pd.DataFrame([asdict(r) for r in self.rows], columns=_COLUMNS)

    # --- notebook -------------------------------------------------------------------------------
    def _shown_rows(self, limit: int) -> list[int]:
        """Indices to show: every flagged row first (up to limit), then the earliest others."""
        n = len(self.rows)
        if n <= limit:
            return list(range(n))
        flagged = [i for i, r in enumerate(self.rows) if r.status == "violation" or r.copies]
        chosen = set(flagged[:limit])
        for i in range(n):
            if len(chosen) >= limit:
                break
            chosen.add(i)
        return sorted(chosen)

    def _repr_html_(self) -> str:
        limit = max(1, int(self.html_max_rows))
        shown = self._shown_rows(limit)
        head = "".join(f"<th>{html.escape(label)}</th>" for _, label in _HTML_COLUMNS)
        body: list[str] = []
        prev = -1
        width = len(_HTML_COLUMNS)
        for i in shown:
            if i != prev + 1:
                body.append(
                    f'<tr><td colspan="{width}" style="text-align:center;color:#777">'
                    f"&#8943; {i - prev - 1} rows not shown &#8943;</td></tr>"
                )
            body.append(_html_row(self.rows[i]))
            prev = i
        if prev != len(self.rows) - 1:
            body.append(
                f'<tr><td colspan="{width}" style="text-align:center;color:#777">'
                f"&#8943; {len(self.rows) - 1 - prev} rows not shown &#8943;</td></tr>"
            )
        note = ""
        if len(shown) < len(self.rows):
            note = (
                f"<p>Showing {len(shown)} of {len(self.rows)} rows (violations and hidden copies "
                "first); use <code>.filter(...)</code> or <code>.to_csv(path)</code> for all.</p>"
            )
        legend = (
            f'<p><span style="background:{_RED}">&nbsp;violation&nbsp;</span> '
            f'<span style="background:{_AMBER}">&nbsp;hidden copy&nbsp;</span></p>'
        )
        return (
            f'<div class="wanstudio-layout-report"><pre>{html.escape(self.summary())}</pre>{legend}{note}'
            f'<table style="font-size:smaller"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>"
        )


def _row_values(r: LayoutRow) -> list:
    return [getattr(r, c) for c in _COLUMNS]


def _csv_value(v) -> str:
    if isinstance(v, tuple):
        return _fmt_shape(v)
    return str(v)


def _html_row(r: LayoutRow) -> str:
    if r.status == "violation":
        style, title = f' style="background:{_RED}"', r.rule
    elif r.copies:
        style, title = f' style="background:{_AMBER}"', f"hidden copy: {format_bytes(r.copy_bytes)}"
    else:
        style, title = "", ""
    cells = []
    for col, _ in _HTML_COLUMNS:
        v = getattr(r, col)
        if col == "module":
            text = "&nbsp;&nbsp;" * r.depth + html.escape(v or "(model)")
        elif col in ("shape", "stride"):
            text = html.escape(_fmt_shape(v))
        elif col == "nbytes":
            text = html.escape(format_bytes(v))
        elif col == "status" and r.rule:
            text = f"{html.escape(v)}: {html.escape(r.rule)}"
        elif col == "copies" and r.copies:  # amber also inside a red (violating) row
            text = f"{r.copies} ({html.escape(format_bytes(r.copy_bytes))})"
            cells.append(f'<td style="background:{_AMBER}">{text}</td>')
            continue
        elif col == "aligned16":
            text = "yes" if v else "<b>no</b>"
        elif isinstance(v, bool):
            text = "yes" if v else "no"
        else:
            text = html.escape(str(v))
        cells.append(f"<td>{text}</td>")
    return f'<tr{style} title="{html.escape(title)}">{"".join(cells)}</tr>'
