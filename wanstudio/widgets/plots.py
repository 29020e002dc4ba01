"""Figures for the studio: quantization modes compared, and the block-swap timeline.

Built on ``matplotlib.figure.Figure`` directly (no pyplot, no global state), so they can be
drawn from a worker thread and turned into PNG bytes for an ``ipywidgets.Image`` — which
renders the same in JupyterLab, Notebook 7, VS Code and Colab.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

from ..studio import QuantComparison

COPY, COMPUTE, EXPOSED = "#e8a33d", "#3d7be8", "#d0453b"


def png_bytes(fig, dpi: int = 100) -> bytes:
    """A matplotlib Figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def _figure_class():
    """matplotlib's Figure, imported on first draw: matplotlib is optional (the studio extra)."""
    try:
        from matplotlib.figure import Figure
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"drawing the studio's figures needs matplotlib ({e}): pip install 'wanstudio[studio]'",
            name=e.name,
        ) from None
    return Figure


def quant_comparison_figure(comparison: QuantComparison):
    """Block memory (x base precision) against whole-model SQNR, one point per runnable mode."""
    Figure = _figure_class()

    rows = [r for r in comparison.rows if r.available]
    fig = Figure(figsize=(7.5, 4.2))
    ax = fig.add_subplot()
    finite = [r.sqnr_db for r in rows if math.isfinite(r.sqnr_db)]
    top = (max(finite) + 10) if finite else 60.0
    for r in rows:
        y = r.sqnr_db if math.isfinite(r.sqnr_db) else top
        marker = "s" if r.mode.is_fp4 else "o" if r.mode.is_fp8 else "*"
        ax.scatter(r.ratio, y, marker=marker, s=60 if marker != "*" else 140, zorder=3)
        ax.annotate(r.mode.value, (r.ratio, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("DiT block memory (x base precision)")
    ax.set_ylabel("whole-model output SQNR (dB, higher is better)")
    ax.set_title(f"Quantization modes on {comparison.device}: memory vs accuracy")
    ax.grid(True, alpha=0.3)
    ax.set_xlim(0, max([1.1] + [r.ratio * 1.1 for r in rows if math.isfinite(r.ratio)]))
    if rows and any(not math.isfinite(r.sqnr_db) for r in rows):
        ax.axhline(top, color="grey", lw=0.5, ls=":")
        ax.text(
            0.02, top, " exact (base precision)", fontsize=7, va="bottom", transform=ax.get_yaxis_transform()
        )
    fig.tight_layout()
    return fig


def quant_comparison_plot(comparison: QuantComparison):
    """:func:`quant_comparison_figure` as a PNG image, which every notebook front end displays."""
    from IPython.display import Image  # comes with ipykernel / Jupyter (the studio extra)

    return Image(data=png_bytes(quant_comparison_figure(comparison)))


def swap_timeline_figure(spans: Sequence, title: str = "Block swap: copy vs compute per block"):
    """One lane per swapped block: its host-to-device copy (side stream), the time compute
    waited for that copy (exposed), and its compute. Spans are :class:`wanstudio.studio.Span`."""
    Figure = _figure_class()
    from matplotlib.patches import Patch

    units = list(dict.fromkeys(s.unit for s in spans))
    fig = Figure(figsize=(8, 1.2 + 0.3 * max(1, len(units))))
    ax = fig.add_subplot()
    lane = {u: i for i, u in enumerate(units)}
    style = {"copy": (COPY, -0.4), "wait": (EXPOSED, 0.02), "compute": (COMPUTE, 0.02)}
    for s in spans:
        color, offset = style[s.kind]
        ax.broken_barh([(s.start, max(s.end - s.start, 1e-3))], (lane[s.unit] + offset, 0.38), color=color)
    ax.set_yticks(range(len(units)), units)
    ax.invert_yaxis()
    ax.set_xlabel("ms from the forward's start")
    ax.set_title(title)
    ax.legend(
        handles=[
            Patch(color=COPY, label="copy (side stream)"),
            Patch(color=EXPOSED, label="compute waiting for the copy"),
            Patch(color=COMPUTE, label="compute"),
        ],
        loc="lower right",
        fontsize=7,
    )
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return fig
