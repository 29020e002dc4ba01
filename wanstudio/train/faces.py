"""Procedural 2-D faces in the style of the shipped portrait, drawn with torch array maths.

A face is a :class:`FaceStyle` (colours, hair, face shape, framing: fixed for a video) and a
:class:`FaceMotion` (per-frame head shift / tilt, blink, mouth opening and shape). Shapes are
signed-distance functions in *portrait units* (the portrait is 1 wide and ``aspect`` tall, 7/6
like ``assets/portrait.png``) rendered with analytic anti-aliasing, so one style draws alike at
any size: 384x448 for a portrait file, 64x64 for training frames (cover-resized and centre
cropped like :func:`wanstudio.media.resize_and_crop`). Every frame carries its own parameters
(:func:`face_params`), so a batch of frames of many people is drawn at once, on a CPU or a GPU
(:func:`render`): the trainer draws its clips on the GPU. Deterministic: the same parameters
give the same pixels on one device.
"""

from __future__ import annotations

import colorsys
import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

PORTRAIT_ASPECT = 7 / 6  # height / width of assets/portrait.png (384 x 448)
HAIR_STYLES = ("cap", "long", "round", "bald", "bun")
Color = tuple[float, float, float]


# --- the look of one person ------------------------------------------------------------------------
@dataclass(frozen=True)
class FaceStyle:
    """Everything that stays fixed over a video. Colours are RGB in [0, 1]; lengths in portrait
    units (the portrait is 1 wide). ``zoom`` / ``shift_*`` frame the person in the picture."""

    background_top: Color = (0.27, 0.49, 0.58)
    background_bottom: Color = (0.69, 0.79, 0.84)
    skin: Color = (0.93, 0.78, 0.66)
    hair: Color = (0.33, 0.20, 0.13)
    iris: Color = (0.30, 0.20, 0.12)
    lip: Color = (0.71, 0.25, 0.29)
    shirt: Color = (0.22, 0.33, 0.60)
    blush: Color = (0.94, 0.62, 0.62)
    hair_style: str = "cap"
    fringe_tilt: float = 0.0  # slope of the forehead line (a side parting)
    face_rx: float = 0.19
    face_ry: float = 0.26
    jaw: float = 0.0  # 0 round chin .. 1 square jaw
    eye_dx: float = 0.09
    eye_y: float = 0.51
    eye_size: float = 1.0
    brow_gap: float = 0.055
    brow_tilt: float = 0.0
    nose_len: float = 0.085
    mouth_y: float = 0.705
    mouth_w: float = 0.07
    rest_lips: float = 1.0  # how much of the lips shows with the mouth shut (0 a line, 1 a smile)
    teeth: bool = True
    blush_alpha: float = 0.8
    zoom: float = 1.0
    shift_x: float = 0.0
    shift_y: float = 0.0

    @classmethod
    def portrait(cls) -> FaceStyle:
        """Close to ``assets/portrait.png`` (the defaults)."""
        return cls()

    @classmethod
    def held_out(cls) -> FaceStyle:
        """A second test person, drawn unlike the portrait and set by hand (no training seed
        draws it): dark skin, long black hair, warm background, green shirt, closed mouth."""
        return cls(
            background_top=(0.80, 0.52, 0.30),
            background_bottom=(0.97, 0.86, 0.66),
            skin=(0.47, 0.31, 0.21),
            hair=(0.08, 0.07, 0.07),
            iris=(0.20, 0.13, 0.08),
            lip=(0.52, 0.21, 0.21),
            shirt=(0.20, 0.55, 0.35),
            blush=(0.62, 0.32, 0.30),
            hair_style="long",
            face_rx=0.205,
            face_ry=0.25,
            jaw=0.35,
            eye_dx=0.085,
            eye_size=1.1,
            mouth_w=0.065,
            rest_lips=0.3,
            blush_alpha=0.3,
            zoom=1.05,
            shift_x=0.02,
        )

    @classmethod
    def sample(cls, rng: np.random.Generator) -> FaceStyle:
        """A random person: skin, hair, eyes, face shape, background, clothes, framing."""
        u = rng.uniform
        tone = u(0, 1)  # light .. dark skin, along a warm ramp
        skin = _mix((0.98, 0.86, 0.76), (0.40, 0.25, 0.17), tone)
        skin = _jitter_hsv(rng, skin, 0.02, 0.08, 0.05)
        hair = [
            (0.10, 0.08, 0.07),
            (0.33, 0.20, 0.13),
            (0.55, 0.36, 0.20),
            (0.85, 0.70, 0.40),
            (0.62, 0.22, 0.10),
            (0.70, 0.70, 0.72),
            (0.25, 0.30, 0.55),
        ][int(rng.integers(7))]
        hue = u(0, 1)
        top = colorsys.hsv_to_rgb(hue, u(0.25, 0.6), u(0.35, 0.7))
        bottom = colorsys.hsv_to_rgb((hue + u(-0.08, 0.08)) % 1, u(0.1, 0.35), u(0.7, 0.92))
        if rng.uniform() < 0.5:
            top, bottom = bottom, top
        lip_base = _mix((0.78, 0.30, 0.33), (0.45, 0.18, 0.18), tone)
        return cls(
            background_top=top,
            background_bottom=bottom,
            skin=skin,
            hair=_jitter_hsv(rng, hair, 0.02, 0.1, 0.08),
            iris=_jitter_hsv(
                rng,
                [(0.30, 0.20, 0.12), (0.15, 0.35, 0.55), (0.2, 0.45, 0.25)][int(rng.integers(3))],
                0.03,
                0.1,
                0.1,
            ),
            lip=_jitter_hsv(rng, lip_base, 0.03, 0.1, 0.08),
            shirt=colorsys.hsv_to_rgb(u(0, 1), u(0.3, 0.8), u(0.3, 0.85)),
            blush=_mix(skin, (0.95, 0.45, 0.5), 0.45),
            hair_style=HAIR_STYLES[int(rng.choice(len(HAIR_STYLES), p=[0.4, 0.2, 0.15, 0.1, 0.15]))],
            fringe_tilt=float(u(-0.35, 0.35)) if rng.uniform() < 0.5 else 0.0,
            face_rx=float(u(0.185, 0.24)),
            face_ry=float(u(0.24, 0.29)),
            jaw=float(u(0, 1)),
            eye_dx=float(u(0.078, 0.1)),
            eye_y=float(u(0.49, 0.53)),
            eye_size=float(u(0.8, 1.25)),
            brow_gap=float(u(0.045, 0.065)),
            brow_tilt=float(u(-0.25, 0.25)),
            nose_len=float(u(0.06, 0.1)),
            mouth_y=float(u(0.69, 0.72)),
            mouth_w=float(u(0.055, 0.085)),
            rest_lips=float(u(0, 1)),
            teeth=bool(rng.uniform() < 0.7),
            blush_alpha=float(u(0, 0.7)),
            zoom=float(u(0.88, 1.12)),
            shift_x=float(u(-0.05, 0.05)),
            shift_y=float(u(-0.04, 0.04)),
        )


