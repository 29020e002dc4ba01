"""LayoutPanel: run the layout inspector on the loaded model, filter its table, try strict mode,
and see the block-swap timeline (copy vs compute per block) when swap is on."""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping

import ipywidgets as widgets
from torch import nn

from .. import studio
from ..errors import LayoutError
from .common import STYLE, error_html, fit_layout, format_traceback, heading, set_options, status_html
from .plots import png_bytes, swap_timeline_figure

ALL = ""  # the "no filter" value of the role / kernel dropdowns

# The report's table inside the panel: the HTML widget's 28 px line height and word wrapping
# made every shape / stride a three-line cell (rows 60 px tall, a dozen rows per screen) and
# pushed kernel / contract off to the right. One line per row, a header that stays in view, and
# the report's summary once (the status line above the table already shows it).
TABLE_CSS = """<style>
.wanstudio-layout-panel .wanstudio-layout-report { line-height: 1.35; }
.wanstudio-layout-panel .wanstudio-layout-report > pre { display: none; }  /* the status line has it */
.wanstudio-layout-panel .wanstudio-layout-report p { margin: 4px 0; }
.wanstudio-layout-panel .wanstudio-layout-report table { border-collapse: collapse; }
.wanstudio-layout-panel .wanstudio-layout-report th,
.wanstudio-layout-panel .wanstudio-layout-report td { white-space: nowrap; padding: 1px 6px; text-align: left; }
.wanstudio-layout-panel .wanstudio-layout-report thead th {
  position: sticky; top: 0; z-index: 1; background: var(--jp-layout-color1, #fff); }
</style>"""


def _resolve_model(source):
    """A model, or something holding one: a pipeline (``.model``), a LoadPanel (``.pipeline``)."""
    if source is None or isinstance(source, nn.Module):
        return source
    if not callable(source) and hasattr(source, "pipeline"):
        source = source.pipeline
    return getattr(source, "model", None) if source is not None else None


