"""LoRAs at load: merged into each weight as it streams, before quantization, and through
RuntimeModes / apply_modes on a loaded model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import call, make_inputs
from safetensors.torch import save_file
from test_checkpoints import _MODEL_SQNR_BARS, _scaled_fp8_file, _seeded, _state
from test_lora import LAYERS, factors, write_lora
from test_quant import SQNR_BARS

import wanstudio as ws
from wanstudio.lora import LoRA, LoraError, applied_loras, apply_lora
from wanstudio.modes import RuntimeModes, apply_modes
from wanstudio.quant import sqnr_db


def _files(tmp_path, model, strength=0.7):
    save_file(_state(model), tmp_path / "dit.safetensors")
    fac = factors(model, list(LAYERS), rank=4, alpha=2.0)
    lora = LoRA(write_lora(tmp_path / "distill.safetensors", fac, "kijai"), strength)
    return tmp_path / "dit.safetensors", lora


def test_merge_at_load_equals_apply_lora_on_the_loaded_model(tmp_path):
    dit, lora = _files(tmp_path, _seeded("tiny-infinitetalk"))
    merged = ws.load_model(dit, dtype=torch.float32, loras=[lora])
    reference = apply_lora(ws.load_model(dit, dtype=torch.float32), lora)
    for (name, a), b in zip(merged.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    assert applied_loras(merged) == (lora,)
    with pytest.raises(LoraError, match="merged while loading"):
        ws.remove_lora(merged, lora)


@pytest.mark.parametrize("mode", sorted(m.value for m in SQNR_BARS))
def test_lora_then_quantization_meets_the_modes_bar(tmp_path, mode):
    """Every quantized mode: the LoRA merges into the float weights first, so the loaded model
    is as close to the merged float model as the mode's own bar (test_quant) allows."""
    model = _seeded("tiny-infinitetalk")
    dit, lora = _files(tmp_path, model)
    reference = apply_lora(model, lora)  # the merged float model
    loaded = ws.load_model(dit, dtype=torch.float32, quantization=mode, loras=[(str(lora.path), 0.7)])
    inputs = make_inputs(reference.config)
    with torch.no_grad():
        assert sqnr_db(call(loaded, inputs), call(reference, inputs)) >= SQNR_BARS[ws.QuantMode(mode)]


def test_lora_on_a_scaled_fp8_file_is_requantized_in_the_files_mode(tmp_path):
    model = _seeded("tiny-infinitetalk")
    _scaled_fp8_file(model, tmp_path / "fp8.safetensors")
    fac = factors(model, list(LAYERS), rank=4, alpha=2.0)
    lora = LoRA(write_lora(tmp_path / "l.safetensors", fac, "diffusers"), 0.7)
    # the file as it means it (fp8 x scale), in fp32, with the LoRA applied: the reference
    reference = ws.quant.dequantize(ws.load_model(tmp_path / "fp8.safetensors", dtype=torch.float32))
    apply_lora(reference, lora)
    loaded = ws.load_model(tmp_path / "fp8.safetensors", dtype=torch.float32, loras=[lora])
    assert loaded.quantization is ws.QuantMode.FP8_E4M3FN_SCALED
    inputs = make_inputs(reference.config)
    with torch.no_grad():
        assert sqnr_db(call(loaded, inputs), call(reference, inputs)) >= _MODEL_SQNR_BARS["fp8_e4m3fn_scaled"]


def test_a_lora_for_another_model_fails_before_any_weight_is_read(tmp_path, monkeypatch):
    dit, _ = _files(tmp_path, _seeded("tiny-infinitetalk"))
    other = ws.WanModel(ws.WanConfig.preset("tiny-infinitetalk").replace(dim=64, num_heads=1))
    lora = LoRA(write_lora(tmp_path / "other.safetensors", factors(other, list(LAYERS), 4, 4.0), "kijai"))
    reads = []
    monkeypatch.setattr(ws.checkpoints, "read_tensor", lambda e: reads.append(e) or None)
    with pytest.raises(LoraError, match="blocks.0"):
        ws.load_model(dit, dtype=torch.float32, loras=[lora])
    assert reads == []


def test_apply_modes_keeps_the_model_at_exactly_the_modes_loras(tmp_path):
    model = _seeded("tiny-infinitetalk")
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    fac = factors(model, list(LAYERS), rank=4, alpha=2.0)
    path = write_lora(tmp_path / "l.safetensors", fac, "kijai")
    apply_modes(model, RuntimeModes(precision="fp32", loras=[(str(path), 1.0)]))
    once = {k: v.clone() for k, v in model.state_dict().items()}
    apply_modes(model, RuntimeModes(precision="fp32", loras=[(str(path), 1.0)]))  # no change
    assert all(torch.equal(once[k], v) for k, v in model.state_dict().items())
    apply_modes(model, RuntimeModes(precision="fp32", loras=[(str(path), 0.5)]))  # strength changed
    assert applied_loras(model) == (LoRA(path, 0.5),)
    apply_modes(model, RuntimeModes(precision="fp32"))  # none: back to the original bits
    assert all(torch.equal(w0[k], v) for k, v in model.state_dict().items())


def test_runtime_modes_validates_loras(tmp_path):
    with pytest.raises(LoraError, match="no such file"):
        RuntimeModes(loras=[tmp_path / "missing.safetensors"])
    with pytest.raises(ws.ConfigError, match="list of LoRA files"):
        RuntimeModes(loras="one.safetensors")


_RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys, gc
    import torch
    import wanstudio as ws

    def status_kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    cfg = ws.WanConfig(**json.loads(sys.argv[2]))
    ws.WanModel(cfg, device="meta")
    gc.collect()
    before = status_kib("VmHWM")
    model = ws.load_model(sys.argv[1], config=cfg, dtype=torch.bfloat16, loras=sys.argv[3:])
    peak = status_kib("VmHWM")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"peak_delta": peak - before, "model_bytes": size}))
    """
)


@pytest.mark.slow
def test_peak_host_memory_with_two_loras_stays_near_one_copy_of_the_model(tmp_path):
    cfg = dict(dim=1024, ffn_dim=4096, num_heads=8, num_layers=12, text_dim=512)
    torch.manual_seed(0)
    model = ws.WanModel(ws.WanConfig(**cfg), dtype=torch.bfloat16)
    save_file(_state(model), tmp_path / "big.safetensors")
    layers = [f"blocks.{i}.{m}" for i in range(12) for m in ("self_attn.q", "self_attn.o", "ffn.0", "ffn.2")]
    paths = [
        str(write_lora(tmp_path / f"l{s}.safetensors", factors(model, layers, 64, 64.0, seed=s), "kijai"))
        for s in (1, 2)
    ]
    del model
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / "big.safetensors"), json.dumps(cfg), *paths],
        capture_output=True,
        text=True,
        check=True,
    )
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = figures["peak_delta"] / figures["model_bytes"]
    print(f"peak RSS growth {ratio:.2f}x the model with two rank-64 LoRAs")
    assert ratio < 1.3