@dataclass(frozen=True)
class FaceMotion:
    """Per-frame state, each an array [T]: head shift (portrait units) and tilt (radians), eye
    closure (0 open .. 1 shut), mouth opening (0 shut .. 1 wide open) and shape weights
    ``wide`` ("ee") and ``round`` ("oo"), each in [0, 1]."""

    dx: np.ndarray
    dy: np.ndarray
    tilt: np.ndarray
    blink: np.ndarray
    open: np.ndarray
    wide: np.ndarray
    round: np.ndarray

    def __post_init__(self) -> None:
        lengths = {f.name: np.asarray(getattr(self, f.name)).shape for f in dataclasses.fields(self)}
        if len(set(lengths.values())) != 1 or len(next(iter(lengths.values()))) != 1:
            raise ValueError(f"FaceMotion fields must be 1-D arrays of one length, got shapes {lengths}")

    @property
    def frames(self) -> int:
        return len(self.open)

    @classmethod
    def still(cls, frames: int = 1, **values) -> FaceMotion:
        """``frames`` identical frames (rest pose unless ``values`` say otherwise)."""
        fields = {f.name: np.full(frames, float(values.pop(f.name, 0.0))) for f in dataclasses.fields(cls)}
        if values:
            raise ValueError(f"unknown FaceMotion fields {sorted(values)}")
        return cls(**fields)

    def window(self, start: int, stop: int) -> FaceMotion:
        """Frames ``[start, stop)`` of every field."""
        return FaceMotion(**{f.name: getattr(self, f.name)[start:stop] for f in dataclasses.fields(self)})


