"""WanModel against diffusers' WanTransformer3DModel and against fp64 references."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import call, make_inputs

import wanstudio as ws
from wanstudio.checkpoints import diffusers_to_official
from wanstudio.model.audio import gather_latent_audio
from wanstudio.model.rope import apply_rope, rope_3d_cos_sin


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# --- parameter counts and names ------------------------------------------------------------------
@pytest.mark.parametrize(
    "preset, billions",
    [("t2v-1.3b", 1.42), ("t2v-14b", 14.29), ("i2v-14b", 16.39), ("infinitetalk-14b", 18.9)],
)
def test_real_presets_build_on_meta_with_spec_parameter_counts(preset, billions):
    model = ws.WanModel(ws.WanConfig.preset(preset), device="meta")
    count = sum(p.numel() for p in model.parameters())
    assert all(p.device.type == "meta" for p in model.parameters())
    assert count / 1e9 == pytest.approx(billions, abs=0.01 if preset != "infinitetalk-14b" else 0.05)


def test_state_dict_keys_are_the_official_names():
    model = ws.WanModel(ws.WanConfig.preset("infinitetalk-14b"), device="meta")
    sd = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    D, F = 5120, 13824
    expected = {
        "patch_embedding.weight": (D, 36, 1, 2, 2),
        "text_embedding.0.weight": (D, 4096),
        "text_embedding.2.weight": (D, D),
        "time_embedding.0.weight": (D, 256),
        "time_projection.1.weight": (6 * D, D),
        "blocks.39.self_attn.q.weight": (D, D),
        "blocks.0.self_attn.norm_q.weight": (D,),
        "blocks.0.norm3.weight": (D,),
        "blocks.0.cross_attn.k_img.weight": (D, D),
        "blocks.0.cross_attn.norm_k_img.weight": (D,),
        "blocks.0.ffn.0.weight": (F, D),
        "blocks.0.ffn.2.weight": (D, F),
        "blocks.0.modulation": (1, 6, D),
        "blocks.0.norm_x.weight": (D,),
        "blocks.0.audio_cross_attn.q_linear.weight": (D, D),
        "blocks.0.audio_cross_attn.kv_linear.weight": (2 * D, 768),
        "blocks.0.audio_cross_attn.proj.weight": (D, D),
        "head.head.weight": (64, D),
        "head.modulation": (1, 2, D),
        "img_emb.proj.0.weight": (1280,),
        "img_emb.proj.1.weight": (1280, 1280),
        "img_emb.proj.3.weight": (D, 1280),
        "img_emb.proj.4.weight": (D,),
        "audio_proj.proj1.weight": (512, 5 * 12 * 768),
        "audio_proj.proj1_vf.weight": (512, 8 * 12 * 768),
        "audio_proj.proj2.weight": (512, 512),
        "audio_proj.proj3.weight": (32 * 768, 512),
        "audio_proj.norm.weight": (768,),
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    # parameter-free norms store nothing; no RoPE tables or other buffers
    assert not any(k.startswith(("blocks.0.norm1.", "blocks.0.norm2.")) for k in sd)
    assert not list(model.buffers())
    per_block = {k.split(".", 2)[2] for k in sd if k.startswith("blocks.0.")}
    # self_attn 8 + 2 norms, norm3 2, cross_attn 8 + 2 norms + k_img/v_img 4 + norm_k_img 1,
    # ffn 4, modulation 1, norm_x 2, audio_cross_attn 6
    assert len(per_block) == 10 + 2 + 15 + 4 + 1 + 2 + 6


@pytest.mark.parametrize(
    "preset", ["tiny-t2v", "tiny-i2v", "tiny-infinitetalk", "t2v-1.3b", "i2v-14b", "infinitetalk-14b"]
)
def test_config_is_inferred_back_from_state_dict_shapes(preset):
    cfg = ws.WanConfig.preset(preset)
    model = ws.WanModel(cfg, device="meta")
    inferred = ws.WanConfig.from_state_dict(model.state_dict())
    assert inferred == cfg


def test_config_validation_names_the_problem():
    with pytest.raises(ws.ConfigError, match="not divisible by num_heads"):
        ws.WanConfig(dim=100, num_heads=3)
    with pytest.raises(ws.ConfigError, match="audio .* need model_type 'i2v'"):
        ws.WanConfig(audio=True)
    with pytest.raises(ws.ConfigError, match="unknown preset 'nope'"):
        ws.WanConfig.preset("nope")


# --- parity with diffusers -------------------------------------------------------------------------
def _diffusers_twin(cfg: ws.WanConfig):
    diffusers = pytest.importorskip("diffusers")
    kwargs = dict(
        patch_size=cfg.patch_size,
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim,
        out_channels=cfg.out_dim,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=cfg.eps,
    )
    if cfg.is_i2v:
        kwargs.update(image_dim=cfg.clip_dim, added_kv_proj_dim=cfg.dim)
    torch.manual_seed(1)
    twin = diffusers.WanTransformer3DModel(**kwargs).eval()
    with torch.no_grad():  # randomise every tensor (norm weights too) so a wrong mapping shows
        for p in twin.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return twin


def _diffusers_fp32_sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    from diffusers.models.embeddings import get_timestep_embedding

    return get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)


@pytest.mark.parametrize("preset", ["tiny-t2v", "tiny-i2v"])
@pytest.mark.parametrize("same_sinusoid", [True, False])
def test_matches_diffusers_wan_transformer_in_fp32(preset, same_sinusoid, monkeypatch):
    """Same weights (diffusers names converted), same inputs, fp32: same output.

    The only numerical difference between the two is the time sinusoid: the official code
    (and wanstudio) computes it in float64, diffusers in float32, which at t = 999 moves the
    output by ~1.4e-5. With diffusers' sinusoid patched in, the outputs must agree to 1e-5
    (they are in fact bitwise equal); with our float64 one, to 5e-5.
    """
    if same_sinusoid:
        monkeypatch.setattr("wanstudio.model.wan.time_sinusoid", _diffusers_fp32_sinusoid)
    # diffusers splits i2v context as "everything but the last 512 tokens is image": use text_len 512
    cfg = ws.WanConfig.preset(preset).replace(text_len=512)
    twin = _diffusers_twin(cfg)
    official = {diffusers_to_official(k): v for k, v in twin.state_dict().items()}
    model = ws.WanModel(cfg).eval()
    assert set(official) == set(model.state_dict())
    model.load_state_dict(official)

    inputs = make_inputs(cfg, batch=2, frames=3, height=6, width=10, text_tokens=9)
    with torch.no_grad():
        ours = call(model, inputs)
        padded = torch.nn.functional.pad(inputs["context"], (0, 0, 0, cfg.text_len - 9))
        hidden = inputs["x"] if not cfg.is_i2v else torch.cat([inputs["x"], inputs["y"]], dim=1)
        theirs = twin(
            hidden_states=hidden,
            timestep=inputs["t"],
            encoder_hidden_states=padded,
            encoder_hidden_states_image=inputs.get("clip_fea"),
            return_dict=False,
        )[0]
    assert ours.shape == theirs.shape == inputs["x"].shape
    assert max_rel_err(ours, theirs) <= (1e-5 if same_sinusoid else 5e-5)


# --- references ------------------------------------------------------------------------------------
def test_rope_matches_complex_float64_reference():
    f, h, w, H, d = 3, 4, 6, 2, 128
    x = torch.randn(2, f * h * w, H, d)
    cos, sin = rope_3d_cos_sin((f, h, w), d, torch.device("cpu"))
    ours = apply_rope(x, cos, sin)
    # reference: per-axis complex rotation in float64, axis pair counts 22 / 21 / 21
    pairs = torch.view_as_complex(x.double().reshape(2, f, h, w, H, d // 2, 2))
    sizes = [d // 2 - 2 * (d // 2 // 3), d // 2 // 3, d // 2 // 3]
    assert sizes == [22, 21, 21]
    angle = torch.zeros(f, h, w, d // 2, dtype=torch.float64)
    start = 0
    for axis, (n, size) in enumerate(zip((f, h, w), sizes)):
        freqs = 1.0 / 10000 ** (torch.arange(0, 2 * size, 2, dtype=torch.float64) / (2 * size))
        pos = torch.arange(n, dtype=torch.float64)
        shape = [1, 1, 1, size]
        shape[axis] = n
        angle[..., start : start + size] = (pos[:, None] * freqs[None]).view(shape)
        start += size
    ref = torch.view_as_real(pairs * torch.polar(torch.ones_like(angle), angle)[:, :, :, None]).reshape_as(x)
    assert max_rel_err(ours, ref) < 1e-6


def test_time_embedding_input_is_the_float64_sinusoid():
    from wanstudio.model.layers import time_sinusoid

    t = torch.tensor([0.0, 999.0])
    emb = time_sinusoid(t, 256)
    w = 10000 ** (-torch.arange(128, dtype=torch.float64) / 128)
    assert emb.dtype == torch.float64
    assert torch.allclose(emb[1, :128], torch.cos(999.0 * w))
    assert torch.allclose(emb[1, 128:], torch.sin(999.0 * w))


def test_batch_of_two_equals_two_single_calls(tiny_model):
    cfg = tiny_model.config
    inputs = make_inputs(cfg, batch=2)
    with torch.no_grad():
        both = call(tiny_model, inputs)
        for i in range(2):
            single = {k: (v[i : i + 1] if k != "ref_target_masks" else v) for k, v in inputs.items()}
            assert max_rel_err(call(tiny_model, single), both[i : i + 1]) < 1e-5


@pytest.mark.parametrize("frames, height, width", [(1, 4, 4), (2, 6, 10), (5, 8, 2)])
def test_odd_frame_counts_and_non_square_frames(frames, height, width):
    cfg = ws.WanConfig.preset("tiny-infinitetalk")
    model = ws.WanModel(cfg).eval()
    inputs = make_inputs(cfg, frames=frames, height=height, width=width)
    with torch.no_grad():
        out = call(model, inputs)
    assert out.shape == (1, 16, frames, height, width)
    assert torch.isfinite(out).all()


def test_odd_latent_size_is_refused_with_advice():
    cfg = ws.WanConfig.preset("tiny-t2v")
    model = ws.WanModel(cfg)
    inputs = make_inputs(cfg, height=5)
    with pytest.raises(ws.ShapeError, match="multiples of the patch size"):
        call(model, inputs)


def test_bf16_model_keeps_fp32_islands_and_stays_close_to_fp32():
    cfg = ws.WanConfig.preset("tiny-i2v")
    torch.manual_seed(0)
    model = ws.WanModel(cfg).eval()
    model_bf16 = ws.WanModel(cfg, dtype=torch.bfloat16).eval()
    model_bf16.load_state_dict(model.state_dict())
    inputs = make_inputs(cfg)
    with torch.no_grad():
        ref, low = call(model, inputs), call(model_bf16, inputs)
    assert low.dtype == torch.float32  # the head is an fp32 island
    rel = ((low - ref).norm() / ref.norm()).item()
    assert rel < 0.05


# --- InfiniteTalk audio path -----------------------------------------------------------------------
def test_audio_gather_matches_a_plain_loop():
    F_lat, W, vae = 4, 5, 4
    audio = torch.randn(2, vae * (F_lat - 1) + 1, W, 3, 2)
    first, groups = gather_latent_audio(audio, vae)
    assert torch.equal(first, audio[:, 0])
    for j in range(F_lat - 1):
        frames = list(range(1 + vae * j, 1 + vae * (j + 1)))
        expect = [audio[:, frames[0], i] for i in range(3)]  # entries 0..2 of the first frame
        expect += [audio[:, fr, 2] for fr in frames[1:-1]]  # centre of the middle frames
        expect += [audio[:, frames[-1], i] for i in range(2, 5)]  # entries 2..4 of the last
        assert torch.equal(groups[:, j], torch.stack(expect, dim=1))


def test_audio_changes_the_output():
    cfg = ws.WanConfig.preset("tiny-infinitetalk")
    torch.manual_seed(0)
    model = ws.WanModel(cfg).eval()
    inputs = make_inputs(cfg)
    silent = dict(inputs, audio=torch.zeros_like(inputs["audio"]))
    with torch.no_grad():
        assert max_rel_err(call(model, inputs), call(model, silent)) > 1e-3


def test_swapping_speaker_masks_changes_two_speaker_output():
    cfg = ws.WanConfig.preset("tiny-infinitetalk")
    torch.manual_seed(0)
    model = ws.WanModel(cfg).eval()
    inputs = make_inputs(cfg, speakers=2)
    masks = inputs["ref_target_masks"]
    swapped = dict(inputs, ref_target_masks=masks[[1, 0, 2]])
    with torch.no_grad():
        a, b = call(model, inputs), call(model, swapped)
    assert max_rel_err(a, b) > 1e-4


def test_audio_of_latent_frame_j_only_touches_frame_j_tokens():
    cfg = ws.WanConfig.preset("tiny-infinitetalk")
    torch.manual_seed(0)
    model = ws.WanModel(cfg).eval()
    inputs = make_inputs(cfg, frames=4, height=4, width=6)
    block = model.blocks[0]
    grid = (4, 2, 3)
    per_frame = 2 * 3
    with torch.no_grad():
        x = torch.randn(1, 4 * per_frame, cfg.dim)

        def audio_out(audio):
            tokens = model.audio_proj(audio.flatten(0, 1)).unflatten(0, (1, 1))
            tokens = tokens.permute(0, 2, 1, 3, 4).flatten(2, 3)
            return block.audio_cross_attn(x, tokens, grid)

        base = audio_out(inputs["audio"])
        j = 2  # latent frame 2 <- video frames 5..8
        moved = inputs["audio"].clone()
        moved[:, :, 5:9] += torch.randn_like(moved[:, :, 5:9])
        diff = (audio_out(moved) - base).abs().amax(dim=-1)[0].view(4, per_frame)
    assert (diff[j] > 1e-6).all()
    assert torch.equal(diff[[0, 1, 3]], torch.zeros_like(diff[[0, 1, 3]]))


def test_two_speaker_token_positions_follow_the_reference_map():
    cfg = ws.WanConfig.preset("tiny-infinitetalk")
    attn = ws.WanModel(cfg, device="meta").blocks[0].audio_cross_attn
    ref_map = torch.tensor([[[0.9, 0.5, 0.1, 0.2], [0.0, 0.4, 0.8, 0.1], [0.05, 0.1, 0.1, 0.7]]])
    pos = attn.token_positions(ref_map)[0]
    # token 0 -> speaker 1 at its max (4); token 1 -> speaker 1 scaled; token 2 -> speaker 2 max
    # (24); token 3 -> background (12)
    s1 = (ref_map[0, 0] - 0.1) / 0.8 * 4
    assert pos.tolist() == pytest.approx([s1[0].item(), s1[1].item(), 24.0, 12.0], abs=1e-5)
    keys = attn.audio_key_positions(8, 2, "cpu")
    assert keys.tolist() == [2.0] * 4 + [22.0] * 4
    assert math.isclose(attn.background_pos, 12.0)


def test_forward_works_with_autograd_after_an_inference_mode_forward():
    cfg = ws.WanConfig.preset("tiny-t2v")
    model = ws.WanModel(cfg)
    inputs = make_inputs(cfg)
    with torch.inference_mode():
        call(model, inputs)  # caches the RoPE tables
    out = call(model, inputs)
    out.square().mean().backward()
    assert model.blocks[0].self_attn.q.weight.grad is not None
