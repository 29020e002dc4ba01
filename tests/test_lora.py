"""LoRA: every format maps to the official layers, merges match W + s (alpha / r) B A, removal is
bitwise, and every bad file gets an error naming what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import wanstudio as ws
from wanstudio import checkpoints
from wanstudio.lora import LoRA, LoraSet, applied_loras, apply_lora, remove_lora
from wanstudio.model import keys

# official layer -> its diffusers name (None: no diffusers name; the audio modules)
LAYERS = {
    "blocks.0.self_attn.q": "blocks.0.attn1.to_q",
    "blocks.1.self_attn.o": "blocks.1.attn1.to_out.0",
    "blocks.0.cross_attn.k_img": "blocks.0.attn2.add_k_proj",
    "blocks.1.cross_attn.v": "blocks.1.attn2.to_v",
    "blocks.0.ffn.0": "blocks.0.ffn.net.0.proj",
    "blocks.1.ffn.2": "blocks.1.ffn.net.2",
    "head.head": "proj_out",
    "time_projection.1": "condition_embedder.time_proj",
}
AUDIO_LAYERS = ("blocks.0.audio_cross_attn.kv_linear", "blocks.1.audio_cross_attn.q_linear")
FORMATS = ("kijai", "kijai_ab", "comfy", "diffusers", "peft", "kohya")


def tiny(dtype=torch.float32, seed: int = 0) -> ws.WanModel:
    torch.manual_seed(seed)
    return ws.WanModel(ws.WanConfig.preset("tiny-infinitetalk"), dtype=dtype).eval()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def factors(model, layers, rank: int, alpha: float | None, seed: int = 1):
    """layer -> (A [rank, in], B [out, rank], alpha)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in layers:
        n, k = model.get_submodule(layer).weight.shape
        a = torch.randn(rank, k, generator=g) * 0.1
        b = torch.randn(n, rank, generator=g) * 0.1
        out[layer] = (a, b, alpha)
    return out


def lora_keys(layer: str, fmt: str) -> tuple[str, str, str]:
    """(down key, up key, alpha key) of ``layer`` in format ``fmt``."""
    if fmt == "kijai":
        base, down, up = f"diffusion_model.{layer}", "lora_down.weight", "lora_up.weight"
    elif fmt == "kijai_ab":  # no prefix, A/B names
        base, down, up = layer, "lora_A.weight", "lora_B.weight"
    elif fmt == "comfy":
        base, down, up = f"model.diffusion_model.{layer}", "lora_down.weight", "lora_up.weight"
    elif fmt == "diffusers":
        base, down, up = f"transformer.{LAYERS[layer]}", "lora_A.weight", "lora_B.weight"
    elif fmt == "peft":
        base, down, up = f"base_model.model.{LAYERS[layer]}", "lora_A.default.weight", "lora_B.default.weight"
    elif fmt == "kohya":
        base, down, up = "lora_unet_" + layer.replace(".", "_"), "lora_down.weight", "lora_up.weight"
    else:
        raise ValueError(fmt)
    return f"{base}.{down}", f"{base}.{up}", f"{base}.alpha"


def write_lora(path: Path, fac, fmt: str, extra: dict | None = None) -> Path:
    sd = {}
    for layer, (a, b, alpha) in fac.items():
        kd, ku, ka = lora_keys(layer, fmt)
        sd[kd], sd[ku] = a.contiguous(), b.contiguous()
        if alpha is not None:
            sd[ka] = torch.tensor(float(alpha))
    sd.update(extra or {})
    save_file(sd, str(path))
    return path


def expected(w0: dict, fac, strength: float, use_alpha: bool = True) -> dict[str, torch.Tensor]:
    """W + strength (alpha / rank) B A in fp32, per touched weight."""
    out = {}
    for layer, (a, b, alpha) in fac.items():
        scale = strength * (alpha / a.shape[0] if alpha is not None and use_alpha else 1.0)
        out[layer + ".weight"] = w0[layer + ".weight"].float() + scale * (b.double() @ a.double()).float()
    return out