# --- parameters as arrays --------------------------------------------------------------------------
COLOR_FIELDS = tuple(f.name for f in dataclasses.fields(FaceStyle) if f.type == "Color")
MOTION_FIELDS = tuple(f.name for f in dataclasses.fields(FaceMotion))


def style_arrays(styles) -> dict[str, np.ndarray]:
    """Styles -> arrays [S] (colours [S, 3]; ``hair_style`` as an index into HAIR_STYLES)."""
    out = {}
    for f in dataclasses.fields(FaceStyle):
        values = [getattr(st, f.name) for st in styles]
        if f.name == "hair_style":
            values = [HAIR_STYLES.index(v) for v in values]
        out[f.name] = np.asarray(values, dtype=np.float32)
    return out


def face_params(style: FaceStyle, motion: FaceMotion) -> dict[str, np.ndarray]:
    """One person over ``motion.frames`` frames: every field as a per-frame array [T] ([T, 3])."""
    T = motion.frames
    out = {k: np.repeat(v, T, axis=0) for k, v in style_arrays([style]).items()}
    for name in MOTION_FIELDS:
        out[name] = np.asarray(getattr(motion, name), dtype=np.float32)
    return out


# --- drawing --------------------------------------------------------------------------------------
def draw_faces(
    style: FaceStyle,
    motion: FaceMotion,
    size: tuple[int, int] = (64, 64),
    aspect: float = PORTRAIT_ASPECT,
) -> np.ndarray:
    """Draw every frame of ``motion`` on the CPU: uint8 [T, H, W, 3] for ``size`` = (W, H).

    The scene is a portrait 1 wide and ``aspect`` tall, cover-resized to ``size`` and centre
    cropped (what the pipeline does to a portrait file of that aspect).
    """
    params = {k: torch.from_numpy(v) for k, v in face_params(style, motion).items()}
    return to_uint8(render(params, size, aspect)).numpy()


def draw_portrait(style: FaceStyle, size: tuple[int, int] = (384, 448), **pose) -> np.ndarray:
    """One still frame (rest pose unless ``pose`` gives FaceMotion fields): uint8 [H, W, 3]."""
    return draw_faces(style, FaceMotion.still(1, **pose), size=size, aspect=size[1] / size[0])[0]


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """float [..., 3] in [0, 1] -> uint8 (rounded)."""
    return (frames * 255).round().clamp(0, 255).to(torch.uint8)


def render(
    params: dict[str, torch.Tensor],
    size: tuple[int, int] = (64, 64),
    aspect: float = PORTRAIT_ASPECT,
    chunk: int = 4096,
) -> torch.Tensor:
    """Draw N frames from per-frame parameters (tensors [N] / colours [N, 3], on one device,
    as from :func:`face_params`) -> float32 [N, H, W, 3] in [0, 1] on that device."""
    n = len(params["open"])
    parts = []
    for a in range(0, n, chunk):  # bounds the memory of the temporaries
        parts.append(_render({k: v[a : a + chunk].float() for k, v in params.items()}, size, aspect))
    return torch.cat(parts)


class _Canvas:
    """Frames [N, H, W, 3] and the pixel grid; shapes are painted back to front."""

    def __init__(self, xs: torch.Tensor, ys: torch.Tensor, frames: int, px: torch.Tensor):
        self.x = xs.view(1, 1, -1)  # (1, 1, W)
        self.y = ys.view(1, -1, 1)  # (1, H, 1)
        self.px = px  # pixel size in scene units, (N, 1, 1)
        self.rgb = torch.zeros(frames, len(ys), len(xs), 3, device=xs.device)

    def paint(self, dist: torch.Tensor, color: torch.Tensor, alpha=1.0) -> None:
        """Composite ``color`` [N|1, 1, 1, 3] where the signed distance ``dist`` [N, H, W] < 0."""
        cover = ((0.5 - dist / self.px).clamp(0.0, 1.0) * alpha)[..., None]  # anti-aliased
        self.rgb.lerp_(color.expand_as(self.rgb), cover.expand_as(self.rgb))


