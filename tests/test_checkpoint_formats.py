"""The checkpoint files people download: storage mode per tensor (kijai's e5m2-scaled base +
e4m3-scaled InfiniteTalk layers), optimum-quanto files (InfiniteTalk's ``quant_models``), a
requested mode converting every layer, and ``describe_checkpoint`` / ``doctor --file``.

References are computed here the straightforward way: a float model holding each weight as
the file means it (stored x scale), which a loaded file must compute; accuracy bars against
the float model are that reference's SQNR less a few dB.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import call, make_inputs
from safetensors.torch import load_file, save_file

import wanstudio as ws
from wanstudio.checkpoints import describe_checkpoint
from wanstudio.errors import CheckpointError
from wanstudio.options import QuantMode
from wanstudio.quant import QuantizedLinear, QuantMix, quantizable_linears, quantize_weight, sqnr_db

E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2
_AUDIO = ("audio_proj.", ".audio_cross_attn.", ".norm_x.")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def talk() -> ws.WanModel:
    torch.manual_seed(0)
    return ws.WanModel(ws.WanConfig.preset("tiny-infinitetalk")).eval()


def _out(model: ws.WanModel) -> torch.Tensor:
    with torch.no_grad():
        return call(model, make_inputs(model.config))


def _scaled(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().max().float() / torch.finfo(dtype).max
    return (w / scale).to(dtype), scale.reshape(1)


def kijai_pair(model: ws.WanModel, folder) -> tuple[list, dict]:
    """kijai-style files: the Wan base with every 2-D weight e5m2 + ``scale_weight`` (a
    ``scaled_fp8`` marker), and the InfiniteTalk layers e4m3 + ``scale_weight`` in their own
    file. Returns the paths and {name: the weight the files mean}."""
    base, audio, real = {}, {}, {}
    for key, value in model.state_dict().items():
        out = audio if any(a in key for a in _AUDIO) else base
        dtype = E4 if out is audio else E5
        if key.endswith(".weight") and value.dim() == 2:
            q, s = _scaled(value, dtype)
            out["model.diffusion_model." + key] = q
            out["model.diffusion_model." + key.removesuffix("weight") + "scale_weight"] = s
            real[key] = q.float() * s
        else:
            out["model.diffusion_model." + key] = value.bfloat16()
            real[key] = value.bfloat16().float()
    base["scaled_fp8"] = torch.zeros(0, dtype=E5)
    audio["scaled_fp8"] = torch.zeros(0, dtype=E4)
    paths = [folder / "Wan2_1-I2V-14B-480p_fp8_e5m2_scaled_KJ.safetensors"]
    paths.append(folder / "Wan2_1-InfiniteTalk-Single_fp8_e4m3fn_scaled_KJ.safetensors")
    save_file(base, paths[0])
    save_file(audio, paths[1])
    return paths, real


def holding(model: ws.WanModel, weights: dict) -> ws.WanModel:
    ref = copy.deepcopy(model)
    ref.load_state_dict(weights)
    return ref


# --- mixed fp8 storage ---------------------------------------------------------------------------
def test_mixed_fp8_pair_runs_each_layer_in_its_files_mode(tmp_path, talk):
    paths, real = kijai_pair(talk, tmp_path)
    model = ws.load_model(paths, dtype=torch.float32)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert set(layers) == {n for n, _ in quantizable_linears(talk)}
    for name, layer in layers.items():
        expected = QuantMode.FP8_E4M3FN_SCALED if ".audio_cross_attn." in name else QuantMode.FP8_E5M2_SCALED
        assert layer.mode is expected, name
    stored = load_file(paths[1])
    q = model.blocks[1].audio_cross_attn.q_linear
    assert torch.equal(
        q.weight.view(torch.uint8),
        stored["model.diffusion_model.blocks.1.audio_cross_attn.q_linear.weight"].view(torch.uint8),
    )
    assert isinstance(model.quantization, QuantMix) and model.quantization.value == "mixed"
    assert model.quantization.modes == {QuantMode.FP8_E5M2_SCALED: 24, QuantMode.FP8_E4M3FN_SCALED: 6}
    info = model.checkpoint_info
    assert info.storage == {"fp8_e5m2_scaled": 32, "fp8_e4m3fn_scaled": 10, "bfloat16": 1}
    assert "weights stored as fp8_e5m2_scaled: 32, fp8_e4m3fn_scaled: 10, bfloat16: 1" in info.summary()
    reference = holding(talk, real)
    float_out, ref_out, out = _out(talk), _out(reference), _out(model)
    assert sqnr_db(ref_out, out) > 100  # the files' numbers, dequantized exactly
    assert sqnr_db(float_out, out) >= sqnr_db(float_out, ref_out) - 2.0


def test_a_requested_mode_converts_every_layer_from_the_dequantized_weight(tmp_path, talk):
    paths, real = kijai_pair(talk, tmp_path)
    stored = {**load_file(paths[0]), **load_file(paths[1])}
    model = ws.load_model(paths, dtype=torch.float32, quantization="fp8_e4m3fn_scaled")
    assert model.quantization is QuantMode.FP8_E4M3FN_SCALED
    kept = model.blocks[0].audio_cross_attn.kv_linear  # e4m3 in the file: kept bit for bit
    key = "model.diffusion_model.blocks.0.audio_cross_attn.kv_linear."
    assert torch.equal(kept.weight.view(torch.uint8), stored[key + "weight"].view(torch.uint8))
    assert torch.equal(kept.scale_weight, stored[key + "scale_weight"])
    converted = model.blocks[0].ffn[0]  # e5m2 in the file: stored x scale, quantized in e4m3
    expected = quantize_weight(real["blocks.0.ffn.0.weight"], QuantMode.FP8_E4M3FN_SCALED)
    assert torch.equal(converted.weight.float(), expected["weight"].float())
    assert torch.equal(converted.scale_weight, expected["scale_weight"])
    q8 = ws.load_model(paths, dtype=torch.float32, quantization="gguf_q8_0")
    for name, layer in q8.named_modules():
        if isinstance(layer, QuantizedLinear):
            assert torch.equal(
                layer.weight_q8, quantize_weight(real[name + ".weight"], "gguf_q8_0")["weight_q8"]
            )
    bar = sqnr_db(_out(talk), _out(holding(talk, real))) - 3.0
    assert sqnr_db(_out(talk), _out(q8)) >= bar


# --- optimum-quanto ---------------------------------------------------------------------------------
def quanto_file(model: ws.WanModel, path, qtype: str = "qint8", scale_dtype=torch.bfloat16) -> dict:
    """``model`` as quanto's ``quantize`` + ``freeze`` + ``save_file`` write it: every Linear's
    weight as ``._data`` (int8 or fp8, absmax per output row) + ``._scale`` [out, 1] in
    ``scale_dtype``, ``input_scale`` / ``output_scale`` scalars, and the JSON map beside.
    Returns {name: the weight the file means}."""
    dtype = {"qint8": torch.int8, "qfloat8": E4}[qtype]
    linears = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    out, real, qmap = {}, {}, {}
    for key, value in model.state_dict().items():
        layer = key.removesuffix(".weight")
        if key.endswith(".weight") and layer in linears:
            qmax = 127.0 if dtype == torch.int8 else torch.finfo(E4).max
            scale = (value.abs().amax(dim=1, keepdim=True) / qmax).to(scale_dtype)
            x = value / scale.float()
            data = x.round().clamp(-128, 127).to(torch.int8) if dtype == torch.int8 else x.to(E4)
            out[key + "._data"], out[key + "._scale"] = data, scale
            out[layer + ".input_scale"] = torch.ones((), dtype=scale_dtype)
            out[layer + ".output_scale"] = torch.ones((), dtype=scale_dtype)
            real[key] = data.float() * scale.float()
            qmap[layer] = {"weights": qtype, "activations": "none"}
        else:
            out[key], real[key] = value, value
    save_file(out, path)
    path.with_suffix(".json").write_text(json.dumps(qmap))
    return real


def test_quanto_int8_runs_as_q8_0_holding_the_files_numbers(tmp_path, talk):
    real = quanto_file(talk, tmp_path / "infinitetalk_single_int8.safetensors")
    model = ws.load_model(tmp_path / "infinitetalk_single_int8.safetensors", dtype=torch.float32)
    info = model.checkpoint_info
    assert info.formats == ["quanto"] and info.storage == {"quanto qint8": 42, "float32": 1}
    assert model.quantization is QuantMode.GGUF_Q8_0
    q = model.blocks[0].self_attn.q  # bf16 scales are fp16 numbers: every block keeps the row's
    assert torch.equal(q.dequantized_weight(torch.float32), real["blocks.0.self_attn.q.weight"])
    assert torch.equal(model.text_embedding[0].weight, real["text_embedding.0.weight"])  # kept: data x scale
    reference = holding(talk, real)
    assert sqnr_db(_out(reference), _out(model)) > 100


def test_quanto_int8_with_fp32_scales_is_requantized_per_block(tmp_path, talk):
    real = quanto_file(talk, tmp_path / "q.safetensors", scale_dtype=torch.float32)
    model = ws.load_model(tmp_path / "q.safetensors", dtype=torch.float32)
    q = model.blocks[0].self_attn.q
    expected = quantize_weight(real["blocks.0.self_attn.q.weight"], QuantMode.GGUF_Q8_0)
    assert torch.equal(q.weight_q8, expected["weight_q8"]) and torch.equal(
        q.weight_scale, expected["weight_scale"]
    )
    float_out, ref_out = _out(talk), _out(holding(talk, real))
    assert sqnr_db(float_out, _out(model)) >= sqnr_db(float_out, ref_out) - 3.0


def test_quanto_fp8_runs_as_e4m3_scaled_as_stored(tmp_path, talk):
    real = quanto_file(talk, tmp_path / "infinitetalk_single_fp8.safetensors", "qfloat8")
    model = ws.load_model(tmp_path / "infinitetalk_single_fp8.safetensors", dtype=torch.float32)
    assert model.quantization is QuantMode.FP8_E4M3FN_SCALED
    assert model.checkpoint_info.storage == {"quanto fp8_e4m3fn_scaled": 42, "float32": 1}
    stored = load_file(tmp_path / "infinitetalk_single_fp8.safetensors")
    layer = model.blocks[1].cross_attn.k
    assert torch.equal(
        layer.weight.view(torch.uint8), stored["blocks.1.cross_attn.k.weight._data"].view(torch.uint8)
    )
    assert torch.equal(
        layer.scale_weight.reshape(-1), stored["blocks.1.cross_attn.k.weight._scale"].float().reshape(-1)
    )
    assert sqnr_db(_out(holding(talk, real)), _out(model)) > 100


def test_quanto_layouts_wanstudio_cannot_read_are_refused(tmp_path, talk):
    path = tmp_path / "q.safetensors"
    quanto_file(talk, path)
    qmap = json.loads(path.with_suffix(".json").read_text())
    qmap["blocks.0.ffn.0"]["weights"] = "qint4"
    path.with_suffix(".json").write_text(json.dumps(qmap))
    with pytest.raises(CheckpointError, match=r"blocks\.0\.ffn\.0 has quanto weights 'qint4'"):
        ws.load_model(path)
    qmap["blocks.0.ffn.0"]["weights"] = "qfloat8"
    path.with_suffix(".json").write_text(json.dumps(qmap))
    with pytest.raises(
        CheckpointError, match=r"blocks\.0\.ffn\.0\.weight\._data is torch\.int8 but q\.json says 'qfloat8'"
    ):
        ws.load_model(path)
    path.with_suffix(".json").unlink()
    sd = load_file(path)
    sd["blocks.0.ffn.0.weight._shift"] = torch.zeros(1)
    save_file(sd, path)
    with pytest.raises(CheckpointError, match="int4 / int2 weights"):
        ws.load_model(path)
    del sd["blocks.0.ffn.0.weight._shift"], sd["blocks.0.ffn.0.weight._scale"]
    save_file(sd, path)
    with pytest.raises(
        CheckpointError, match=r"blocks\.0\.ffn\.0\.weight\._data is torch\.int8 without its \.weight\._scale"
    ):
        ws.load_model(path)


# --- what a file is ------------------------------------------------------------------------------------
def test_describe_checkpoint_names_format_storage_and_model(tmp_path, talk):
    paths, _ = kijai_pair(talk, tmp_path)
    text = describe_checkpoint(paths)
    assert f"{paths[0]}: comfy-prefixed" in text
    assert "blocks.*.self_attn: 8 fp8_e5m2_scaled" in text
    assert "blocks.*.audio_cross_attn: 6 fp8_e4m3fn_scaled" in text
    assert "model: tiny-infinitetalk (i2v + InfiniteTalk audio, 2 blocks, dim 256, ffn 512)" in text
    assert "mixed layers: fp8_e5m2_scaled x 24, fp8_e4m3fn_scaled x 6" in text
    alone = describe_checkpoint(paths[1])  # the InfiniteTalk file on its own
    assert "model: not a whole DiT" in alone and "audio_proj: 4 fp8_e4m3fn_scaled" in alone


def test_doctor_file_prints_what_a_file_is(tmp_path, talk, capsys):
    from wanstudio.cli import main

    quanto_file(talk, tmp_path / "q.safetensors")
    assert main(["doctor", "--device", "cpu", "--file", str(tmp_path / "q.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "checkpoint:" in out and "q.safetensors: quanto" in out
    assert "blocks.*.ffn: 4 quanto qint8" in out and "runs its quantizable layers as: gguf_q8_0" in out


def test_a_damaged_file_of_a_mixed_set_is_named(tmp_path, talk):
    paths, _ = kijai_pair(talk, tmp_path)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[:-64])  # the InfiniteTalk file, truncated
    with pytest.raises(
        CheckpointError, match=r"InfiniteTalk-Single_fp8_e4m3fn_scaled_KJ\.safetensors: .*truncated"
    ):
        ws.load_model(paths)
    quanto_file(talk, tmp_path / "q.safetensors")
    tmp_path.joinpath("q.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"q\.json: not a quanto quantization map"):
        ws.load_model(tmp_path / "q.safetensors")


def test_the_studio_summary_shows_each_files_storage_and_the_layers_mix(tmp_path, talk):
    from types import SimpleNamespace

    from wanstudio.studio import LoadSettings, summarize

    paths, _ = kijai_pair(talk, tmp_path)
    model = ws.load_model(paths, dtype=torch.float32)
    rows = {w: (m, d) for w, m, d in summarize(SimpleNamespace(model=model), LoadSettings()).kernel_paths}
    kind, files = rows["checkpoint"]
    assert kind == "comfy-prefixed"
    assert f"{paths[0].name} (comfy-prefixed), {paths[1].name} (comfy-prefixed)" in files
    assert rows["weights stored as"] == (
        "mixed",
        "fp8_e5m2_scaled x 32, fp8_e4m3fn_scaled x 10, bfloat16 x 1",
    )
    mode, detail = rows["quantization"]
    assert mode == "disabled: mixed, as stored"
    assert detail.startswith("fp8_e5m2_scaled x 24, fp8_e4m3fn_scaled x 6 (")
    converted = ws.load_model(paths, dtype=torch.float32, quantization="fp8_e4m3fn_scaled")
    settings = LoadSettings(quantization="fp8_e4m3fn_scaled")
    rows = {w: (m, d) for w, m, d in summarize(SimpleNamespace(model=converted), settings).kernel_paths}
    assert rows["quantization"][0] == "fp8_e4m3fn_scaled"  # asked for: every layer in one mode
    assert rows["weights stored as"][0] == "mixed"  # the files still hold the mix