def check_merged(model, w0, want, rtol=1e-5, atol=1e-6):
    sd = model.state_dict()
    for name, tensor in sd.items():
        if name in want:
            assert torch.allclose(tensor.float(), want[name], rtol=rtol, atol=atol), name
            assert not torch.equal(tensor, w0[name]), name
        else:
            assert torch.equal(tensor, w0[name]), f"{name} changed but the LoRA does not target it"


# --- formats ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_merges_w_plus_scaled_b_a(tmp_path, fmt):
    model = tiny()
    w0 = snapshot(model)
    has_alpha = fmt not in ("diffusers", "peft")  # PEFT files store no alpha: the scale is strength
    layers = list(LAYERS) + ([] if fmt in ("diffusers", "peft") else list(AUDIO_LAYERS))
    fac = factors(model, layers, rank=4, alpha=3.0 if has_alpha else None)
    path = write_lora(tmp_path / f"{fmt}.safetensors", fac, fmt)
    apply_lora(model, LoRA(path, strength=0.8))
    check_merged(model, w0, expected(w0, fac, 0.8))
    assert applied_loras(model) == (LoRA(path, 0.8),)


def test_the_formats_built_from_the_same_factors_give_identical_models(tmp_path):
    ref = None
    for fmt in FORMATS:
        model = tiny()
        fac = factors(model, LAYERS, rank=4, alpha=None if fmt in ("diffusers", "peft") else 4.0)
        apply_lora(model, write_lora(tmp_path / f"{fmt}.safetensors", fac, fmt))
        sd = model.state_dict()
        if ref is None:
            ref = sd
        else:
            assert all(torch.equal(ref[k], sd[k]) for k in ref), fmt


def test_kohya_names_with_underscores_resolve_to_the_real_modules(tmp_path):
    """norm_x, k_img, audio_cross_attn, q_linear: underscores inside the names themselves."""
    model = tiny()
    w0 = snapshot(model)
    fac = factors(model, ["blocks.1.cross_attn.k_img", "blocks.0.audio_cross_attn.q_linear"], 2, 2.0)
    diff = torch.randn(256) * 0.01
    path = write_lora(tmp_path / "k.safetensors", fac, "kohya", {"lora_unet_blocks_1_norm_x.diff": diff})
    apply_lora(model, path)
    want = expected(w0, fac, 1.0)
    want["blocks.1.norm_x.weight"] = w0["blocks.1.norm_x.weight"] + diff
    check_merged(model, w0, want)


def test_diff_and_diff_b_are_added_exactly(tmp_path):
    model = tiny()
    w0 = snapshot(model)
    g = torch.Generator().manual_seed(3)
    diffs = {
        "blocks.0.norm_x.weight": "diffusion_model.blocks.0.norm_x.diff",
        "blocks.0.self_attn.q.bias": "diffusion_model.blocks.0.self_attn.q.diff_b",
        "blocks.1.modulation": "diffusion_model.blocks.1.modulation.diff",
        "blocks.0.modulation": "diffusion_model.blocks.0.diff_m",  # lightx2v's modulation key
        "head.head.weight": "diffusion_model.head.head.diff",
        "head.head.bias": "diffusion_model.head.head.diff_b",
        "patch_embedding.weight": "diffusion_model.patch_embedding.diff",
    }
    sd = {key: torch.randn(w0[name].shape, generator=g) * 0.01 for name, key in diffs.items()}
    path = tmp_path / "diff.safetensors"
    save_file(sd, str(path))
    apply_lora(model, path)
    for name, tensor in model.state_dict().items():
        want = w0[name] + sd[diffs[name]] if name in diffs else w0[name]
        assert torch.equal(tensor, want), name