def _render(p: dict[str, torch.Tensor], size, aspect) -> torch.Tensor:
    W, H = size
    scale = max(W, H / aspect)  # pixels per portrait unit
    left, top = (scale - W) / 2, (scale * aspect - H) / 2
    dev = p["open"].device
    xs = (torch.arange(W, device=dev, dtype=torch.float32) + 0.5 + left) / scale
    ys = (torch.arange(H, device=dev, dtype=torch.float32) + 0.5 + top) / scale
    n = len(p["open"])
    v = {k: t.view(n, 1, 1) if t.dim() == 1 else t.view(n, 1, 1, 3) for k, t in p.items()}
    c = _Canvas(xs, ys, n, (1.0 / scale) / v["zoom"])  # distances below are in unzoomed units
    _paint(c, _Fields(v))
    return c.rgb


class _Fields:
    """Attribute access to the per-frame parameter views."""

    def __init__(self, v: dict[str, torch.Tensor]):
        self.__dict__.update(v)


def _paint(c: _Canvas, s) -> None:
    """Paint the person back to front. Positions are the portrait's (x right, y down)."""
    # framing: the person is zoomed about (0.5, 0.6) and shifted
    bx = (c.x - 0.5) / s.zoom + 0.5 - s.shift_x  # body coordinates
    by = (c.y - 0.6) / s.zoom + 0.6 - s.shift_y
    # the head moves on top of that: shifted, then tilted about the neck
    ux, uy = bx - 0.5 - s.dx, by - _NECK_Y - s.dy
    cos, sin = torch.cos(s.tilt), torch.sin(s.tilt)
    hx = cos * ux + sin * uy  # head coordinates relative to the face centre
    hy = -sin * ux + cos * uy + _NECK_Y - _FACE_Y

    g = (c.y / PORTRAIT_ASPECT).clamp(0, 1)[..., None]  # (1, H, 1, 1): a vertical gradient
    c.rgb += s.background_top + (s.background_bottom - s.background_top) * g

    style = s.hair_style
    is_long, is_round, is_bald, is_bun = (
        (style == HAIR_STYLES.index(k)).float() for k in ("long", "round", "bald", "bun")
    )
    rx, ry = s.face_rx, s.face_ry
    hair_top = -ry - 0.145  # the top of the hair, above the face's top
    c.paint(_box(hx, hy - 0.03, rx + 0.045, ry + 0.13, 0.12), s.hair, is_long)  # behind the head
    c.paint(_ellipse(hx, hy + 0.06, rx + 0.085, ry + 0.11), s.hair, is_round)
    c.paint(_ellipse(hx, hy - hair_top + 0.035, 0.08, 0.065), s.hair, is_bun)
    # body: shirt, collar and neck do not move with the head
    sx, sy = bx - 0.5, by
    c.paint(_ellipse(sx, sy - 1.2, 0.43, 0.27), s.shirt)
    c.paint(_triangle(sx, sy, (-0.075, 0.975), (0.0, 1.08), (0.075, 0.975)), s.shirt * 0.78)
    c.paint(_box(sx, sy - 0.87, 0.076, 0.11, 0.02), s.skin * 0.9)
    # hair at the sides of the face (not for round or bald)
    centre, half = (hair_top + 0.1) / 2, (0.1 - hair_top) / 2
    c.paint(_box(hx, hy - centre, rx + 0.025, half, 0.1), s.hair, 1 - is_round - is_bald)
    for side in (-1, 1):  # ears
        c.paint(_ellipse(hx - side * (rx + 0.01), hy + 0.035, 0.032, 0.06), s.skin * 0.9)
    # the face: a forehead over an egg-shaped (jaw 0) or square (jaw 1) chin; bald: a dome
    chin = _ellipse(hx, hy + 0.1, rx, ry + 0.1)
    jaw = _box(hx, hy, rx * 0.97, ry * 0.93, rx * (0.75 - 0.4 * s.jaw))
    face = torch.minimum(_box(hx, hy + ry * 0.5, rx * 0.9, ry * 0.5, 0.02), chin + (jaw - chin) * s.jaw)
    c.paint(torch.maximum(face, -ry - hy), s.skin)
    c.paint(_ellipse(hx, hy + ry * 0.55, rx * 0.97, ry * 0.7), s.skin, is_bald)
    # the fringe: hair above a (possibly tilted) hairline
    hairline = -ry * 0.95 + 0.02 + s.fringe_tilt * hx
    centre, half = (hair_top - ry * 0.3) / 2, (-ry * 0.3 - hair_top) / 2
    crown = _box(hx, hy - centre, rx + 0.01, half, 0.09)
    c.paint(torch.maximum(crown, hy - hairline), s.hair, 1 - is_bald)
    for side in (-1, 1):  # cheeks
        c.paint(_ellipse(hx - side * s.eye_dx * 1.22, hy - 0.055, 0.042, 0.032), s.blush, s.blush_alpha)
    _paint_eyes(c, s, hx, hy - (s.eye_y - _FACE_Y))
    ny = s.eye_y - _FACE_Y + 0.02  # nose: a stroke and its base
    nose = s.skin * 0.75
    c.paint(_segment(hx, hy, (0.0, ny), (-0.017, ny + s.nose_len), 0.0045), nose)
    c.paint(_segment(hx, hy, (-0.017, ny + s.nose_len), (0.012, ny + s.nose_len + 0.004), 0.0045), nose)
    _paint_mouth(c, s, hx, hy - (s.mouth_y - _FACE_Y))


