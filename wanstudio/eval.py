"""Scores for a talking video: lip sync against the speech, and identity against the portrait.

* :func:`sync_score` — Pearson correlation, at 25 fps, between the mouth region's motion
  (mean absolute change of its pixels from one frame to the next) and the speech's loudness
  envelope, both smoothed over 0.2 s. A mouth that moves while the voice is loud and rests in
  pauses scores near 1; a still mouth scores 0, one that moves regardless of the speech ~0.
* :func:`pause_ratio` — mouth motion inside a pause / mouth motion while speaking.
* :func:`identity_psnr` — PSNR (dB) of the first frames against the reference portrait, both
  cover-resized to 64x64. PSNR rather than SSIM: the pipeline colour-matches every clip to the
  reference and the first latent *is* the reference's, so what is left to measure is whether
  the same face is drawn at the same place — a per-pixel error says that directly, needs no
  window or constants, and at 64x64 it ignores fine texture a real model may add.

The mouth region is found on the reference image (:func:`mouth_box`): the skin-coloured blob
around the picture's centre, its lower middle part; or pass ``box=``. Works on any video size
(frames are resized to the reference's 64x64 grid) and needs only numpy, PIL and torch.
"""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image

from .errors import ShapeError

FPS = 25
SAMPLE_RATE = 16000
GRID = 64  # frames and reference are compared on a GRID x GRID picture
Box = tuple[int, int, int, int]  # (x0, y0, x1, y1) on the GRID x GRID picture, x1 / y1 exclusive