class LayoutPanel(widgets.VBox):
    """The inspector's table with filters (violations only, non-contiguous only, role, module
    name, kernel), a strict-mode toggle, and the block-swap timeline.

    Args:
        model: a WanModel, a pipeline, or a LoadPanel (looked up at each inspection).
        inputs: keyword inputs of one forward (default: :func:`studio.example_inputs`).
        inspector: ``inspector(model, inputs, strict=bool) -> LayoutReport``
            (default :func:`studio.inspect_model`; tests pass a fake).
    """

    def __init__(self, model=None, inputs: Mapping | None = None, *, inspector: Callable | None = None):
        self.source = model
        self.inputs = inputs
        self.inspector = inspector or studio.inspect_model
        self.report = None
        self.last_error: BaseException | None = None
        self.last_traceback = ""

        self.inspect_button = widgets.Button(description="Inspect", button_style="primary", icon="search")
        self.strict = widgets.ToggleButton(
            value=False,
            description="strict mode",
            icon="shield",
            tooltip="raise LayoutError before a kernel gets a tensor it cannot take",
        )
        self.only_violations = widgets.Checkbox(
            value=False, description="violations only", indent=True, style=STYLE, layout=fit_layout()
        )
        self.only_non_contiguous = widgets.Checkbox(
            value=False,
            description="non-contiguous only",
            indent=False,
            layout=fit_layout(margin="0 0 0 24px"),
        )
        self.role = widgets.Dropdown(options=[("all roles", ALL)], description="role", style=STYLE)
        self.module = widgets.Text(
            description="module name",
            placeholder="e.g. blocks.0.self_attn",
            style=STYLE,
            continuous_update=False,
            layout=widgets.Layout(width="480px"),
        )
        self.kernel = widgets.Dropdown(options=[("all kernels", ALL)], description="kernel", style=STYLE)
        self.status = widgets.HTML()
        self.counts = widgets.HTML()
        self.table = widgets.HTML(layout=widgets.Layout(max_height="480px", overflow="auto"))
        self.timeline_note = widgets.HTML()
        self.timeline = widgets.Image(format="png", layout=widgets.Layout(display="none", max_width="800px"))

        self.inspect_button.on_click(lambda _b: self.inspect())
        self.strict.observe(lambda _c: self._strict_changed(), "value")
        for w in (self.only_violations, self.only_non_contiguous, self.role, self.module, self.kernel):
            w.observe(lambda _c: self.refresh(), "value")
        super().__init__(
            [
                widgets.HBox([self.inspect_button, self.strict]),
                widgets.HBox([self.only_violations, self.only_non_contiguous]),
                widgets.HBox([self.role, self.kernel]),
                self.module,
                self.status,
                self.counts,
                self.table,
                heading("Block swap timeline"),
                self.timeline_note,
                self.timeline,
            ],
            layout=widgets.Layout(width="100%"),
        )
        self.add_class("wanstudio-layout-panel")

    @property
    def model(self):
        return _resolve_model(self.source)

    def filters(self) -> dict:
        """The report.filter() arguments the controls describe (unset filters left out)."""
        out = {}
        if self.only_violations.value:
            out["only_violations"] = True
        if self.only_non_contiguous.value:
            out["only_non_contiguous"] = True
        if self.role.value != ALL:
            out["role"] = self.role.value
        if self.module.value.strip():
            out["module"] = self.module.value.strip()
        if self.kernel.value != ALL:
            out["kernel"] = self.kernel.value
        return out

    def _strict_changed(self) -> None:
        if self.model is not None:
            self.inspect()

    def inspect(self):
        """Run one forward under the inspector (in strict mode if toggled); returns the report,
        or None when strict mode stopped the forward (the panel then names the layer)."""
        self.status.value = status_html("Inspecting…", "busy")
        model = self.model
        try:
            if model is None:
                raise LayoutError("no model to inspect yet: load one first (LoadPanel) or pass model=")
            inputs = self.inputs
            if inputs is None:
                inputs = studio.example_inputs(model.config, device=model.device, dtype=model.dtype)
            report = self.inspector(model, inputs, strict=self.strict.value)
        except Exception as e:
            self.last_error, self.last_traceback = e, format_traceback(e)
            self.report = None
            self.table.value = self.counts.value = ""
            title = (
                "Strict mode stopped the forward before the launch"
                if isinstance(e, LayoutError) and model is not None
                else "Inspection failed"
            )
            self.status.value = error_html(e, title)
            self._show_timeline(model)
            return None
        self.last_error, self.last_traceback = None, ""
        self.report = report
        rows = studio.report_rows(report)
        roles = sorted({str(studio.row_field(r, "role")) for r in rows} - {""})
        kernels = sorted({str(studio.row_field(r, "kernel")) for r in rows} - {"", "None"})
        set_options(self.role, [("all roles", ALL)] + [(r, r) for r in roles])
        set_options(self.kernel, [("all kernels", ALL)] + [(k, k) for k in kernels])
        summary = getattr(report, "summary", None)
        text = summary() if callable(summary) else ""
        mode = "strict mode: no contract violated" if self.strict.value else "report mode"
        self.status.value = status_html(f"{mode}. {text}".strip(), "ok")
        self.refresh()
        self._show_timeline(model)
        return report

    def refresh(self) -> None:
        """Re-draw the table with the current filters."""
        if self.report is None:
            return
        shown = self.report.filter(**self.filters())
        total = len(studio.report_rows(self.report))
        violations = getattr(self.report, "violations", None)
        n_bad = len(violations()) if callable(violations) else 0
        self.counts.value = status_html(
            f"{len(studio.report_rows(shown))} of {total} rows shown; "
            f"{n_bad} violation{'s' if n_bad != 1 else ''} in all"
        )
        to_html = getattr(shown, "_repr_html_", None)
        self.table.value = TABLE_CSS + (
            to_html() if callable(to_html) else f"<pre>{html.escape(str(shown))}</pre>"
        )

    def _show_timeline(self, model) -> None:
        stats = getattr(model, "block_swap_stats", None) if model is not None else None
        spans = studio.swap_timeline(stats)
        if not spans:
            self.timeline.layout.display = "none"
            self.timeline_note.value = status_html(
                "Block swap is off: every block stays on the device."
                if stats is None
                else "Block swap is on; run a forward (Inspect) to record its timeline."
            )
            return
        self.timeline.value = png_bytes(swap_timeline_figure(spans))
        self.timeline.layout.display = None
        copies = sum(1 for s in spans if s.kind == "copy")
        waits = [s for s in spans if s.kind == "wait"]
        exposed = sum(s.end - s.start for s in waits)
        simulated = getattr(stats, "host_memory", "") == "simulated"
        self.timeline_note.value = status_html(
            f"{copies} block copies in the last forward; {len(waits)} not hidden behind compute "
            f"({exposed:.2f} ms exposed){' — simulated device, virtual clock' if simulated else ''}.",
            "warn" if waits else "ok",
        )
