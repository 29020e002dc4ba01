"""Tiled VAE encode / decode, and the VAE's working set (for ``tiled="auto"`` and the planner).

**Tiles.** A frame is cut into overlapping square tiles of ``tile`` latent pixels (x8 in video
pixels). Along each axis the tiles all have the full size (one tile of the whole axis when it
fits) and are spread evenly, so neighbours share at least ``overlap`` latents and no tile is a
sliver. Each tile is weighted by linear ramps across the parts it shares with its neighbours,
normalised so the weights of every output pixel sum to 1, and accumulated in float32 straight
into the output: one decoded tile chunk at a time is alive, never the whole clip of tiles.

**Time.** The Wan VAE is causal in time: the model itself runs a clip in chunks (encode: 1
frame, then 4 at a time; decode: 1 latent frame at a time) with a feature cache of the last
frames of every causal convolution. Each tile runs through all its chunks with its own cache, so
a tile's result is exactly what the untiled model computes on that crop. The chunks are what
bound the activations in time; the clip length only changes the size of the output.

**Why not diffusers' ``tiled_encode`` / ``tiled_decode``** (diffusers 0.42): tiles start every
stride from 0, so the last one can be a sliver lying inside its neighbour (a 56-latent frame
with 32/24 tiles gets a third tile 8 latents wide), decoded with almost no context and blended
in; the geometry is in pixels with floor division to latents, so a size or stride that is not a
multiple of 8 misaligns tiles and blend; every decoded tile of the whole clip is kept until the
end before blending (about (tile/stride)^2 times the output on the device) and the encoder needs
the whole video on the device. The per-chunk calls below are the ones diffusers' own
``_encode`` / ``_decode`` make (``encoder`` / ``decoder`` with ``feat_cache`` / ``feat_idx``,
``first_chunk``), so one tile covering the frame gives the untiled result bit for bit.

**Working set.** :func:`activation_bytes` is the activation peak of one steady-state chunk of a
tile (feature cache included), measured on this architecture by tracing live tensors (see
``tests/test_vae_tiling.py``, which checks the formula against a trace of the real-size VAE on
the meta device). Every activation has a width that is a multiple of the base width (96 for
Wan2.1), so per pixel of the tile it is ``base_dim * (A * dtype_bytes + B)`` bytes (``B`` counts
the float32 islands: RMS norms and nearest upsampling run in float32 whatever the dtype), plus a
little for the few tensors of fixed width (the 3-channel video chunk).
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from ..offload.planner import free_device_bytes

log = logging.getLogger(__name__)

__all__ = [
    "VAETiling",
    "auto_tiling",
    "decode_tiles",
    "encode_tiles",
    "free_device_bytes",
    "smaller_tiling",
    "working_set_bytes",
]

# Bytes of the steady-state chunk per tile pixel: base_dim * (A * dtype_bytes + B) for the
# activations whose width is a multiple of the base width, + C * dtype_bytes + D for the few that
# are not (the encoder's 3-channel input chunk, its 2 z_dim moments). Fitted to traces of the
# real architecture at base widths 8, 32 and 96, 256 x 256 px, fp32 and bf16 (e.g. base 96:
# decode 202.9 / 105.4 bytes per pixel per base channel, encode 148.0 / 78.0), rounded up.
DECODE_BYTES = (49, 10, 0, 0)
ENCODE_BYTES = (35, 8, 25, 34)
# The CUDA caching allocator rounds blocks and cuDNN takes workspaces: what the trace cannot
# see. ``tiled="auto"`` compares ``SAFETY * estimate`` with the budget.
SAFETY = 1.25
AUTO_TILES = (64, 48, 40, 32, 24, 16, 12, 8)  # latent tile sizes "auto" tries, largest first


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be an integer, got the bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ConfigError(f"{what} must be an integer, got {value!r} ({type(value).__name__})") from None


@dataclass(frozen=True)
class VAETiling:
    """Spatial tile geometry, in latent pixels (x8 in video pixels for the Wan VAE).

    ``VAETiling(32, 8)``: 256-px tiles sharing at least 64 px with each neighbour.
    """

    tile: int = 32  # side of a tile, latent pixels
    overlap: int = 8  # latents neighbouring tiles share at least (blended); 0 gives hard seams

    def __post_init__(self) -> None:
        tile, overlap = _int(self.tile, "VAETiling.tile"), _int(self.overlap, "VAETiling.overlap")
        if tile < 1:
            raise ConfigError(f"VAETiling.tile must be >= 1 latent pixel, got {tile}")
        if not 0 <= overlap < tile:
            raise ConfigError(
                f"VAETiling.overlap must be in [0, tile) = [0, {tile}), got {overlap}: neighbouring "
                "tiles share 'overlap' latents, which must leave each tile something of its own."
            )
        object.__setattr__(self, "tile", tile)
        object.__setattr__(self, "overlap", overlap)

    @classmethod
    def from_pixels(cls, tile_px: int, overlap_px: int, spatial_stride: int = 8) -> VAETiling:
        """Geometry given in video pixels; both must be multiples of ``spatial_stride``."""
        tile_px, overlap_px = _int(tile_px, "tile_px"), _int(overlap_px, "overlap_px")
        if tile_px % spatial_stride or overlap_px % spatial_stride:
            raise ConfigError(
                f"VAE tiles are cut in latent pixels ({spatial_stride} video pixels each): tile_px "
                f"{tile_px} and overlap_px {overlap_px} must be multiples of {spatial_stride}"
            )
        return cls(tile_px // spatial_stride, overlap_px // spatial_stride)

    def spans(self, size: int) -> list[tuple[int, int]]:
        """[start, end) of the tiles along an axis of ``size`` latents, in order.

        One tile when ``size <= tile``; otherwise n full tiles, n the fewest with neighbours
        sharing >= ``overlap``, their starts spread evenly from 0 to ``size - tile``.
        """
        if size <= self.tile:
            return [(0, size)]
        stride = self.tile - self.overlap
        n = 1 + -(-(size - self.tile) // stride)
        starts = [i * (size - self.tile) // (n - 1) for i in range(n)]
        return [(s, s + self.tile) for s in starts]

    def count(self, height: int, width: int) -> int:
        """Tiles for a latent frame of ``height`` x ``width``."""
        return len(self.spans(height)) * len(self.spans(width))


def blend_weights(spans: list[tuple[int, int]], scale: int = 1) -> list[torch.Tensor]:
    """Per-tile float32 weights along one axis (output units: ``scale`` per latent).

    Each tile ramps linearly, (i + 1) / (r + 1), over the ``r`` outputs it shares with a
    neighbour, and is 1 elsewhere; weights are then divided by their sum over tiles, so every
    output position's weights sum to 1 (exactly 1.0 where only one tile covers it).
    """
    size = spans[-1][1] * scale
    raw = []
    for k, (a, b) in enumerate(spans):
        n = (b - a) * scale
        w = torch.ones(n, dtype=torch.float64)
        before = (spans[k - 1][1] - a) * scale if k > 0 else 0
        after = (b - spans[k + 1][0]) * scale if k + 1 < len(spans) else 0
        if before > 0:
            w[:before] = torch.minimum(w[:before], torch.arange(1, before + 1) / (before + 1))
        if after > 0:
            w[n - after :] = torch.minimum(w[n - after :], torch.arange(after, 0, -1) / (after + 1))
        raw.append(w)
    total = torch.zeros(size, dtype=torch.float64)
    for (a, _), w in zip(spans, raw):
        total[a * scale : a * scale + w.numel()] += w
    return [(w / total[a * scale : a * scale + w.numel()]).float() for (a, _), w in zip(spans, raw)]


def check_tileable(model: Any) -> None:
    """Refuse VAEs this loop does not know (Wan2.2's patchified VAE)."""
    if getattr(model.config, "patch_size", None) is not None:
        raise ConfigError(
            f"tiled VAE supports the Wan2.1 VAE (no patchify); this one has patch_size "
            f"{model.config.patch_size}. Run it untiled (tiled=False)."
        )


def _conv_count(part: torch.nn.Module) -> int:
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    return sum(isinstance(m, WanCausalConv3d) for m in part.modules())


def encode_tiles(
    model: Any, video: torch.Tensor, tiling: VAETiling, *, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Posterior mean of ``video`` [B, 3, 1+4k, H, W] -> [B, z, 1+k, H/8, W/8] float32 on ``device``.

    ``video`` may stay on the host: each chunk of each tile is moved to ``device`` / ``dtype``
    when it runs. Latents are not normalised here (the VAE wrapper does it).
    """
    check_tileable(model)
    s, ts = model.config.scale_factor_spatial, model.config.scale_factor_temporal
    z_dim = model.config.z_dim
    B, _, F, H, W = video.shape
    T, h, w = 1 + (F - 1) // ts, H // s, W // s
    rows, cols = tiling.spans(h), tiling.spans(w)
    single = len(rows) == len(cols) == 1
    wy, wx = blend_weights(rows), blend_weights(cols)
    out = torch.zeros(B, z_dim, T, h, w, device=device, dtype=torch.float32)
    convs = _conv_count(model.encoder)
    for (y0, y1), wyk in zip(rows, wy):
        for (x0, x1), wxk in zip(cols, wx):
            cache: list = [None] * convs  # this tile's causal feature cache
            chunks = []
            for i in range(T):
                f0, f1 = (0, 1) if i == 0 else (1 + ts * (i - 1), 1 + ts * i)
                piece = video[:, :, f0:f1, s * y0 : s * y1, s * x0 : s * x1].to(device, dtype)
                chunks.append(model.encoder(piece, feat_cache=cache, feat_idx=[0]))
            moments = model.quant_conv(torch.cat(chunks, 2))  # (B, 2z, T, th, tw): mean, logvar
            mu = moments[:, :z_dim]
            region = out[:, :, :, y0:y1, x0:x1]
            if single:
                region.copy_(mu)
            else:
                weight = (wyk[:, None] * wxk[None, :]).to(device)  # (th, tw)
                region.addcmul_(mu.float(), weight)
            del chunks, moments, mu, cache
    return out


def decode_tiles(
    model: Any,
    z: torch.Tensor,
    tiling: VAETiling,
    *,
    out_device: torch.device | str | None = None,
) -> torch.Tensor:
    """Denormalised latents [B, z, T, h, w] (model device / dtype) -> video float32 in [-1, 1].

    Output [B, 3, 1 + 4(T-1), 8h, 8w] on ``out_device`` (default: z's device); each decoded
    chunk of each tile is added into it as soon as it is made.
    """
    check_tileable(model)
    s, ts = model.config.scale_factor_spatial, model.config.scale_factor_temporal
    B, _, T, h, w = z.shape
    rows, cols = tiling.spans(h), tiling.spans(w)
    single = len(rows) == len(cols) == 1
    wy, wx = blend_weights(rows, s), blend_weights(cols, s)
    out_device = torch.device(out_device) if out_device is not None else z.device
    channels = model.config.out_channels
    out = torch.zeros(B, channels, 1 + ts * (T - 1), s * h, s * w, device=out_device, dtype=torch.float32)
    convs = _conv_count(model.decoder)
    for (y0, y1), wyk in zip(rows, wy):
        for (x0, x1), wxk in zip(cols, wx):
            weight = None if single else (wyk[:, None] * wxk[None, :]).to(out_device)  # (th*s, tw*s)
            x = model.post_quant_conv(z[:, :, :, y0:y1, x0:x1])
            cache: list = [None] * convs  # this tile's causal feature cache
            for k in range(T):
                chunk = model.decoder(x[:, :, k : k + 1], feat_cache=cache, feat_idx=[0], first_chunk=k == 0)
                f0 = 0 if k == 0 else 1 + ts * (k - 1)  # chunk: (B, 3, 1 | 4, th*s, tw*s)
                region = out[:, :, f0 : f0 + chunk.shape[2], s * y0 : s * y1, s * x0 : s * x1]
                if weight is None:
                    region.copy_(chunk)
                else:
                    region.addcmul_(chunk.to(out_device, torch.float32), weight)
                del chunk
            del x, cache
    return out.clamp_(-1.0, 1.0)  # as the untiled decoder does


# --- working set -------------------------------------------------------------------------------
def _base_dim(config: Any, kind: str) -> int:
    if kind == "decode":
        return config.decoder_base_dim or config.base_dim
    return config.base_dim


def activation_bytes(config: Any, dtype: torch.dtype, height_px: int, width_px: int, *, kind: str) -> int:
    """Activation peak of one steady-state chunk of a ``height_px`` x ``width_px`` tile.

    ``kind`` is 'encode' (4 video frames in) or 'decode' (1 latent frame in, 4 frames out);
    the feature cache is included. See the module docstring for where the numbers come from.
    """
    if kind not in ("encode", "decode"):
        raise ValueError(f"kind must be 'encode' or 'decode', got {kind!r}")
    a, b, c, d = DECODE_BYTES if kind == "decode" else ENCODE_BYTES
    per_pixel = _base_dim(config, kind) * (a * dtype.itemsize + b) + c * dtype.itemsize + d
    return height_px * width_px * per_pixel


def working_set_bytes(
    config: Any,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    *,
    kind: str,
    tiling: VAETiling | None = None,
) -> int:
    """Device bytes an encode / decode of ``shape`` needs beyond the weights.

    ``shape`` is the video [B, 3, F, H, W] for 'encode', the latents [B, z, T, h, w] for
    'decode'. Untiled (``tiling=None``, diffusers' path): the activation peak of the whole
    frame, plus the input on the device and the output (decode: the growing concatenation of
    chunks, twice its size while it grows, its clamp, and the float32 copy). Tiled: the peak of
    one tile, plus the float32 output accumulated on the device.
    """
    s, ts = config.scale_factor_spatial, config.scale_factor_temporal
    if kind == "encode":
        B, C, F, H, W = shape
        T, h, w = 1 + (F - 1) // ts, H // s, W // s
    else:
        B, _, T, h, w = shape
        F, H, W = 1 + ts * (T - 1), s * h, s * w
    video = B * 3 * F * H * W  # elements
    latents = B * config.z_dim * T * h * w
    if tiling is None:
        peak = B * activation_bytes(config, dtype, H, W, kind=kind)
        if kind == "encode":  # video in the model dtype, moments (2z channels), float32 mean
            return peak + video * dtype.itemsize + latents * (2 * dtype.itemsize + 4)
        return peak + latents * dtype.itemsize + video * (3 * dtype.itemsize + 4)
    th, tw = min(tiling.tile, h) * s, min(tiling.tile, w) * s
    peak = B * activation_bytes(config, dtype, th, tw, kind=kind)
    return peak + (latents if kind == "encode" else video) * 4


def auto_tiling(
    config: Any,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    budget_bytes: int | None,
    *,
    kind: str,
    tiles: tuple[int, ...] | None = None,
) -> VAETiling | None:
    """The tiling ``tiled="auto"`` uses: None when the untiled working set fits the budget.

    Otherwise the largest tile of ``tiles`` (default :data:`AUTO_TILES`; overlap a quarter of
    the tile, at least 1, at most 8)
    whose working set fits; if none does, the smallest, with a warning. Estimates are scaled by
    :data:`SAFETY`. ``budget_bytes`` None (no device limit known, e.g. on the CPU) never tiles.
    """
    if budget_bytes is None:
        return None
    need = working_set_bytes(config, dtype, shape, kind=kind)
    if SAFETY * need <= budget_bytes:
        return None
    tiling = None
    for tile in tiles or AUTO_TILES:
        tiling = VAETiling(tile, max(1, min(8, tile // 4)))
        if SAFETY * working_set_bytes(config, dtype, shape, kind=kind, tiling=tiling) <= budget_bytes:
            return tiling
    least = SAFETY * working_set_bytes(config, dtype, shape, kind=kind, tiling=tiling)
    log.warning(
        "VAE %s of %s needs about %.1f MiB even in %d-px tiles; the budget is %.1f MiB. "
        "Trying anyway with the smallest tiles.",
        kind,
        tuple(shape),
        least / 2**20,
        tiling.tile * config.scale_factor_spatial,
        budget_bytes / 2**20,
    )
    return tiling


def smaller_tiling(current: VAETiling | None, height: int, width: int) -> VAETiling | None:
    """The next tiling "auto" falls back to when ``current`` ran out of device memory anyway
    (the estimate cannot see cuDNN workspaces or a fragmented cache): the largest of
    :data:`AUTO_TILES` smaller than ``current``'s tile, or than the ``height`` x ``width``
    latent frame when ``current`` is None (untiled). None when nothing smaller is left."""
    limit = current.tile if current is not None else max(height, width)
    for tile in AUTO_TILES:
        if tile < limit:
            return VAETiling(tile, max(1, min(8, tile // 4)))
    return None
