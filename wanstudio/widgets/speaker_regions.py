"""Who is who in a two-speaker video: the reference frame with each speaker's region tinted,
and a strength per speaker. Part of the generate panel."""

from __future__ import annotations

from pathlib import Path

import ipywidgets as widgets

from ..pipeline.conditioning import check_speaker_boxes, default_speaker_boxes
from .common import STYLE, error_html, slider_layout, status_html
from .generate_request import parse_bboxes
from .media_view import reference_picture, speaker_overlay_png


class SpeakerRegions(widgets.VBox):
    """The reference frame (an image, or a video's frame 0) with speaker 1's region tinted red
    and speaker 2's blue — the boxes typed in the panel, else the pipeline's default halves —
    plus a strength slider per speaker (a factor on that speaker's audio features).

    :meth:`show` redraws it; a path that is not a file yet, or boxes that do not fit the frame,
    give a note instead of a picture (the user may still be typing).
    """

    def __init__(self):
        self.view = widgets.Image(format="png", layout=widgets.Layout(max_width="320px"))
        self.note = widgets.HTML()
        self.strengths = tuple(
            widgets.FloatSlider(
                value=1.0,
                min=0.0,
                max=3.0,
                step=0.05,
                description=f"strength {i}",
                tooltip=f"a factor on speaker {i}'s audio features (1 = as recorded)",
                style=STYLE,
                layout=slider_layout(),
            )
            for i in (1, 2)
        )
        self.boxes: tuple | None = None  # what was drawn: (x0, y0, x1, y1) x 2, source pixels
        self._picture = (None, None)  # (path, mtime) -> PIL image: a video is not decoded per keystroke
        self._cached = None
        super().__init__([self.note, self.view, *self.strengths])

    def strength_values(self) -> tuple[float, float] | None:
        """The two strengths, or None when both are 1 (the pipeline's default)."""
        values = tuple(float(s.value) for s in self.strengths)
        return None if values == (1.0, 1.0) else values

    def show(self, path: str, boxes_text: str) -> None:
        """Draw ``path``'s reference frame with the regions of ``boxes_text`` (empty: default)."""
        self.boxes = None
        path = path.strip()
        if not path or not Path(path).expanduser().is_file():
            self.view.value = b""
            self.note.value = status_html("Speaker regions: give an image or video to see them.", "info")
            return
        try:
            picture = self._load(Path(path).expanduser())
            boxes = parse_bboxes(boxes_text)
            default = boxes is None
            if default:
                boxes = default_speaker_boxes(*picture.size)
            boxes = tuple(check_speaker_boxes(boxes, picture.size))
            self.view.value = speaker_overlay_png(picture, boxes)
        except Exception as e:  # shown, not raised
            self.view.value = b""
            self.note.value = error_html(e, "Speaker regions")
            return
        self.boxes = boxes
        how = "the default: left and right halves" if default else "the boxes above"
        self.note.value = status_html(
            f"Speaker 1 (first speech) red, speaker 2 blue: {how}, on the {picture.width}x"
            f"{picture.height} reference frame.",
            "info",
        )

    def _load(self, path: Path):
        key = (str(path), path.stat().st_mtime_ns)
        if self._picture != key:
            self._cached = reference_picture(path)
            self._picture = key
        return self._cached
