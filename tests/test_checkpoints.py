"""Checkpoint loading: every file layout round-trips; every broken input gets a helpful error."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import call, make_inputs
from safetensors.torch import save_file

import wanstudio as ws
from wanstudio.checkpoints import diffusers_to_official, load_model


def _tiny(preset: str, seed: int = 0) -> ws.WanModel:
    torch.manual_seed(seed)
    model = ws.WanModel(ws.WanConfig.preset(preset)).eval()
    with torch.no_grad():  # non-trivial norm weights, so a mis-mapped norm shows in the output
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _state(model: ws.WanModel, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v.contiguous() for k, v in model.state_dict().items()}


def _same_output(a: ws.WanModel, b: ws.WanModel) -> None:
    """Same weights -> same output. Not bitwise: CPU GEMM kernels may pick another code path
    for buffers of another alignment, which moves the last bit."""
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
    inputs = make_inputs(a.config)
    with torch.no_grad():
        out_a, out_b = call(a, inputs), call(b, inputs)
    assert ((out_a - out_b).abs().max() / out_a.abs().max()).item() < 1e-6


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "diffusion_model."])
def test_single_file_round_trips_with_any_comfy_prefix(tmp_path, prefix):
    model = _tiny("tiny-i2v")
    save_file(_state(model, prefix), tmp_path / "dit.safetensors")
    loaded = load_model(tmp_path / "dit.safetensors", dtype=torch.float32)
    assert loaded.config == model.config  # inferred from the tensor shapes
    assert loaded.checkpoint_info.formats == ["comfy-prefixed" if prefix else "official"]
    _same_output(model, loaded)


def test_sharded_checkpoint_via_index_or_folder(tmp_path):
    model = _tiny("tiny-t2v")
    sd = _state(model)
    keys = sorted(sd)
    shards = [keys[i::3] for i in range(3)]
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"diffusion_pytorch_model-0000{i + 1}-of-00003.safetensors"
        save_file({k: sd[k] for k in names}, tmp_path / fname)
        weight_map.update(dict.fromkeys(names, fname))
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = ws.WanConfig.preset("tiny-t2v")
    _same_output(model, load_model(index, config=cfg, dtype=torch.float32))
    _same_output(model, load_model(tmp_path, config=cfg, dtype=torch.float32))


def test_infinitetalk_weights_merge_on_top_of_wan_shards(tmp_path):
    model = _tiny("tiny-infinitetalk")
    sd = _state(model)
    audio = {k: v for k, v in sd.items() if "audio" in k or ".norm_x." in k}
    base = {k: v for k, v in sd.items() if k not in audio}
    base_stale = dict(base, **{"head.head.bias": torch.zeros_like(base["head.head.bias"])})
    save_file(base_stale, tmp_path / "wan_i2v.safetensors")
    # the InfiniteTalk file also carries the correct head bias: later files win
    save_file(
        dict(audio, **{"head.head.bias": base["head.head.bias"]}), tmp_path / "infinitetalk.safetensors"
    )
    loaded = load_model(
        [tmp_path / "wan_i2v.safetensors", tmp_path / "infinitetalk.safetensors"], dtype=torch.float32
    )
    assert loaded.config.audio
    _same_output(model, loaded)


def test_diffusers_named_file_loads_into_official_names(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    cfg = ws.WanConfig.preset("tiny-i2v")
    torch.manual_seed(3)
    twin = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=128,
        in_channels=36,
        out_channels=16,
        text_dim=cfg.text_dim,
        freq_dim=256,
        ffn_dim=cfg.ffn_dim,
        num_layers=2,
        image_dim=cfg.clip_dim,
        added_kv_proj_dim=cfg.dim,
    )
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sd = {k: v.contiguous() for k, v in twin.state_dict().items()}
    save_file(sd, tmp_path / "diffusion_pytorch_model.safetensors")
    loaded = load_model(tmp_path / "diffusion_pytorch_model.safetensors", config=cfg, dtype=torch.float32)
    assert loaded.checkpoint_info.formats == ["diffusers"]
    reference = ws.WanModel(cfg).eval()
    reference.load_state_dict({diffusers_to_official(k): v for k, v in sd.items()})
    # norm2 (diffusers, affine) must land in the official norm3
    assert torch.equal(loaded.blocks[1].norm3.weight, sd["blocks.1.norm2.weight"])
    _same_output(reference, loaded)


def test_loading_converts_dtype_tensor_by_tensor(tmp_path):
    model = _tiny("tiny-t2v")
    save_file(_state(model), tmp_path / "dit.safetensors")
    loaded = load_model(tmp_path / "dit.safetensors", dtype="bf16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    assert loaded.checkpoint_info.dtypes == {"float32": len(_state(model))}


# --- errors ----------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(ws.CheckpointError, match="no such file or folder"):
        load_model(tmp_path / "nope.safetensors")


def test_truncated_file_names_the_file_and_the_problem(tmp_path):
    model = _tiny("tiny-t2v")
    path = tmp_path / "dit.safetensors"
    save_file(_state(model), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ws.CheckpointError, match=r"dit\.safetensors: tensor .* the file is truncated"):
        load_model(path)
    path.write_bytes(data[:4])
    with pytest.raises(ws.CheckpointError, match="too short to be a safetensors file"):
        load_model(path)


def test_corrupt_header(tmp_path):
    path = tmp_path / "dit.safetensors"
    path.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}" + b"\0" * 64)
    with pytest.raises(ws.CheckpointError, match="corrupt safetensors header"):
        load_model(path)
    path.write_bytes(b"PK\x03\x04" + b"\0" * 400)  # a zip (.pth) renamed
    with pytest.raises(ws.CheckpointError, match="does not fit in a 404-byte file"):
        load_model(path)


def test_pickled_checkpoints_are_refused(tmp_path):
    path = tmp_path / "dit.pth"
    path.write_bytes(b"whatever")
    with pytest.raises(ws.CheckpointError, match=r"pickled \.pth checkpoints are not loaded"):
        load_model(path)


def test_missing_keys_give_counts_examples_and_a_shard_diagnosis(tmp_path):
    sd = _state(_tiny("tiny-t2v"))
    dropped = {k: v for k, v in sd.items() if not k.startswith("blocks.1.")}
    save_file(dropped, tmp_path / "dit.safetensors")
    with pytest.raises(ws.CheckpointError) as err:
        load_model(tmp_path / "dit.safetensors", config="tiny-t2v")
    msg = str(err.value)
    n_missing = len(sd) - len(dropped)
    assert f"{n_missing} missing keys, e.g. blocks.1." in msg
    assert "is a shard of a sharded checkpoint left out?" in msg


def test_missing_audio_weights_say_pass_the_infinitetalk_file(tmp_path):
    sd = _state(_tiny("tiny-infinitetalk"))
    base = {k: v for k, v in sd.items() if "audio" not in k and ".norm_x." not in k}
    save_file(base, tmp_path / "wan_i2v.safetensors")
    with pytest.raises(ws.CheckpointError, match="pass the InfiniteTalk weights"):
        load_model(tmp_path / "wan_i2v.safetensors", config="tiny-infinitetalk")


def test_a_vae_file_is_recognised(tmp_path):
    vae_like = {
        "encoder.conv1.weight": torch.zeros(4, 3, 3, 3, 3),
        "encoder.downsamples.0.residual.0.gamma": torch.zeros(4, 1, 1, 1),
        "decoder.upsamples.0.residual.0.gamma": torch.zeros(4, 1, 1, 1),
    }
    save_file(vae_like, tmp_path / "Wan2.1_VAE.safetensors")
    with pytest.raises(ws.CheckpointError, match="belong to a VAE, not the DiT"):
        load_model(tmp_path / "Wan2.1_VAE.safetensors")
    with pytest.raises(ws.CheckpointError, match="belong to a VAE"):
        load_model(tmp_path / "Wan2.1_VAE.safetensors", config="tiny-t2v")


def test_shape_mismatch_lists_key_expected_and_found(tmp_path):
    save_file(_state(_tiny("tiny-t2v")), tmp_path / "dit.safetensors")
    wider = ws.WanConfig.preset("tiny-t2v").replace(ffn_dim=768)
    with pytest.raises(
        ws.CheckpointError, match=r"blocks\.0\.ffn\.0\.weight: expected \(768, 256\), found \(512, 256\)"
    ):
        load_model(tmp_path / "dit.safetensors", config=wider)


def test_missing_shard_of_an_index(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(ws.CheckpointError, match="1 of 1 shards are missing"):
        load_model(index)


# --- memory ------------------------------------------------------------------------------------------
_RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys, gc
    import torch
    import wanstudio as ws
    from wanstudio.checkpoints import load_model

    def status_kib(field):  # VmHWM resets at exec, unlike ru_maxrss which the child inherits
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    cfg = ws.WanConfig(**json.loads(sys.argv[2]))
    ws.WanModel(cfg, device="meta")  # warm imports and allocator before the baseline
    gc.collect()
    before = status_kib("VmHWM")
    model = load_model(sys.argv[1], config=cfg, dtype=torch.bfloat16)
    peak = status_kib("VmHWM")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"peak_delta": peak - before, "model_bytes": size}))
    """
)


