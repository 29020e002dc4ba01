"""Small pieces shared by the panels: readable error boxes, status lines, labelled rows."""

from __future__ import annotations

import html
import traceback

import ipywidgets as widgets

from ..errors import WanstudioError

STYLE = {"description_width": "150px"}
WIDE = widgets.Layout(width="95%")
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
    hint = "" if ours else (
        "<div style='font-size:85%;color:#666'>Unexpected error: the full traceback is in "
        "<code>panel.last_traceback</code>.</div>"
    )
    return (
        "<div class='wanstudio-error' style='border-left:4px solid #b42318;background:#fdf0ef;"
        f"padding:6px 10px;margin:4px 0'><b>{where}{html.escape(name)}</b><br>"
        f"<span style='white-space:pre-wrap'>{lines}</span>{hint}</div>"
    )


def format_traceback(error: BaseException) -> str:
    return "".join(traceback.format_exception(type(error), error, error.__traceback__))


def row(*children, **layout) -> widgets.HBox:
    return widgets.HBox(list(children), layout=widgets.Layout(**layout) if layout else None)


def heading(text: str) -> widgets.HTML:
    return widgets.HTML(f"<h4 style='margin:8px 0 2px 0'>{html.escape(text)}</h4>")


def set_options(dropdown: widgets.Dropdown, options: list[tuple[str, str]]) -> None:
    """Replace a dropdown's (label, value) options, keeping its value."""
    value = dropdown.value
    dropdown.options = options
    if value in [v for _, v in options]:
        dropdown.value = value
