"""Files in and out of the notebook: uploads written to disk, videos shown inline."""

from __future__ import annotations

from pathlib import Path

import ipywidgets as widgets

from .common import status_html

MAX_INLINE_BYTES = 64 * 2**20  # larger videos are linked, not embedded in the notebook


def save_upload(upload: widgets.FileUpload, folder: Path) -> Path | None:
    """Write the last file of a FileUpload to ``folder``; its path, or None if nothing uploaded."""
    if not upload.value:
        return None
    item = upload.value[-1]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / Path(item["name"]).name
    path.write_bytes(bytes(item["content"]))
    return path


def video_widget(path: str | Path, max_bytes: int = MAX_INLINE_BYTES) -> widgets.Widget:
    """The mp4 as an inline ``ipywidgets.Video`` (bytes embedded), or a note if too large."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        return widgets.HTML(status_html(f"{path} is {size / 2**20:.0f} MiB: open it from the file browser."))
    # drawn at least 320 px wide (the tiny preset's 64x64 would be a stamp), at most 640 x 480
    return widgets.Video(
        value=path.read_bytes(),
        format="mp4",
        controls=True,
        autoplay=False,
        loop=False,
        layout=widgets.Layout(width="100%", min_width="320px", max_width="640px", max_height="480px"),
    )