@pytest.mark.slow
def test_peak_host_memory_stays_near_one_copy_of_the_model(tmp_path):
    cfg = dict(dim=1024, ffn_dim=4096, num_heads=8, num_layers=12, text_dim=512)
    torch.manual_seed(0)
    model = ws.WanModel(ws.WanConfig(**cfg), dtype=torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    assert 190e6 < n_params < 230e6
    save_file(_state(model), tmp_path / "big.safetensors")
    del model
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / "big.safetensors"), json.dumps(cfg)],
        capture_output=True,
        text=True,
        check=True,
    )
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = figures["peak_delta"] / figures["model_bytes"]
    print(
        f"peak RSS growth {figures['peak_delta'] / 2**20:.0f} MiB for a "
        f"{figures['model_bytes'] / 2**20:.0f} MiB model: {ratio:.2f}x"
    )
    assert ratio < 1.3


def test_attention_mode_is_set_at_load_and_bad_names_are_refused(tmp_path):
    save_file(_state(_tiny("tiny-t2v")), tmp_path / "dit.safetensors")
    model = load_model(tmp_path / "dit.safetensors", dtype=torch.float32, attention="sdpa")
    assert {m.attention_mode for m in model.modules() if hasattr(m, "attention_mode")} == {
        ws.AttentionMode.SDPA
    }
    with pytest.raises(ws.UnknownOptionError, match="Did you mean 'sageattn'"):
        load_model(tmp_path / "dit.safetensors", attention="sageatn")