# --- audio ----------------------------------------------------------------------------------------
def loudness_envelope(
    wave: np.ndarray,
    sample_rate: int = SAMPLE_RATE,
    fps: int = FPS,
    frames: int | None = None,
    floor_db: float = -40.0,
) -> np.ndarray:
    """Per-video-frame loudness in [0, 1]: float32 [T], T = ``frames`` or int(seconds * fps).

    RMS over a Hann window two frames long centred on each frame, in dB below the utterance's
    loud frames (95th percentile), mapped ``floor_db`` .. 0 dB -> 0 .. 1. Silence is 0.
    """
    x = np.asarray(wave, dtype=np.float64).reshape(-1)
    T = int(len(x) / sample_rate * fps) if frames is None else int(frames)
    if T < 1:
        raise ShapeError(f"loudness_envelope: {len(x)} samples is less than one frame at {fps} fps")
    hop = sample_rate / fps
    n = int(round(2 * hop))
    centres = ((np.arange(T) + 0.5) * hop).astype(np.int64)
    padded = np.pad(x, (n, n))
    idx = centres[:, None] + np.arange(-(n // 2), n - n // 2)[None, :] + n  # (T, n)
    w = np.hanning(n)
    rms = np.sqrt((padded[idx] ** 2 * w).sum(1) / w.sum())
    if rms.max() < 1e-5:  # silence (-100 dBFS)
        return np.zeros(T, dtype=np.float32)
    db = 20 * np.log10(rms + 1e-9)
    ref = np.percentile(db, 95)
    return np.clip((db - ref - floor_db) / -floor_db, 0, 1).astype(np.float32)


# --- pictures -------------------------------------------------------------------------------------
def to_grid(image, size: int = GRID) -> np.ndarray:
    """A picture (path, PIL image, uint8 [H, W, 3], or a tensor [3, H, W] in [-1, 1]) -> float32
    [size, size, 3] in [0, 1], cover-resized (bilinear) and centre-cropped like the pipeline."""
    if isinstance(image, (str, os.PathLike)):
        image = Image.open(image)
    if not isinstance(image, Image.Image):
        a = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image)
        if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:  # [3, H, W] in [-1, 1]
            a = np.clip((a.transpose(1, 2, 0) + 1) * 127.5, 0, 255)
        if a.ndim != 3 or a.shape[-1] != 3:
            raise ShapeError(f"a picture must be [H, W, 3] (or [3, H, W] in [-1, 1]); got {a.shape}")
        image = Image.fromarray(a.astype(np.uint8))
    image = image.convert("RGB")
    scale = max(size / image.width, size / image.height)
    w, h = math.ceil(scale * image.width), math.ceil(scale * image.height)
    image = image.resize((w, h), Image.BILINEAR)
    top, left = round((h - size) / 2), round((w - size) / 2)
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255


def frames_to_grid(frames, size: int = GRID) -> np.ndarray:
    """uint8 video [T, H, W, 3] (numpy or torch) -> float32 [T, size, size, 3] in [0, 1]."""
    v = np.asarray(frames.detach().cpu() if hasattr(frames, "detach") else frames)
    if v.ndim != 4 or v.shape[-1] != 3:
        raise ShapeError(f"a video must be uint8 [T, H, W, 3]; got shape {v.shape}")
    if v.shape[1:3] == (size, size):
        return v.astype(np.float32) / 255
    return np.stack([to_grid(f, size) for f in v.astype(np.uint8)])


def face_box(reference) -> Box:
    """Bounding box of the skin-coloured blob that holds the picture's centre (64x64 grid).

    The colour is the median of a small patch between the eyes and the mouth; the blob is the
    4-connected region of pixels within a colour distance of it, grown from that patch.
    """
    return _face(to_grid(reference))[0]


def _face(img: np.ndarray) -> tuple[Box, np.ndarray | None]:
    """(:func:`face_box`, the blob's mask [GRID, GRID] or None when there is no blob)."""
    c = GRID // 2
    patch = img[c - 2 : c + 3, c - 4 : c - 1].reshape(-1, 3)  # beside the nose line
    colour = np.median(patch, axis=0)
    close = np.abs(img - colour).sum(-1) < 0.16
    seen = _grow(close, [(y, x) for y in range(c - 2, c + 3) for x in range(c - 4, c - 1)])
    ys, xs = np.nonzero(seen)
    if len(ys) < 20:  # no blob: assume a centred face
        return (GRID // 4, GRID // 8, 3 * GRID // 4, 7 * GRID // 8), None
    cols = np.arange(GRID)
    widths = np.where(seen.any(1), np.where(seen, cols, -1).max(1) - np.where(seen, cols, GRID).min(1), 0)
    bottom = int(ys.max()) + 1
    for y in range(c, bottom):  # the neck (when it is skin-coloured too) is much narrower
        if widths[y] < 0.6 * widths.max():
            bottom = y + 2  # the chin's last rows are narrow as well
            break
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, bottom), seen


def mouth_box(reference) -> Box:
    """Where the mouth moves: the lips found on the reference, widened for a wide-open mouth.

    The lips are the lowest group of pixels in the face's lower half that are not skin but lie
    between the face blob's left and right edges on their row (:func:`face_box`); the box adds
    15% of their width and a pixel on each side (a wide mouth is ~28% wider than at rest), 2 rows
    above and 4 below (the lower lip drops as the mouth opens). It stays off the jaw line and
    the hair beside it, whose wobble is not the mouth moving. With no lips to see, the lower
    middle of the face box.
    """
    face, seen = _face(to_grid(reference))
    x0, y0, x1, y1 = face
    w, h = x1 - x0, y1 - y0
    lips = _lips(seen, y0 + h // 2, y1) if seen is not None else None
    if lips is None:
        cx = (x0 + x1) / 2
        return (
            max(0, int(round(cx - 0.34 * w))),
            max(0, int(round(y0 + 0.6 * h))),
            min(GRID, int(round(cx + 0.34 * w))),
            min(GRID, int(round(y0 + 1.0 * h + 2))),
        )
    lx0, ly0, lx1, ly1 = lips
    pad = max(2, int(round(0.15 * (lx1 - lx0))) + 1)  # a wide mouth is ~28% wider, +1 for the blur
    return (max(0, lx0 - pad), max(0, ly0 - 2), min(GRID, lx1 + pad), min(GRID, ly1 + 4))


def _lips(seen: np.ndarray, top: int, bottom: int) -> Box | None:
    """Bounding box of the lowest group of non-skin pixels strictly inside the face blob's rows
    top..bottom (above the lips there may be a nose tip or blushed cheeks)."""
    cols = np.arange(GRID)
    inside = np.zeros_like(seen)
    for y in range(top, bottom):
        row = np.nonzero(seen[y])[0]
        if len(row) >= 2:
            inside[y] = (cols > row.min()) & (cols < row.max()) & ~seen[y]
    groups = []
    while inside.any():
        group = _grow(inside, [tuple(np.argwhere(inside)[0])], diagonal=True)
        inside &= ~group
        if group.sum() >= 3:
            groups.append(group)
    if not groups:
        return None
    ys, xs = np.nonzero(max(groups, key=lambda g: np.nonzero(g)[0].mean()))
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _grow(mask: np.ndarray, seeds, diagonal: bool = False) -> np.ndarray:
    """The pixels of ``mask`` connected to any of ``seeds`` [(y, x), ...] (4-connected, or
    8-connected with ``diagonal``): a flood fill. Returns a bool mask."""
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if diagonal:
        steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    seen = np.zeros_like(mask, dtype=bool)
    stack = [(int(y), int(x)) for y, x in seeds if mask[y, x]]
    for y, x in stack:
        seen[y, x] = True
    while stack:
        y, x = stack.pop()
        for dy, dx in steps:
            yy, xx = y + dy, x + dx
            if 0 <= yy < mask.shape[0] and 0 <= xx < mask.shape[1] and mask[yy, xx] and not seen[yy, xx]:
                seen[yy, xx] = True
                stack.append((yy, xx))
    return seen


# --- scores ---------------------------------------------------------------------------------------
def mouth_motion(frames, box: Box, face: Box | None = None) -> np.ndarray:
    """Mean absolute pixel change in ``box`` from each frame to the next: float32 [T] (the first
    frame repeats the second's value), on the 64x64 grid, pixel values in [0, 1].

    With ``face`` (a box around the head), each frame is first shifted (sub-pixel) onto the one
    before it, the shift estimated on the face outside ``box`` (Lucas-Kanade): head motion is
    taken out, what is left is the mouth moving within the face.
    """
    return _region_motion(frames_to_grid(frames), box, face)


def _region_motion(v: np.ndarray, box: Box, face: Box | None = None) -> np.ndarray:
    x0, y0, x1, y1 = box
    if len(v) < 2:
        return np.zeros(len(v), dtype=np.float32)
    d = np.empty(len(v) - 1)
    v = _blur(v)  # sharp drawn edges would defeat sub-pixel alignment and exaggerate jitter
    gray = v.mean(-1)
    weight = None
    if face is not None:  # where the head's shift is measured: the face, mouth excluded
        weight = np.zeros(gray.shape[1:])
        fx0, fy0, fx1, fy1 = face
        weight[fy0:fy1, fx0:fx1] = 1
        weight[y0:y1, x0:x1] = 0
    for t in range(1, len(v)):
        cur = v[t]
        if weight is not None:
            u, w = _estimate_shift(gray[t - 1], gray[t], weight)
            cur = _shifted(cur, u, w)
        d[t - 1] = np.abs(cur[y0:y1, x0:x1] - v[t - 1, y0:y1, x0:x1]).mean()
    return np.concatenate([d[:1], d]).astype(np.float32)


def _blur(v: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Gaussian blur over H and W of [T, H, W, C] (separable, edges clamped)."""
    r = int(3 * sigma)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    for axis in (1, 2):
        pad = [(0, 0)] * v.ndim
        pad[axis] = (r, r)
        p = np.pad(v, pad, mode="edge")
        n = v.shape[axis]
        v = sum(k[i] * np.take(p, np.arange(i, i + n), axis=axis) for i in range(2 * r + 1))
    return v


def _shifted(img: np.ndarray, u: float, w: float) -> np.ndarray:
    """``img`` sampled at (x + u, y + w), bilinear, edges clamped."""
    H, W = img.shape[:2]
    xs = np.clip(np.arange(W) + u, 0, W - 1)
    ys = np.clip(np.arange(H) + w, 0, H - 1)
    xa, ya = np.floor(xs).astype(int), np.floor(ys).astype(int)
    xb, yb = np.minimum(xa + 1, W - 1), np.minimum(ya + 1, H - 1)
    fx, fy = xs - xa, ys - ya
    if img.ndim == 3:
        fx, fy = fx[:, None], fy[:, None, None]
    else:
        fy = fy[:, None]
    top = img[ya][:, xa] * (1 - fx) + img[ya][:, xb] * fx
    bottom = img[yb][:, xa] * (1 - fx) + img[yb][:, xb] * fx
    return top * (1 - fy) + bottom * fy


def _estimate_shift(
    prev: np.ndarray, cur: np.ndarray, weight: np.ndarray, iters: int = 4
) -> tuple[float, float]:
    """(u, w) such that cur(x + u, y + w) ~ prev(x, y) on ``weight``: Gauss-Newton, |shift| <= 3 px."""
    u = w = 0.0
    for _ in range(iters):
        warped = _shifted(cur, u, w)
        gy, gx = np.gradient(warped)
        diff = warped - prev
        weight = weight * (np.abs(diff) < 0.08)  # a blink is not head motion
        a = np.array(
            [
                [(weight * gx * gx).sum(), (weight * gx * gy).sum()],
                [(weight * gx * gy).sum(), (weight * gy * gy).sum()],
            ]
        )
        b = -np.array([(weight * gx * diff).sum(), (weight * gy * diff).sum()])
        if np.linalg.det(a) < 1e-9:
            break
        du, dw = np.linalg.solve(a, b)
        u, w = float(np.clip(u + du, -3, 3)), float(np.clip(w + dw, -3, 3))
        if abs(du) + abs(dw) < 1e-3:
            break
    return u, w


def smooth(x: np.ndarray, frames: int = 5) -> np.ndarray:
    """Centred moving average over ``frames`` (edges use the frames that exist)."""
    x = np.asarray(x, dtype=np.float64)
    k = np.ones(frames)
    return np.convolve(x, k, "same") / np.convolve(np.ones_like(x), k, "same")


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; 0 when either signal is constant."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 1e-12 else 0.0


def sync_score(frames, wave, *, reference=None, box: Box | None = None, smoothing: int = 5) -> float:
    """Lip sync in [-1, 1]: correlation of mouth motion and loudness envelope (module doc).

    frames: uint8 [T, H, W, 3] at 25 fps; wave: 16 kHz mono (its first T frames are used);
    the mouth region comes from ``box`` or else from ``reference`` (default: the first frame).
    """
    motion, env = _motion_and_envelope(frames, wave, reference, box)
    return correlation(smooth(motion, smoothing), smooth(env, smoothing))


def pause_ratio(frames, wave, pause: tuple[float, float], *, reference=None, box: Box | None = None) -> float:
    """Mean mouth motion inside ``pause`` (start, end seconds; 0.1 s trimmed at each end for
    the mouth to close) divided by the mean motion over loud frames (envelope > 0.5)."""
    motion, env = _motion_and_envelope(frames, wave, reference, box)
    a, b = int(math.ceil((pause[0] + 0.1) * FPS)), int((pause[1] - 0.1) * FPS)
    inside = motion[a:b]
    loud = motion[env > 0.5]
    if len(inside) == 0 or len(loud) == 0:
        raise ShapeError(f"pause {pause} s or the loud frames are not inside the {len(motion)}-frame video")
    return float(inside.mean() / max(loud.mean(), 1e-9))


def identity_psnr(frames, reference, first: int = 5) -> float:
    """Mean PSNR (dB) of the first ``first`` frames against the reference, both at 64x64."""
    v = frames_to_grid(frames[:first])
    ref = to_grid(reference)
    mse = ((v - ref[None]) ** 2).mean(axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-10))))


def describe(frames, wave, reference) -> str:
    """One line for a summary: :func:`sync_score` and :func:`identity_psnr` of ``frames``
    (uint8 [T, H, W, 3] at 25 fps) against ``wave`` (16 kHz) and the ``reference`` portrait."""
    sync = sync_score(frames, wave, reference=reference)
    identity = identity_psnr(frames, reference)
    return f"lip sync {sync:.2f} (mouth motion vs loudness: 0 unrelated, 1 in step), identity {identity:.1f} dB PSNR"


def _motion_and_envelope(frames, wave, reference, box) -> tuple[np.ndarray, np.ndarray]:
    v = frames_to_grid(frames)
    ref = reference if reference is not None else v_uint8(v[0])
    face = face_box(ref)
    if box is None:
        box = mouth_box(ref)
    return _region_motion(v, box, face), loudness_envelope(wave, frames=len(v))


def v_uint8(v: np.ndarray) -> np.ndarray:
    """float [..., 3] in [0, 1] -> uint8."""
    return np.clip(np.rint(v * 255), 0, 255).astype(np.uint8)
