"""Tiled VAE: tile geometry, blending, exactness, ``tiled="auto"`` and the working-set formula.

About the accuracy bar. The tiny preset's random weights give the decoder a receptive field of
about 17 latents with no decay, and the mid-block attention is global over the frame: no tiling
of a 3 x 5 latent frame can come within 1e-2 of the untiled output (a 16-latent tile on a
20-latent frame, 12 shared, still differs by 29 % at worst, attention switched off or not).
What tiling itself must get right (geometry, ramps, normalisation, causal chunks, caches, odd
sizes) is tested exactly: on a *spatially local* variant of the tiny VAE (3 x 3 kernels reduced to
their centre tap, attention output zeroed) a tiled result must equal the untiled one to float
rounding (1e-5 relative, far inside 1e-2), and one tile covering the frame must be bitwise equal.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock
from memtrace import PeakBytes

from wanstudio.encoders import VAE, VAETiling
from wanstudio.encoders.vae_tiling import (
    DECODE_BYTES,
    ENCODE_BYTES,
    activation_bytes,
    auto_tiling,
    blend_weights,
    working_set_bytes,
)
from wanstudio.errors import ConfigError


@pytest.fixture(scope="module")
def vae() -> VAE:
    return VAE.tiny()


@pytest.fixture(scope="module")
def local_vae() -> VAE:
    """The tiny VAE made spatially pointwise: what it computes at a pixel depends only on that
    pixel (and its 8 x 8 block through the resamplers), so tiles aligned to latents cannot
    change anything but rounding."""
    v = VAE.tiny()
    with torch.no_grad():
        for m in v.model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)) and m.kernel_size[-1] == 3:
                centre = m.weight[..., 1:2, 1:2].clone()
                m.weight.zero_()
                m.weight[..., 1:2, 1:2] = centre
            if isinstance(m, WanAttentionBlock):
                m.proj.weight.zero_()
                m.proj.bias.zero_()
    return v


def _video(frames=5, height=24, width=40, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, height, width, generator=g) * 2 - 1


def _latents(frames=2, height=3, width=5, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, frames, height, width, generator=g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# --- geometry ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "tile", "overlap", "spans"),
    [
        (5, 8, 2, [(0, 5)]),  # fits: one tile of the whole axis
        (8, 8, 2, [(0, 8)]),  # exactly one tile (diffusers' tiled_decode would add a sliver)
        # stride 6: n = 1 + ceil((9 - 8) / 6) = 2, starts 0 and 1
        (9, 8, 2, [(0, 8), (1, 9)]),
        # stride 24: n = 1 + ceil(24 / 24) = 2 (diffusers: 3 tiles, the last 8 wide inside [24, 56))
        (56, 32, 8, [(0, 32), (24, 56)]),
        # stride 4: n = 1 + ceil(14 / 4) = 5, starts i * 14 // 4 = 0, 3, 7, 10, 14
        (20, 6, 2, [(0, 6), (3, 9), (7, 13), (10, 16), (14, 20)]),
        # overlap 0, stride 3: n = 1 + ceil(4 / 3) = 3, starts i * 4 // 2 = 0, 2, 4
        (7, 3, 0, [(0, 3), (2, 5), (4, 7)]),
    ],
)
def test_tile_spans(size, tile, overlap, spans):
    assert VAETiling(tile, overlap).spans(size) == spans


@pytest.mark.parametrize("tile,overlap", [(1, 0), (2, 1), (3, 1), (4, 0), (5, 3), (8, 2)])
def test_tiles_cover_every_size_with_full_tiles_and_the_overlap(tile, overlap):
    tiling = VAETiling(tile, overlap)
    for size in range(1, 40):
        spans = tiling.spans(size)
        assert spans[0][0] == 0 and spans[-1][1] == size
        assert all(b - a == min(tile, size) for a, b in spans)  # no slivers
        for (a0, b0), (a1, _) in zip(spans, spans[1:]):
            assert a0 < a1 and b0 - a1 >= overlap  # ordered, sharing at least `overlap`


def test_blend_weights_are_linear_ramps_summing_to_one():
    # two tiles sharing 2: the first ramps down 2/3, 1/3, the second up 1/3, 2/3
    w0, w1 = blend_weights([(0, 4), (2, 6)])
    torch.testing.assert_close(w0, torch.tensor([1, 1, 2 / 3, 1 / 3]))
    torch.testing.assert_close(w1, torch.tensor([1 / 3, 2 / 3, 1, 1]))
    # in video pixels (8 per latent) and with three tiles overlapping one spot: still sum to 1
    for spans in ([(0, 4), (2, 6)], [(0, 6), (3, 9), (7, 13), (10, 16), (14, 20)], [(0, 3), (1, 4), (2, 5)]):
        for scale in (1, 8):
            total = torch.zeros(spans[-1][1] * scale)
            for (a, _), w in zip(spans, blend_weights(spans, scale)):
                assert (w > 0).all()
                total[a * scale : a * scale + w.numel()] += w
            torch.testing.assert_close(total, torch.ones_like(total))
    # one tile: exactly 1.0 everywhere (what makes one tile bitwise)
    (w,) = blend_weights([(0, 5)], 8)
    assert torch.equal(w, torch.ones(40))


@pytest.mark.parametrize(
    "make",
    [
        lambda: VAETiling(0, 0),
        lambda: VAETiling(4, 4),
        lambda: VAETiling(4, -1),
        lambda: VAETiling(True, 0),
        lambda: VAETiling(4.5, 1),
        lambda: VAETiling.from_pixels(100, 16),
    ],
)
def test_bad_tilings_are_refused(make):
    with pytest.raises(ConfigError):
        make()


def test_from_pixels_converts_to_latents():
    assert VAETiling.from_pixels(256, 64) == VAETiling(32, 8)


def test_tiled_argument_is_checked(vae):
    with pytest.raises(ConfigError, match="tiled must be True, False or 'auto'"):
        vae.decode(_latents(), tiled="yes")
    with pytest.raises(ConfigError, match="pass tiled=True"):
        vae.decode(_latents(), tiling=VAETiling(2, 1))


# --- exactness ---------------------------------------------------------------------------------
@pytest.mark.parametrize("frames,height,width", [(5, 24, 40), (1, 16, 8), (9, 8, 24)])
def test_one_tile_encode_is_bitwise_untiled(vae, frames, height, width):
    video = _video(frames, height, width)
    whole = vae.encode(video)
    assert torch.equal(vae.encode(video, tiled=True, tiling=VAETiling(8, 2)), whole)
    assert torch.equal(vae.encode(video, tiled="auto", memory_budget_bytes=2**40), whole)


@pytest.mark.parametrize("frames,height,width", [(2, 3, 5), (1, 2, 1), (3, 1, 3)])
def test_one_tile_decode_is_bitwise_untiled(vae, frames, height, width):
    z = _latents(frames, height, width)
    whole = vae.decode(z)
    assert torch.equal(vae.decode(z, tiled=True, tiling=VAETiling(5, 2)), whole)
    assert torch.equal(vae.decode(z, tiled="auto", memory_budget_bytes=2**40), whole)


@pytest.mark.slow
@pytest.mark.parametrize("tiling", [VAETiling(2, 1), VAETiling(2, 0), VAETiling(4, 3)])
def test_tiled_encode_equals_untiled_where_the_model_is_local(local_vae, tiling):
    video = _video(5, 24, 40)  # 2 latent frames of 3 x 5: tiles of 2 every 1 or 2, of 4 every 1
    assert tiling.count(3, 5) > 1
    assert _rel(local_vae.encode(video, tiled=True, tiling=tiling), local_vae.encode(video)) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("tiling", [VAETiling(2, 1), VAETiling(3, 1), VAETiling(2, 0), VAETiling(4, 3)])
def test_tiled_decode_equals_untiled_where_the_model_is_local(local_vae, tiling):
    z = _latents(3, 3, 5)  # 9 frames of 24 x 40 px
    assert _rel(local_vae.decode(z, tiled=True, tiling=tiling), local_vae.decode(z)) < 1e-5


@pytest.mark.slow
def test_tiled_decode_can_assemble_the_video_on_another_device(local_vae):
    z = _latents()
    out = local_vae.decode(z, tiled=True, tiling=VAETiling(2, 1), out_device="cpu")
    assert out.device.type == "cpu" and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1


@pytest.mark.slow
def test_tiled_encode_takes_the_video_from_the_host_as_is(local_vae):
    video = _video()
    before = video.clone()
    local_vae.encode(video, tiled=True, tiling=VAETiling(2, 1))
    assert torch.equal(video, before)  # never modified (chunks are copied to the device)


# --- auto ----------------------------------------------------------------------------------------
def test_auto_picks_the_largest_tile_that_fits():
    config, dtype, shape = VAE.tiny().model.config, torch.bfloat16, (1, 16, 21, 60, 104)  # 480 x 832
    untiled = working_set_bytes(config, dtype, shape, kind="decode")
    assert auto_tiling(config, dtype, shape, int(1.25 * untiled), kind="decode") is None
    assert auto_tiling(config, dtype, shape, None, kind="decode") is None  # no device limit (CPU)
    # 40-latent tiles fit 1.25 x their working set, 48-latent ones do not
    need = {
        t: working_set_bytes(config, dtype, shape, kind="decode", tiling=VAETiling(t, 8)) for t in (40, 48)
    }
    assert need[48] > need[40]
    chosen = auto_tiling(config, dtype, shape, int(1.25 * need[40]), kind="decode")
    assert chosen == VAETiling(40, 8)


@pytest.mark.slow
def test_auto_decodes_with_the_tiling_it_picked(vae, monkeypatch):
    monkeypatch.setattr("wanstudio.encoders.vae_tiling.AUTO_TILES", (4, 2))
    z = _latents(2, 6, 6)
    config, shape = vae.model.config, tuple(z.shape)
    budget = int(
        1.25 * working_set_bytes(config, torch.float32, shape, kind="decode", tiling=VAETiling(4, 1))
    )
    assert auto_tiling(config, torch.float32, shape, budget, kind="decode") == VAETiling(4, 1)
    auto = vae.decode(z, tiled="auto", memory_budget_bytes=budget)
    assert torch.equal(auto, vae.decode(z, tiled=True, tiling=VAETiling(4, 1)))
    assert not torch.equal(auto, vae.decode(z))


def test_auto_warns_and_uses_the_smallest_tiles_when_nothing_fits(vae, caplog):
    with caplog.at_level("WARNING"):
        chosen = auto_tiling(vae.model.config, torch.float32, (1, 16, 2, 30, 30), 1, kind="decode")
    assert chosen == VAETiling(8, 2) and "even in 64-px tiles" in caplog.text
    with caplog.at_level("WARNING"):
        assert auto_tiling(
            vae.model.config, torch.float32, (1, 16, 2, 30, 30), 1, kind="decode", tiles=(3,)
        ) == (VAETiling(3, 1))


def _oom_above(part: torch.nn.Module, width: int) -> list[int]:
    """Make ``part`` (encoder / decoder) run out of memory on inputs wider than ``width`` once
    its causal cache holds something (a second chunk: the first filled the cache); the widths
    it was called with are recorded."""
    calls, forward = [], part.forward

    def limited(x, *args, feat_cache, **kwargs):
        calls.append(x.shape[-1])
        if x.shape[-1] > width and any(c is not None for c in feat_cache):
            raise torch.OutOfMemoryError(f"fake: {x.shape[-1]} > {width}")
        return forward(x, *args, feat_cache=feat_cache, **kwargs)

    part.forward = limited
    return calls


@pytest.mark.parametrize("kind", ["decode", "encode"])
def test_auto_retries_in_smaller_tiles_when_the_device_runs_out(kind, monkeypatch, caplog):
    """The estimate can miss (cuDNN workspaces, fragmentation): "auto" then steps down the tile
    sizes until one runs, giving exactly what tiled=True with that tiling gives."""
    monkeypatch.setattr("wanstudio.encoders.vae_tiling.AUTO_TILES", (4, 2))
    vae, x = VAE.tiny(), _latents(2, 6, 6) if kind == "decode" else _video(5, 48, 48)
    expected = getattr(vae, kind)(x, tiled=True, tiling=VAETiling(2, 1))
    part, limit = (vae.model.decoder, 2) if kind == "decode" else (vae.model.encoder, 16)
    calls = _oom_above(part, limit)
    with caplog.at_level("WARNING"):
        out = getattr(vae, kind)(x, tiled="auto", memory_budget_bytes=2**40)  # untiled first
    assert torch.equal(out, expected)
    assert calls[0] > limit  # the untiled attempt, then 4-latent tiles, then 2-latent ones
    assert "untiled; retrying in 32-px tiles" in caplog.text
    assert "in 32-px tiles; retrying in 16-px tiles" in caplog.text
    # the failed untiled attempt's causal cache (diffusers keeps it on the model) is dropped
    assert all(c is None for c in vae.model._feat_map + vae.model._enc_feat_map)
    with pytest.raises(torch.OutOfMemoryError):  # asked for untiled: no second guess
        getattr(vae, kind)(x, tiled=False)
    _oom_above(part, 0)
    with pytest.raises(torch.OutOfMemoryError):  # nothing smaller left
        getattr(vae, kind)(x, tiled="auto", memory_budget_bytes=2**40)


# --- memory --------------------------------------------------------------------------------------
def _chunk_peak(model, kind: str, height_px: int, width_px: int, dtype) -> int:
    """Traced peak of the third (steady-state) chunk, cache of the earlier ones included."""
    device = next(model.parameters()).device
    s, z = 8, model.config.z_dim
    with torch.inference_mode(), PeakBytes() as trace:
        if kind == "decode":
            x = torch.zeros(1, z, 3, height_px // s, width_px // s, device=device, dtype=dtype)
            cache = [None] * model._cached_conv_counts["decoder"]
            for k in range(3):
                if k == 2:
                    trace.peak = trace.live
                out = model.decoder(x[:, :, k : k + 1], feat_cache=cache, feat_idx=[0], first_chunk=k == 0)
                del out
        else:
            x = torch.zeros(1, 3, 9, height_px, width_px, device=device, dtype=dtype)
            cache = [None] * model._cached_conv_counts["encoder"]
            for k, (a, b) in enumerate([(0, 1), (1, 5), (5, 9)]):
                if k == 2:
                    trace.peak = trace.live
                out = model.encoder(x[:, :, a:b], feat_cache=cache, feat_idx=[0])
                del out
    return trace.peak


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["encode", "decode"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_formula_bounds_the_traced_peak_of_the_tiny_vae(vae, kind, dtype):
    model = vae.model if dtype == torch.float32 else VAE.tiny().model.to(dtype)
    traced = _chunk_peak(model, kind, 64, 96, dtype)
    formula = activation_bytes(model.config, dtype, 64, 96, kind=kind)
    assert traced <= formula <= 1.1 * traced


@pytest.mark.parametrize("kind", ["encode", "decode"])
def test_activation_formula_bounds_the_real_size_vae_on_meta(kind):
    """The Wan2.1 VAE (base width 96) at 480 x 832, bf16, traced on the meta device: the formula
    (measured at width 8) scales with the channel widths."""
    with torch.device("meta"):
        model = AutoencoderKLWan(base_dim=96, z_dim=16).to(torch.bfloat16).eval()
    traced = _chunk_peak(model, kind, 480, 832, torch.bfloat16)
    formula = activation_bytes(model.config, torch.bfloat16, 480, 832, kind=kind)
    assert traced <= formula <= 1.05 * traced
    a, b, c, d = DECODE_BYTES if kind == "decode" else ENCODE_BYTES
    assert formula == 480 * 832 * (96 * (a * 2 + b) + c * 2 + d)  # ~4.1 GB decoding, ~3.0 GB encoding


@pytest.mark.slow
def test_tiled_decode_peak_is_lower_and_within_the_estimate(vae):
    z = _latents(2, 8, 8)  # 64 x 64 px; tiles of 24 px
    tiling = VAETiling(3, 1)
    peaks = {}
    for name, kw in (("untiled", {}), ("tiled", {"tiled": True, "tiling": tiling})):
        with PeakBytes() as trace:
            vae.decode(z, **kw)
        peaks[name] = trace.peak
    config = vae.model.config
    assert peaks["untiled"] <= working_set_bytes(config, torch.float32, tuple(z.shape), kind="decode")
    assert peaks["tiled"] <= working_set_bytes(
        config, torch.float32, tuple(z.shape), kind="decode", tiling=tiling
    )
    assert peaks["tiled"] < peaks["untiled"] / 2