def test_block_swap_at_load_needs_a_gpu(tmp_path):
    save_file(_state(_tiny("tiny-t2v")), tmp_path / "dit.safetensors")
    with pytest.raises(ws.BlockSwapError, match="meaningless"):
        load_model(tmp_path / "dit.safetensors", blocks_to_swap=1, device="cpu")


# --- quantized checkpoints -----------------------------------------------------------------------
# Whole-model SQNR bars: the single-layer bars of issue 3 (tests/test_quant.py), which the tiny
# two-block model must also meet end to end.
_MODEL_SQNR_BARS = {
    "fp8_e4m3fn": 28,
    "fp8_e4m3fn_scaled": 30,
    "fp8_e4m3fn_scaled_fast": 27,
    "fp8_e5m2_scaled": 24,
    "fp4_scaled": 19,
    "fp4_experimental": 17,
}


def _scaled_fp8_file(model: ws.WanModel, path: Path) -> None:
    """A ComfyUI-style scaled-fp8 file: prefixed keys, e4m3 weights with a per-tensor
    ``scale_weight``, a ``scaled_fp8`` marker, everything else in bf16."""
    from wanstudio.quant import quantizable_linears

    names = {n for n, _ in quantizable_linears(model)}
    out = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for key, value in _state(model).items():
        base = key.rpartition(".")[0]
        if base in names and key.endswith(".weight"):
            scale = value.abs().max().float() / 448
            out["model.diffusion_model." + key] = (value / scale).to(torch.float8_e4m3fn)
            out["model.diffusion_model." + base + ".scale_weight"] = scale.reshape(1)
        else:
            out["model.diffusion_model." + key] = value.bfloat16()
    save_file(out, path)


def _seeded(preset: str) -> ws.WanModel:
    """Default (kaiming-uniform) init: weight statistics like a trained layer's, unlike _tiny's
    perturbed norms, which exist to expose mapping mistakes, not to measure quantization."""
    torch.manual_seed(0)
    return ws.WanModel(ws.WanConfig.preset(preset)).eval()


def _sqnr_vs(model: ws.WanModel, reference: ws.WanModel) -> float:
    from wanstudio.quant import sqnr_db

    inputs = make_inputs(reference.config)
    with torch.no_grad():
        return sqnr_db(call(model, inputs), call(reference, inputs))


@pytest.mark.parametrize("mode", sorted(_MODEL_SQNR_BARS))
def test_bf16_file_quantized_on_load_meets_its_mode_bar(tmp_path, mode):
    from wanstudio.quant import QuantizedLinear

    reference = _seeded("tiny-infinitetalk")
    save_file({k: v.bfloat16() for k, v in _state(reference).items()}, tmp_path / "dit.safetensors")
    model = load_model(tmp_path / "dit.safetensors", dtype=torch.float32, quantization=mode)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 2 * (
        4 + 6 + 2 + 3
    )  # per block: self q/k/v/o, cross q/k/v/o + k_img/v_img, ffn, audio
    assert {layer.mode.value for layer in layers} == {mode}
    assert model.quantization.value == mode
    assert _sqnr_vs(model, reference) >= _MODEL_SQNR_BARS[mode]