_FACE_Y = 0.57  # the face's centre in the portrait (x = 0.5)
_NECK_Y = 0.8  # the head tilts about this point
_WHITE = torch.tensor([0.97, 0.97, 0.96])
_BLACK = torch.tensor([0.04, 0.04, 0.04])
_LASH = torch.tensor([0.12, 0.09, 0.08])
_TEETH = torch.tensor([0.97, 0.96, 0.94])
_TONGUE = torch.tensor([0.92, 0.45, 0.5])


def _paint_eyes(c: _Canvas, s, x, y) -> None:
    """Both eyes and brows; (x, y) are relative to the point between the eyes."""
    dev = x.device
    rx, ry = 0.046 * s.eye_size, 0.026 * s.eye_size
    blink = s.blink
    for side in (-1, 1):
        ex, ey = x - side * s.eye_dx, y
        white = _ellipse(ex, ey, rx, ry)
        c.paint(white, _WHITE.to(dev))
        c.paint(torch.maximum(_ellipse(ex, ey, ry * 0.95, ry * 0.95), white), s.iris)
        c.paint(torch.maximum(_ellipse(ex, ey, ry * 0.45, ry * 0.45), white), _BLACK.to(dev))
        # the lid closes from the top; a dark lash line where it ends
        edge = -ry * 1.1 + 2.3 * ry * blink
        around = _ellipse(ex, ey, rx * 1.12, ry * 1.25)
        c.paint(torch.maximum(around, ey - edge), s.skin * 0.95, (blink * 4).clamp(max=1.0))
        lash = torch.maximum((ey - edge).abs() - 0.005, around)
        c.paint(lash, _LASH.to(dev), (blink * 3).clamp(max=1.0))
        inner = (-side * 0.04, -s.brow_gap + 0.004 + s.brow_tilt * 0.02)
        outer = (side * 0.05, -s.brow_gap - 0.002)
        c.paint(_segment(ex, ey, inner, outer, 0.008), s.hair * 0.9)


def _paint_mouth(c: _Canvas, s, x, y) -> None:
    """Lips, dark opening, tongue, upper teeth; (x, y) relative to the middle of the lip line.

    The opening's height follows ``open``; ``wide`` stretches the mouth, ``round`` narrows it
    and lifts the upper lip.
    """
    opening, wide, round_ = s.open, s.wide, s.round
    half_w = s.mouth_w * (1 + 0.28 * wide - 0.35 * round_ - 0.08 * opening)
    gap = opening * (0.055 - 0.02 * wide + 0.008 * round_)  # how far the jaw has dropped
    up = 0.002 + 0.022 * round_ * opening  # the upper lip's curve
    lip = 0.007
    depth = gap + 0.045 * s.rest_lips  # at rest: a closed line (0) or a smile (1)
    c.paint(_split_ellipse(x, y, half_w + 0.3 * lip, up + 0.5 * lip, depth + lip), s.lip)
    inner = _split_ellipse(x, y, half_w * 0.88, up * 0.6, (depth - lip * 0.3).clamp(min=0))
    c.paint(inner, s.lip * 0.25, (gap / 0.012).clamp(0, 1))  # the dark opening
    tongue = torch.maximum(_ellipse(x, y - depth, half_w * 0.55, gap * 0.55), inner)
    c.paint(tongue, s.lip + (_TONGUE.to(x.device) - s.lip) * 0.35, (opening * 2 - 0.4).clamp(0, 1))
    c.paint(torch.maximum(inner, y - 0.35 * depth.clamp(max=0.04)), _TEETH.to(x.device), s.teeth)


