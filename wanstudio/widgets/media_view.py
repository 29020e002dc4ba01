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


# --- who is who: the speaker regions over the reference frame ---------------------------------------
SPEAKER_TINTS = ((230, 60, 60), (60, 110, 235))  # speaker 1 red, speaker 2 blue
OVERLAY_SIDE = 320  # longer side of the drawn frame, in pixels


def reference_picture(path: str | Path):
    """The frame a run is conditioned on first: the image, or a video's frame 0 (RGB PIL image)."""
    from PIL import Image

    from ..media import VideoReader, is_video_file, load_image

    if is_video_file(path):
        with VideoReader(path) as reader:
            return Image.fromarray(reader.frame(0))
    return load_image(path)


def speaker_overlay_png(picture, boxes, *, side: int = OVERLAY_SIDE, alpha: float = 0.45) -> bytes:
    """``picture`` (PIL, the source frame) with each speaker's box tinted and outlined, speaker 1
    red and speaker 2 blue, scaled to ``side`` pixels on its longer side; PNG bytes.

    ``boxes``: two (x0, y0, x1, y1) boxes in the picture's pixels (x to the right, ends excluded).
    """
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    rgb = np.asarray(picture.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    for (x0, y0, x1, y1), tint in zip(boxes, SPEAKER_TINTS, strict=True):
        region = rgb[int(y0) : int(y1), int(x0) : int(x1)]  # rows y, columns x
        region[:] = (1 - alpha) * region + alpha * np.asarray(tint, dtype=np.float32)
    image = Image.fromarray(rgb.round().clip(0, 255).astype(np.uint8))
    scale = side / max(image.size)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    draw = ImageDraw.Draw(image)
    for i, ((x0, y0, x1, y1), tint) in enumerate(zip(boxes, SPEAKER_TINTS, strict=True)):
        box = [x0 * scale, y0 * scale, x1 * scale - 1, y1 * scale - 1]
        draw.rectangle(box, outline=tint, width=2)
        draw.text((box[0] + 4, box[1] + 2), str(i + 1), fill=(255, 255, 255))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
