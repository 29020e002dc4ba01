"""Every quantization mode measured on one model: memory and accuracy side by side.

:func:`compare_quant_modes` returns a :class:`QuantComparison` (data, a table as HTML /
Markdown); ``wanstudio.widgets.plots`` draws it. :func:`truncated` measures a slice of a
14B model when the whole one is too slow.
"""

from __future__ import annotations

import copy
import html
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from torch import nn

from ..errors import UnsupportedModeError
from ..options import QuantMode, parse_option
from ..quant import quantized_layers
from ._format import db_text, gib
from .availability import quant_availability
from .inputs import example_inputs
from .session import module_memory, quant_report


@dataclass(frozen=True)
class QuantRow:
    """One quantization mode measured on a model (or why it cannot run here)."""

    mode: QuantMode
    available: bool
    reason: str = ""
    linear_bytes: int = 0  # bytes of the quantizable Linear weights in this mode (scales included)
    ratio: float = float("nan")  # linear_bytes / their base-precision bytes
    model_bytes: int = 0  # the whole DiT in this mode
    sqnr_db: float = float("nan")  # whole-model output vs base precision
    worst_layer: str = ""  # the layer with the lowest SQNR (keep-list candidate)
    worst_sqnr_db: float = float("nan")
    paths: str = ""  # matmul paths, counted ('scaled_mm x12')


@dataclass
class QuantComparison:
    """One row per quantization mode: memory of the Linear weights and of the whole DiT, whole-model
    SQNR and the worst layer; ``reports`` holds each mode's per-layer :class:`QuantReport`.

    Data only: ``wanstudio.widgets.plots.quant_comparison_plot`` draws it."""

    rows: list[QuantRow]
    base_linear_bytes: int
    base_model_bytes: int
    device: str
    reports: dict = field(default_factory=dict, repr=False)

    COLUMNS = ("mode", "Linear weights", "x base", "DiT total", "SQNR dB", "worst layer (dB)", "matmul")

    def row(self, mode: QuantMode | str) -> QuantRow:
        """The row of one mode."""
        mode = parse_option(QuantMode, mode)
        return next(r for r in self.rows if r.mode == mode)

    def _cells(self, r: QuantRow) -> tuple[str, ...]:
        if not r.available:
            return (r.mode.value, "", "", "", "", "", f"cannot run here: {r.reason}")
        worst = f"{r.worst_layer} ({db_text(r.worst_sqnr_db)})" if r.worst_layer else ""
        return (
            r.mode.value,
            gib(r.linear_bytes),
            f"{r.ratio:.2f}",
            gib(r.model_bytes),
            db_text(r.sqnr_db),
            worst,
            r.paths,
        )

    def to_markdown(self) -> str:
        """The table as Markdown."""
        lines = ["| " + " | ".join(self.COLUMNS) + " |", "|" + "---|" * len(self.COLUMNS)]
        lines += ["| " + " | ".join(self._cells(r)) + " |" for r in self.rows]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{c}</th>" for c in self.COLUMNS)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in self._cells(r)) + "</tr>"
            for r in self.rows
        )
        return f"<table class='wanstudio-quant'><tr>{head}</tr>{body}</table>"

    def __str__(self) -> str:
        return self.to_markdown()


def truncated(model: nn.Module, blocks: int) -> nn.Module:
    """A view of ``model`` with only its first ``blocks`` blocks (weights shared, not copied):
    measure the modes on a slice of a 14B model when the whole one is too slow."""
    view = copy.copy(model)
    view._modules = dict(model._modules)
    view._modules["blocks"] = nn.ModuleList(list(model.blocks)[:blocks])
    view.config = model.config.replace(num_layers=min(blocks, model.config.num_layers))
    view._rope_cache = {}
    return view


def compare_quant_modes(
    model: nn.Module, modes: Iterable[QuantMode | str] | None = None, inputs: Mapping | None = None
) -> QuantComparison:
    """Measure every mode on ``model`` (base-precision weights, left unchanged): Linear and DiT
    bytes, whole-model SQNR, worst layer, matmul paths. Modes that cannot run on the model's
    device get a row with the reason. Uses :func:`wanstudio.quant.quant_report`, which holds
    one quantized copy of the Linear layers at a time.
    """
    if quantized_layers(model):
        raise UnsupportedModeError(
            "compare_quant_modes needs base-precision weights, but this model is "
            "already quantized: load it with quantization='disabled'"
        )
    device = model.device
    modes = [parse_option(QuantMode, m) for m in (modes if modes is not None else QuantMode)]
    if inputs is None:
        inputs = example_inputs(model.config, device=device, dtype=model.dtype)
    total = module_memory("DiT", model).bytes
    statuses = quant_availability(device)
    rows, reports, base_linear = [], {}, 0
    for mode in modes:
        status = statuses[mode]
        if not status.available:
            rows.append(QuantRow(mode, False, status.reason))
            continue
        report = quant_report(model, mode, inputs)
        reports[mode] = report
        if mode == QuantMode.DISABLED:
            rows.append(
                QuantRow(mode, True, model_bytes=total, sqnr_db=math.inf, ratio=1.0, paths="base precision")
            )
            continue
        base_linear = report.base_bytes
        worst = report.worst(1)
        rows.append(
            QuantRow(
                mode,
                True,
                "",
                report.quant_bytes,
                report.quant_bytes / report.base_bytes if report.base_bytes else math.nan,
                total - report.base_bytes + report.quant_bytes,
                report.model_sqnr_db,
                worst[0].name if worst else "",
                worst[0].sqnr_db if worst else math.nan,
                ", ".join(f"{p} x{n}" for p, n in report.paths().items()),
            )
        )
    rows = [replace(r, linear_bytes=base_linear) if r.mode == QuantMode.DISABLED else r for r in rows]
    return QuantComparison(rows, base_linear, total, str(device), reports)