# --- signed distances (negative inside; in portrait units) ------------------------------------------
def _ellipse(x, y, rx, ry):
    """Approximate distance to the ellipse (x/rx)^2 + (y/ry)^2 = 1: k0 (k0 - 1) / k1 with
    k0 = |p / r|, k1 = |p / r^2| (exact for circles, good near the edge, right sign everywhere),
    raised outside to the distance to the bounding box (thin ellipses need it)."""
    rx, ry = _at_least(rx, 1e-5), _at_least(ry, 1e-5)
    k0 = torch.sqrt((x / rx) ** 2 + (y / ry) ** 2)
    k1 = torch.sqrt((x / rx**2) ** 2 + (y / ry**2) ** 2)
    return torch.maximum(k0 * (k0 - 1) / (k1 + 1e-9), torch.maximum(x.abs() - rx, y.abs() - ry))


def _split_ellipse(x, y, half_w, up, down):
    """A lens: the upper half of an ellipse of height ``up`` over the lower half of one of
    height ``down`` (both of half-width ``half_w``); y grows downwards."""
    return torch.where(y < 0, _ellipse(x, y, half_w, up), _ellipse(x, y, half_w, down))


def _box(x, y, hw, hh, r):
    """Rounded rectangle of half sizes (hw, hh) and corner radius r, centred at 0."""
    r = _smaller(r, _smaller(hw, hh))
    qx, qy = x.abs() - hw + r, y.abs() - hh + r
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    return outside + torch.maximum(qx, qy).clamp(max=0) - r


def _segment(x, y, a, b, r):
    """Capsule of radius r around the segment a-b."""
    (ax, ay), (bx, by) = a, b
    px, py = x - ax, y - ay
    vx, vy = bx - ax, by - ay
    h = ((px * vx + py * vy) / (vx * vx + vy * vy)).clamp(0, 1)
    return torch.sqrt((px - h * vx) ** 2 + (py - h * vy) ** 2) - r


def _triangle(x, y, a, b, c):
    """Triangle with corners a, b, c (either winding; constant corners)."""
    cx, cy = (a[0] + b[0] + c[0]) / 3, (a[1] + b[1] + c[1]) / 3
    d = None
    for (x0, y0), (x1, y1) in ((a, b), (b, c), (c, a)):
        nx, ny = y1 - y0, x0 - x1
        if (cx - x0) * nx + (cy - y0) * ny > 0:  # make the normal point outwards
            nx, ny = -nx, -ny
        side = ((x - x0) * nx + (y - y0) * ny) / math.hypot(nx, ny)
        d = side if d is None else torch.maximum(d, side)
    return d


def _at_least(v, lo):
    return v.clamp(min=lo) if isinstance(v, torch.Tensor) else max(v, lo)


def _smaller(a, b):
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.minimum(a, b)
    if isinstance(a, torch.Tensor):
        return a.clamp(max=b)
    if isinstance(b, torch.Tensor):
        return b.clamp(max=a)
    return min(a, b)


# --- colour helpers -------------------------------------------------------------------------------
def _mix(a, b, t) -> Color:
    return tuple(float(x + (y - x) * t) for x, y in zip(a, b))


def _shade(color, k) -> Color:
    return tuple(float(v * k) for v in color)


def _jitter_hsv(rng: np.random.Generator, color, dh, ds, dv) -> Color:
    h, s, v = colorsys.rgb_to_hsv(*color)
    h = (h + rng.uniform(-dh, dh)) % 1.0
    s = float(np.clip(s + rng.uniform(-ds, ds), 0, 1))
    v = float(np.clip(v + rng.uniform(-dv, dv), 0, 1))
    return tuple(float(x) for x in colorsys.hsv_to_rgb(h, s, v))
