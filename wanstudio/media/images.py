"""Images: the portrait read with PIL, checked from its header, sized to InfiniteTalk's buckets."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import MediaError
from ..options import SizeClass, parse_option
from .common import check_input_file

MAX_IMAGE_PIXELS = 64_000_000  # 48 Mpx photos pass; 100 Mpx took 23 s + 1.1 GiB to decode
# InfiniteTalk's size buckets: (H / W aspect ratio, H, W). 480 class ~640^2 px, 720 ~960^2 px.
_BUCKETS: dict[SizeClass, tuple[tuple[float, int, int], ...]] = {
    SizeClass.P480: (
        (0.26, 320, 1216),
        (0.38, 384, 1024),
        (0.50, 448, 896),
        (0.67, 512, 768),
        (0.82, 576, 704),
        (1.00, 640, 640),
        (1.22, 704, 576),
        (1.50, 768, 512),
        (1.86, 832, 448),
        (2.00, 896, 448),
        (2.50, 960, 384),
        (2.83, 1088, 384),
        (3.60, 1152, 320),
        (3.80, 1216, 320),
        (4.00, 1280, 320),
    ),
    SizeClass.P720: (
        (0.22, 448, 2048),
        (0.29, 512, 1792),
        (0.36, 576, 1600),
        (0.45, 640, 1408),
        (0.55, 704, 1280),
        (0.63, 768, 1216),
        (0.76, 832, 1088),
        (0.88, 896, 1024),
        (1.00, 960, 960),
        (1.14, 1024, 896),
        (1.31, 1088, 832),
        (1.50, 1152, 768),
        (1.58, 1216, 768),
        (1.82, 1280, 704),
        (1.91, 1344, 704),
        (2.20, 1408, 640),
        (2.30, 1472, 640),
        (2.67, 1536, 576),
        (2.89, 1664, 576),
        (3.62, 1856, 512),
        (3.75, 1920, 512),
    ),
}


# --- images ---------------------------------------------------------------------------------


def load_image(path: str | os.PathLike) -> Image.Image:
    """An image file -> RGB PIL image, EXIF orientation applied, transparency over white.

    The size is read from the header first: more than :data:`MAX_IMAGE_PIXELS` is refused
    before anything is decoded. An animated image gives its first frame, with a warning.
    """
    path = check_input_file(path, "image")
    try:
        with warnings.catch_warnings():  # PIL warns at 89 Mpx; ours refuses lower, just below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path)  # lazy: reads the header only
        with opened:
            _check_image_header(opened, path)
            image = ImageOps.exif_transpose(opened)
            image.load()
    except Image.DecompressionBombError as err:  # PIL's own limit, above ours: same advice
        raise MediaError(_too_large(path, err)) from err
    except UnidentifiedImageError as err:
        raise MediaError(
            f"{path} is not an image PIL can read (PNG, JPEG, WebP, ...). Pass a picture file."
        ) from err
    except OSError as err:
        raise MediaError(f"{path}: the image could not be decoded ({err}); it may be truncated.") from err
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return image.convert("RGB")


def _check_image_header(opened: Image.Image, path: Path) -> None:
    """Refuse an image too large to decode cheaply; warn about frames after the first."""
    width, height = opened.size
    if width * height > MAX_IMAGE_PIXELS:
        raise MediaError(_too_large(path, f"{width}x{height} = {width * height / 1e6:.1f} Mpx"))
    if getattr(opened, "n_frames", 1) > 1:
        warnings.warn(
            f"{path} is an animated image: using its first frame of {opened.n_frames}.", stacklevel=3
        )


def _too_large(path: Path, found) -> str:
    return (
        f"{path} is too large for a reference image ({found}; the limit is {MAX_IMAGE_PIXELS / 1e6:.0f} "
        f"Mpx, videos are at most 2048 pixels on a side): downscale it first, e.g. to 4096 on its longer side."
    )


def choose_bucket(width: int, height: int, size_class: str | int | SizeClass) -> tuple[int, int]:
    """(W, H) of the bucket whose aspect ratio (H / W) is nearest the image's."""
    if width < 1 or height < 1:
        raise MediaError(f"image size must be positive, got {width} x {height}.")
    buckets = _BUCKETS[parse_option(SizeClass, str(size_class))]
    ratio = height / width
    _, h, w = min(buckets, key=lambda b: abs(b[0] - ratio))  # first of equals, as InfiniteTalk
    return w, h


def resize_and_crop(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """Cover-resize (bilinear) to ``size`` = (W, H), centre-crop -> [3, H, W] float32 in [-1, 1]."""
    width, height = size
    scale = max(width / image.width, height / image.height)
    resized_w, resized_h = math.ceil(scale * image.width), math.ceil(scale * image.height)
    resized = image.convert("RGB").resize((resized_w, resized_h), Image.BILINEAR)
    top, left = round((resized_h - height) / 2), round((resized_w - width) / 2)
    cropped = resized.crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.asarray(cropped, dtype=np.uint8).copy())  # (H, W, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1.0  # (3, H, W)