def test_conv_lora_on_the_patch_embedding(tmp_path):
    model = tiny()
    w0 = snapshot(model)
    w = w0["patch_embedding.weight"]  # (256, 36, 1, 2, 2)
    a = torch.randn(3, *w.shape[1:]) * 0.1  # (rank, in, kt, kh, kw)
    b = torch.randn(w.shape[0], 3, 1, 1, 1) * 0.1
    save_file(
        {"lora_unet_patch_embedding.lora_down.weight": a, "lora_unet_patch_embedding.lora_up.weight": b},
        str(tmp_path / "conv.safetensors"),
    )
    apply_lora(model, tmp_path / "conv.safetensors", strength=0.5)
    want = w + 0.5 * (b.flatten(1) @ a.flatten(1)).reshape(w.shape)
    check_merged(model, w0, {"patch_embedding.weight": want})


# --- strengths and alpha ----------------------------------------------------------------------------
def test_several_loras_with_strengths_add_up(tmp_path):
    model = tiny()
    w0 = snapshot(model)
    fac1 = factors(model, ["blocks.0.self_attn.q", "blocks.1.ffn.0"], rank=4, alpha=2.0, seed=1)
    fac2 = factors(model, ["blocks.0.self_attn.q", "head.head"], rank=8, alpha=16.0, seed=2)
    p1 = write_lora(tmp_path / "a.safetensors", fac1, "kijai")
    p2 = write_lora(tmp_path / "b.safetensors", fac2, "kohya")
    shapes = {k: tuple(v.shape) for k, v in ws.WanModel(model.config, device="meta").state_dict().items()}
    lset = LoraSet([LoRA(p1, 0.7), (p2, -0.3)], shapes)
    assert lset.targets == {"blocks.0.self_attn.q.weight", "blocks.1.ffn.0.weight", "head.head.weight"}
    want = {}
    for fac, s in ((fac1, 0.7), (fac2, -0.3)):
        for name, w in expected(w0, fac, s).items():
            want[name] = want.get(name, w0[name]) + (w - w0[name])
    for name, w in want.items():
        assert torch.allclose(lset.merge(name, w0[name]), w, rtol=1e-5, atol=1e-6), name
    # one after the other on a loaded model: the same up to one rounding per step
    apply_lora(model, LoRA(p1, 0.7))
    apply_lora(model, LoRA(p2, -0.3))
    check_merged(model, w0, want)


def test_use_alpha_false_ignores_alpha(tmp_path):
    model = tiny()
    w0 = snapshot(model)
    fac = factors(model, ["blocks.0.self_attn.q"], rank=4, alpha=1.0)
    path = write_lora(tmp_path / "a.safetensors", fac, "kijai")
    apply_lora(model, LoRA(path, 1.5, use_alpha=False))
    check_merged(model, w0, expected(w0, fac, 1.5, use_alpha=False))
    assert not torch.allclose(  # and the alpha would have mattered (1/4 of it)
        model.state_dict()["blocks.0.self_attn.q.weight"],
        expected(w0, fac, 1.5)["blocks.0.self_attn.q.weight"],
    )