def test_scaled_fp8_file_runs_in_its_storage_mode_when_quantization_is_disabled(tmp_path):
    reference = _seeded("tiny-infinitetalk")
    _scaled_fp8_file(reference, tmp_path / "dit_fp8_scaled.safetensors")
    model = load_model(tmp_path / "dit_fp8_scaled.safetensors", dtype=torch.float32)
    assert model.quantization is ws.QuantMode.FP8_E4M3FN_SCALED
    assert model.checkpoint_info.scaled_fp8_marker and model.checkpoint_info.has_fp8
    assert _sqnr_vs(model, reference) >= _MODEL_SQNR_BARS["fp8_e4m3fn_scaled"]
    fast = load_model(
        tmp_path / "dit_fp8_scaled.safetensors", dtype=torch.float32, quantization="fp8_e4m3fn_scaled_fast"
    )
    assert _sqnr_vs(fast, reference) >= _MODEL_SQNR_BARS["fp8_e4m3fn_scaled_fast"]


def test_plain_fp8_file_runs_as_stored(tmp_path):
    reference = _seeded("tiny-t2v")
    from wanstudio.quant import quantizable_linears

    names = {n for n, _ in quantizable_linears(reference)}
    sd = {
        k: (v.to(torch.float8_e4m3fn) if k.rpartition(".")[0] in names and k.endswith(".weight") else v)
        for k, v in _state(reference).items()
    }
    save_file(sd, tmp_path / "dit_fp8.safetensors")
    model = load_model(tmp_path / "dit_fp8.safetensors", dtype=torch.float32)
    assert model.quantization is ws.QuantMode.FP8_E4M3FN
    assert _sqnr_vs(model, reference) >= _MODEL_SQNR_BARS["fp8_e4m3fn"]


def test_a_mode_that_contradicts_the_file_converts_from_the_dequantized_weight(tmp_path):
    from safetensors.torch import load_file

    from wanstudio.quant import quantize_weight

    _scaled_fp8_file(_seeded("tiny-t2v"), tmp_path / "dit_fp8_scaled.safetensors")
    model = load_model(tmp_path / "dit_fp8_scaled.safetensors", quantization="fp8_e5m2_scaled")
    assert model.quantization is ws.QuantMode.FP8_E5M2_SCALED
    stored = load_file(tmp_path / "dit_fp8_scaled.safetensors")
    prefix = "model.diffusion_model.blocks.0.self_attn.q."
    real = stored[prefix + "weight"].float() * stored[prefix + "scale_weight"]
    expected = quantize_weight(real, "fp8_e5m2_scaled")
    layer = model.blocks[0].self_attn.q
    assert torch.equal(layer.weight.float(), expected["weight"].float())
    assert torch.equal(layer.scale_weight, expected["scale_weight"])


def test_strict_layout_at_load_covers_every_forward(tmp_path):
    save_file(_state(_seeded("tiny-t2v")), tmp_path / "dit.safetensors")
    model = load_model(
        tmp_path / "dit.safetensors", dtype=torch.float32, strict_layout=True, quantization="fp8_e4m3fn_fast"
    )
    assert ws.is_strict_layout(model)
    layer = model.blocks[0].self_attn.q
    misaligned = torch.empty(layer.weight.numel() + 1, dtype=layer.weight.dtype)[1:].view_as(layer.weight)
    misaligned.copy_(layer.weight)
    layer.weight = misaligned  # one element past a 16-byte boundary
    with pytest.raises(ws.LayoutError, match=r"blocks\.0\.self_attn\.q"):
        call(model, make_inputs(model.config))


def test_fp16_fast_needs_a_gpu(tmp_path):
    save_file(_state(_seeded("tiny-t2v")), tmp_path / "dit.safetensors")
    with pytest.raises(ws.UnsupportedModeError, match="'fp16_fast' .* needs a CUDA GPU"):
        load_model(tmp_path / "dit.safetensors", dtype="fp16_fast")


def test_an_fp8_tensor_outside_the_quantized_layers_is_dequantized_with_its_scale(tmp_path):
    reference = _seeded("tiny-t2v")
    sd = _state(reference)
    w = sd["text_embedding.0.weight"]  # keep-listed: never quantized
    scale = w.abs().amax(dim=1).float() / 448
    sd["text_embedding.0.weight"] = (w / scale[:, None]).to(torch.float8_e4m3fn)
    sd["text_embedding.0.scale_weight"] = scale
    save_file(sd, tmp_path / "dit.safetensors")
    model = load_model(tmp_path / "dit.safetensors", dtype=torch.float32, quantization="fp8_e4m3fn_scaled")
    loaded = model.text_embedding[0].weight
    assert loaded.dtype == torch.float32
    assert ((loaded - w).norm() / w.norm()).item() < 0.05  # e4m3 rounding, scale applied per row
