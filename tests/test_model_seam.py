"""The model seam (embed -> run_blocks -> run_head) and ModelInputs, its inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import wanstudio as ws
from wanstudio.model import StepState
from wanstudio.model.layers import fp32_linear, time_sinusoid
from wanstudio.offload import FakeTransferBackend, enable_block_swap

CASES = [("tiny-t2v", 1), ("tiny-i2v", 1), ("tiny-infinitetalk", 1), ("tiny-infinitetalk", 2)]
FIELDS = ("x", "t", "context", "clip_fea", "y", "audio", "ref_target_masks")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny GEMMs: one thread is faster on a busy machine
    yield
    torch.set_num_threads(n)


def _model(preset: str, layers: int | None = None) -> ws.WanModel:
    cfg = ws.WanConfig.preset(preset)
    if layers is not None:
        cfg = cfg.replace(num_layers=layers)
    torch.manual_seed(0)
    return ws.WanModel(cfg).eval()


# --- references: the code as it was before the split ------------------------------------------------
def old_make_inputs(cfg, *, batch=1, frames=3, height=6, width=10, speakers=1, text_tokens=7, seed=0) -> dict:
    """tests/conftest.py::make_inputs before ModelInputs.example replaced it (verbatim)."""
    g = torch.Generator().manual_seed(seed)
    inputs = dict(
        x=torch.randn(batch, cfg.out_dim, frames, height, width, generator=g),
        t=torch.linspace(999.0, 250.0, batch),
        context=torch.randn(batch, text_tokens, cfg.text_dim, generator=g),
    )
    if cfg.is_i2v:
        inputs["y"] = torch.randn(batch, cfg.cond_dim, frames, height, width, generator=g)
        inputs["clip_fea"] = torch.randn(batch, 5, cfg.clip_dim, generator=g)
    if cfg.audio:
        f_video = cfg.vae_scale * (frames - 1) + 1
        inputs["audio"] = torch.randn(
            batch, speakers, f_video, cfg.audio_window, cfg.audio_layers, cfg.audio_dim, generator=g
        )
        if speakers == 2:
            masks = torch.zeros(3, height * 8, width * 8)
            masks[0, :, : width * 4] = 1
            masks[1, :, width * 4 :] = 1
            masks[2, : height * 2] = 1
            inputs["ref_target_masks"] = masks
    return inputs


def old_forward(model, x, t, context, clip_fea=None, y=None, audio=None, ref_target_masks=None):
    """WanModel.forward before the split into embed / run_blocks / run_head (same operations)."""
    cfg = model.config
    dtype, device = model.dtype, model.device
    B = x.shape[0]
    if cfg.is_i2v:
        x = torch.cat([x, y], dim=1)
    x = model.patch_embedding(x.to(device=device, dtype=dtype))
    grid = tuple(x.shape[2:])
    x = x.flatten(2).transpose(1, 2)
    rope = model._rope(grid, device)
    e = fp32_linear(
        model.time_embedding[2],
        F.silu(fp32_linear(model.time_embedding[0], time_sinusoid(t.to(device), cfg.freq_dim))),
    )
    e0 = fp32_linear(model.time_projection[1], F.silu(e)).unflatten(1, (6, cfg.dim))
    context = F.pad(context.to(device=device, dtype=dtype), (0, 0, 0, cfg.text_len - context.shape[1]))
    text = model.text_embedding(context)
    image = model.img_emb(clip_fea.to(device=device, dtype=dtype)) if cfg.is_i2v else None
    audio_tokens, ref_masks, speakers = None, None, 1
    if cfg.audio:
        speakers = audio.shape[1]
        tokens = model.audio_proj(audio.to(device).flatten(0, 1)).unflatten(0, (B, speakers))
        audio_tokens = tokens.permute(0, 2, 1, 3, 4).flatten(2, 3)
        if speakers > 1:
            ref_masks = model._token_masks(ref_target_masks, grid, B)
    for block in model.blocks:
        x = block(x, e0, rope, grid, text, image, audio_tokens, ref_masks, speakers)
    return model._unpatchify(model.head(x, e), grid)


# --- ModelInputs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("preset, speakers", CASES)
@pytest.mark.parametrize("seed, batch", [(0, 1), (3, 2)])
def test_example_reproduces_the_old_test_builder(preset, speakers, seed, batch):
    cfg = ws.WanConfig.preset(preset)
    kw = dict(batch=batch, frames=2, height=4, width=6, speakers=speakers, text_tokens=9, seed=seed)
    old = old_make_inputs(cfg, **kw)
    new = ws.ModelInputs.example(cfg, **kw)
    for name in FIELDS:
        value = getattr(new, name)
        if name in old:
            assert torch.equal(value, old[name]), name
            assert value.dtype == old[name].dtype
        else:
            assert value is None, name
    assert set(new.as_kwargs()) == set(old)
    default = ws.ModelInputs.example(cfg, speakers=speakers).as_kwargs()  # conftest's defaults
    for name, value in old_make_inputs(cfg, speakers=speakers).items():
        assert torch.equal(default[name], value), name


def test_example_options_and_to():
    cfg = ws.WanConfig.preset("tiny-infinitetalk")
    inputs = ws.ModelInputs.example(cfg, clip_tokens=257, t=500.0, dtype=torch.bfloat16, batch=2)
    assert inputs.clip_fea.shape == (2, 257, cfg.clip_dim)
    assert torch.equal(inputs.t, torch.tensor([500.0, 500.0]))
    for name in ("x", "context", "clip_fea", "y", "audio"):
        assert getattr(inputs, name).dtype == torch.bfloat16, name
    assert inputs.t.dtype == torch.float32  # 999 is not a bf16 number: t keeps fp32
    fp32 = ws.ModelInputs.example(cfg, clip_tokens=257, batch=2)
    assert torch.equal(inputs.x, fp32.x.bfloat16())  # same draws, then cast
    back = inputs.to(dtype=torch.float32)
    assert back.x.dtype == torch.float32 and back is not inputs and inputs.x.dtype == torch.bfloat16
    assert ws.ModelInputs.example(cfg, speakers=2, device="meta").ref_target_masks.device.type == "meta"


@pytest.mark.parametrize("preset", sorted(ws.PRESETS))
@pytest.mark.parametrize("speakers, batch", [(1, 1), (2, 2)])
def test_example_fits_every_preset(preset, speakers, batch):
    cfg = ws.WanConfig.preset(preset)
    if speakers == 2 and not cfg.audio:
        pytest.skip("speakers are InfiniteTalk's")
    model = ws.WanModel(cfg, device="meta")
    inputs = ws.ModelInputs.example(cfg, speakers=speakers, batch=batch, frames=2, height=4, width=4)
    model._check_inputs(inputs)  # raises ShapeError if the model would refuse them
    # the check is real: a field the preset needs, missing, is refused
    if cfg.is_i2v:
        inputs.y = None
        with pytest.raises(ws.ShapeError, match="i2v model needs"):
            model._check_inputs(inputs)


def test_inputs_the_model_refuses_still_raise_through_forward():
    cfg = ws.WanConfig.preset("tiny-infinitetalk")
    inputs = ws.ModelInputs.example(cfg, speakers=2)
    inputs.ref_target_masks = None
    with pytest.raises(ws.ShapeError, match="two speakers need ref_target_masks"):
        _model("tiny-infinitetalk")(**inputs.as_kwargs())


# --- the seam -------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset, speakers", CASES)
def test_forward_is_embed_run_blocks_run_head_and_unchanged(preset, speakers):
    model = _model(preset)
    inputs = ws.ModelInputs.example(model.config, batch=2, speakers=speakers)
    with torch.no_grad():
        out = model(**inputs.as_kwargs())
        tokens, state = model.embed(inputs)
        split = model.run_head(model.run_blocks(tokens, state), state)
        before = old_forward(model, **inputs.as_kwargs())
    assert isinstance(state, StepState) and state.speakers == speakers
    f, h, w = state.grid
    assert tokens.shape == (2, f * h * w, model.config.dim)
    assert state.e.shape == (2, model.config.dim) and state.e0.shape == (2, 6, model.config.dim)
    assert (state.ref_masks is not None) == (speakers == 2)
    assert torch.equal(out, split)
    assert torch.equal(out, before)  # bit-identical to the forward before the split


@pytest.mark.parametrize("preset, speakers", [("tiny-t2v", 1), ("tiny-infinitetalk", 2)])
def test_block_ranges_compose(preset, speakers):
    model = _model(preset, layers=4)
    inputs = ws.ModelInputs.example(model.config, speakers=speakers)
    with torch.no_grad():
        tokens, state = model.embed(inputs)
        full = model.run_blocks(tokens, state)
        for k in range(5):
            assert torch.equal(model.run_blocks(model.run_blocks(tokens, state, 0, k), state, k), full), k
        assert torch.equal(model.run_blocks(tokens, state, 2, 2), tokens)  # empty range
        by_hand = tokens
        for block in model.blocks:
            s = state
            by_hand = block(
                by_hand, s.e0, s.rope, s.grid, s.text, s.image, s.audio_tokens, s.ref_masks, s.speakers
            )
        assert torch.equal(full, by_hand)
    for start, stop in [(-1, 2), (3, 2), (0, 5)]:
        with pytest.raises(ws.ShapeError, match="block range"):
            model.run_blocks(tokens, state, start, stop)


def test_a_run_blocks_wrapper_is_called_by_forward_under_block_swap():
    """A cache-like wrapper on the instance: forward (and block swap's step hooks) go through it."""
    model = _model("tiny-t2v", layers=4)
    inputs = ws.ModelInputs.example(model.config)
    with torch.inference_mode():
        reference = model(**inputs.as_kwargs())
    enable_block_swap(model, 2, backend=FakeTransferBackend())
    inner, calls, saved = model.run_blocks, [], {}

    def cached(tokens, state, start=0, stop=None):
        calls.append((start, stop))
        if "residual" in saved:  # second step: skip every block
            return tokens + saved["residual"]
        first = inner(tokens, state, 0, 1)  # a cache decides from block 0 ...
        out = inner(first, state, 1, None)  # ... then runs the rest
        saved["residual"] = out - tokens
        return out

    model.run_blocks = cached
    with torch.inference_mode():
        full = model(**inputs.as_kwargs())
        reused = model(**inputs.as_kwargs())
    assert calls == [(0, None), (0, None)]
    assert torch.equal(full, reference)  # blocks [0, 1) + [1, 4) = all blocks, through swapped slots
    assert torch.allclose(reused, reference, rtol=0, atol=1e-5)  # tokens + (out - tokens)
    steps = model.block_swap_stats.steps
    assert len(steps) == 2  # one step per forward, whether the blocks ran or not
    assert steps[0].copies == 2 and steps[1].copies == 0  # skipped blocks: nothing copied