# --- the streaming API --------------------------------------------------------------------------------
def test_streaming_merge_matches_apply_and_never_touches_inputs(tmp_path):
    model = tiny(torch.bfloat16)
    w0 = snapshot(model)
    fac = factors(model, LAYERS, rank=4, alpha=2.0)
    diff_b = torch.randn(256) * 0.01
    path = write_lora(
        tmp_path / "a.safetensors", fac, "kijai", {"diffusion_model.blocks.1.ffn.2.diff_b": diff_b}
    )
    meta = ws.WanModel(model.config, device="meta", dtype=torch.bfloat16)
    lset = LoraSet([path], {k: v.shape for k, v in meta.state_dict().items()})
    apply_lora(model, path)
    merged = model.state_dict()
    for layer in LAYERS:
        w, b = w0[layer + ".weight"], w0[layer + ".bias"]
        w_copy, b_copy = w.clone(), b.clone()
        new_w, new_b = lset.merge_into(layer, w, b)
        assert new_w.dtype == torch.bfloat16 and torch.equal(new_w, merged[layer + ".weight"])
        assert torch.equal(new_b, merged[layer + ".bias"])
        assert torch.equal(w, w_copy) and torch.equal(b, b_copy)
        dw, db = lset.delta_for(layer, w.shape, torch.float32)
        assert dw.dtype == torch.float32 and torch.equal((w.float() + dw).to(torch.bfloat16), new_w)
        assert (db is None) == (layer != "blocks.1.ffn.2")
    assert (
        lset.merge("blocks.0.self_attn.k.weight", w0["blocks.0.self_attn.k.weight"])
        is (w0["blocks.0.self_attn.k.weight"])
    )
    # a layer stored quantized: dequantize -> merge in fp32 -> the caller quantizes
    real = w0["blocks.0.self_attn.q.weight"].float()
    out = lset.merge_dequantized("blocks.0.self_attn.q.weight", real)
    assert out.dtype == torch.float32
    assert torch.allclose(out, expected(w0, fac, 1.0)["blocks.0.self_attn.q.weight"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ws.LoraError, match="dequantize"):
        lset.merge("blocks.0.self_attn.q.weight", real.to(torch.float8_e4m3fn))


# --- removal ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_remove_restores_bitwise(tmp_path, dtype):
    model = tiny(dtype)
    w0 = snapshot(model)
    fac = factors(model, LAYERS, rank=4, alpha=3.0)
    p1 = write_lora(
        tmp_path / "a.safetensors", fac, "kijai", {"diffusion_model.blocks.0.diff_m": torch.randn(1, 6, 256)}
    )
    p2 = write_lora(tmp_path / "b.safetensors", factors(model, LAYERS, 2, 1.0, seed=5), "kohya")
    apply_lora(model, p1)
    apply_lora(model, p2, strength=0.5)
    after_both = snapshot(model)
    remove_lora(model, p1)  # not the last one: p2 is taken off and merged again
    only_p2 = snapshot(apply_lora(tiny(dtype), p2, strength=0.5))
    assert all(torch.equal(model.state_dict()[k], only_p2[k]) for k in w0)
    assert not all(torch.equal(after_both[k], only_p2[k]) for k in w0)
    remove_lora(model, LoRA(p2, 0.5))
    assert all(torch.equal(model.state_dict()[k], w0[k]) for k in w0)
    assert applied_loras(model) == ()
    with pytest.raises(ws.LoraError, match="not applied"):
        remove_lora(model, p1)


def test_remove_needs_the_originals(tmp_path):
    model = tiny()
    path = write_lora(tmp_path / "a.safetensors", factors(model, LAYERS, 2, 2.0), "kijai")
    apply_lora(model, path, keep_originals=False)
    with pytest.raises(ws.LoraError, match="keep_originals=False"):
        remove_lora(model, path)


def test_quantized_layers_are_refused_with_advice(tmp_path):
    model = tiny()
    path = write_lora(tmp_path / "a.safetensors", factors(model, LAYERS, 2, 2.0), "kijai")
    ws.quantize(model, "fp8_e4m3fn")
    before = snapshot(model)
    with pytest.raises(ws.LoraError, match=r"quantized layers \(fp8_e4m3fn\).*while loading"):
        apply_lora(model, path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --- errors -----------------------------------------------------------------------------------------
def test_keys_matching_no_layer_are_listed_with_the_format(tmp_path):
    model = tiny()
    fac = factors(model, ["blocks.0.self_attn.q"], 2, 2.0)
    extra = {
        "diffusion_model.vace_blocks.0.proj.lora_down.weight": torch.zeros(2, 4),
        "diffusion_model.vace_blocks.0.proj.lora_up.weight": torch.zeros(4, 2),
        "diffusion_model.blocks.9.self_attn.q.lora_down.weight": torch.zeros(2, 256),
        "diffusion_model.blocks.9.self_attn.q.lora_up.weight": torch.zeros(256, 2),
    }
    path = write_lora(tmp_path / "a.safetensors", fac, "kijai", extra)
    with pytest.raises(ws.LoraError, match="kijai / lightx2v") as e:
        apply_lora(model, path)
    assert "4 of 7 tensors match no layer" in str(e.value)
    assert "blocks.9.self_attn.q.lora_down.weight" in str(e.value) and "vace_blocks" in str(e.value)
    kohya = tmp_path / "k.safetensors"
    save_file({"lora_unet_blocks_0_attn_q.lora_down.weight": torch.zeros(2, 256)}, str(kohya))
    with pytest.raises(ws.LoraError, match="kohya / musubi.*lora_unet_blocks_0_attn_q"):
        apply_lora(tiny(), kohya)


def test_a_lora_for_another_model_size_names_the_layer_and_both_shapes(tmp_path):
    path = tmp_path / "13b.safetensors"
    save_file(
        {
            "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 1536),
            "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(1536, 4),
        },
        str(path),
    )
    with pytest.raises(ws.LoraError) as e:
        apply_lora(tiny(), path)
    msg = str(e.value)
    assert "blocks.0.self_attn.q" in msg and "[1536, 1536]" in msg and "[256, 256]" in msg
    assert "Wan2.1 1.3B" in msg


def test_rank_mismatch_between_down_and_up(tmp_path):
    path = tmp_path / "r.safetensors"
    save_file(
        {
            "blocks.0.ffn.0.lora_A.weight": torch.zeros(4, 256),
            "blocks.0.ffn.0.lora_B.weight": torch.zeros(512, 8),
        },
        str(path),
    )
    with pytest.raises(ws.LoraError, match=r"blocks.0.ffn.0.*\[4, 256\].*\[512, 8\].*rank"):
        apply_lora(tiny(), path)


def test_half_a_pair_and_a_diff_of_the_wrong_shape(tmp_path):
    path = tmp_path / "h.safetensors"
    save_file({"diffusion_model.head.head.lora_down.weight": torch.zeros(2, 256)}, str(path))
    with pytest.raises(ws.LoraError, match="no lora_up"):
        apply_lora(tiny(), path)
    save_file({"diffusion_model.blocks.0.norm3.diff": torch.zeros(128)}, str(path))
    with pytest.raises(ws.LoraError, match=r"norm3.diff.*\[128\].*\[256\]"):
        apply_lora(tiny(), path)


def test_a_plain_checkpoint_is_not_a_lora(tmp_path):
    path = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in list(tiny().state_dict().items())[:6]}, str(path))
    with pytest.raises(ws.LoraError, match="model checkpoint, not a LoRA"):
        apply_lora(tiny(), path)


def test_unsupported_tensor_kinds_and_bad_arguments(tmp_path):
    path = write_lora(
        tmp_path / "d.safetensors",
        factors(tiny(), ["blocks.0.self_attn.q"], 2, 2.0),
        "kijai",
        {"diffusion_model.blocks.0.self_attn.q.dora_scale": torch.ones(1, 256)},
    )
    with pytest.raises(ws.LoraError, match="DoRA.*dora_scale"):
        apply_lora(tiny(), path)
    with pytest.raises(ws.LoraError, match="no such file"):
        LoRA(tmp_path / "missing.safetensors")
    with pytest.raises(ws.LoraError, match="finite"):
        LoRA(path, float("nan"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ws.LoraError, match="junk.safetensors"):
        LoraSet([tmp_path / "junk.safetensors"], {})


def test_one_key_table_for_checkpoints_and_loras():
    assert checkpoints.diffusers_to_official is keys.diffusers_to_official
    assert (
        keys.diffusers_to_official("blocks.3.attn2.add_k_proj.weight") == "blocks.3.cross_attn.k_img.weight"
    )
    assert keys.diffusers_to_official("blocks.3.scale_shift_table") == "blocks.3.modulation"
