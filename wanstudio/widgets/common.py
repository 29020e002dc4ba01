"""Small pieces shared by the panels: readable error boxes, status lines, labelled rows."""

from __future__ import annotations

import html
import traceback

import ipywidgets as widgets

from ..errors import WanstudioError

STYLE = {"description_width": "150px"}
WIDE = widgets.Layout(width="95%")
SLIDER_WIDTH = "480px"  # ipywidgets' default 300 px leaves a 60 px track after a 150 px label
_COLORS = {"info": "#444", "ok": "#1a7f37", "warn": "#9a6700", "error": "#b42318", "busy": "#0550ae"}


def status_html(text: str, kind: str = "info") -> str:
    """One escaped status line, coloured by kind ('info', 'ok', 'warn', 'error', 'busy')."""
    color = _COLORS.get(kind, _COLORS["info"])
    body = html.escape(text).replace("\n", "<br>")
    return f"<div class='wanstudio-status wanstudio-{kind}' style='color:{color}'>{body}</div>"


def error_html(error: BaseException, context: str = "") -> str:
    """A readable error box: what went wrong in words, no traceback wall.

    wanstudio's own errors carry the whole story (what was wanted, found, what to do); other
    exceptions are bugs or environment problems, so the box names the type and points at the
    traceback kept on the panel (``panel.last_traceback``).
    """
    name = type(error).__name__
    message = str(error).strip() or name
    ours = isinstance(error, WanstudioError)
    lines = html.escape(message).replace("\n", "<br>")
    where = f"{html.escape(context)}: " if context else ""
    hint = (
        ""
        if ours
        else (
            "<div style='font-size:85%;color:#666'>Unexpected error: the full traceback is in "
            "<code>panel.last_traceback</code>.</div>"
        )
    )
    return (
        "<div class='wanstudio-error' style='border-left:4px solid #b42318;background:#fdf0ef;"
        f"padding:6px 10px;margin:4px 0'><b>{where}{html.escape(name)}</b><br>"
        f"<span style='white-space:pre-wrap'>{lines}</span>{hint}</div>"
    )


def format_traceback(error: BaseException) -> str:
    """The full traceback of ``error`` as one string."""
    return "".join(traceback.format_exception(type(error), error, error.__traceback__))


def slider_layout() -> widgets.Layout:
    """A slider wide enough to drag (its track ~250 px next to the 150 px description)."""
    return widgets.Layout(width=SLIDER_WIDTH, max_width="95%")


def fit_layout(**more) -> widgets.Layout:
    """As wide as its content: for checkboxes whose description is longer than the default
    300 px (ipywidgets cuts it with an ellipsis) and toggle buttons (which wrap below their
    description at the default width)."""
    return widgets.Layout(width="auto", **more)


def inline(widget: widgets.DOMWidget) -> widgets.DOMWidget:
    """Lay ``widget`` out like the other labelled controls: description on the left in its
    150 px column, the control to its right (ToggleButtons otherwise stack the two)."""
    widget.add_class("widget-inline-hbox")
    return widget


def table_style(scope: str) -> widgets.HTML:
    """An invisible widget holding the CSS for the HTML tables inside the panel ``.scope``.

    The ipywidgets HTML widget draws its content at the controls' 28 px line height and lets
    every cell wrap, so a report table rendered inside a panel had two- and three-line cells
    (``36.0 / KiB``) and rows 60 px tall. One line per cell (the last column, the prose, may
    wrap) at the notebook's own line height.
    """
    css = (
        f".{scope} table {{ border-collapse: collapse; }}\n"
        f".{scope} th, .{scope} td {{ line-height: 1.35; padding: 1px 6px; }}\n"
        f".{scope} td:not(:last-child), .{scope} th {{ white-space: nowrap; }}\n"
    )
    return widgets.HTML(f"<style>{css}</style>", layout=widgets.Layout(display="none"))


def row(*children, **layout) -> widgets.HBox:
    """An HBox of ``children``; keyword arguments become its Layout."""
    return widgets.HBox(list(children), layout=widgets.Layout(**layout) if layout else None)


def heading(text: str) -> widgets.HTML:
    """A small HTML heading showing ``text`` (escaped)."""
    return widgets.HTML(f"<h4 style='margin:8px 0 2px 0'>{html.escape(text)}</h4>")


def set_options(dropdown: widgets.Dropdown, options: list[tuple[str, str]]) -> None:
    """Replace a dropdown's (label, value) options, keeping its value."""
    value = dropdown.value
    dropdown.options = options
    if value in [v for _, v in options]:
        dropdown.value = value
