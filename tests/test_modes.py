"""RuntimeModes: one validated object for every runtime choice, and apply_modes."""

from __future__ import annotations

import pytest
import torch
from conftest import call, make_inputs
from safetensors.torch import save_file

import wanstudio as ws
from wanstudio.errors import ConfigError, UnknownOptionError, UnsupportedModeError
from wanstudio.layout import is_strict_layout
from wanstudio.modes import RuntimeModes, apply_modes
from wanstudio.options import AttentionMode, BasePrecision, QuantMode
from wanstudio.quant import QuantizedLinear


def test_strings_become_options_and_dtypes_become_precisions():
    m = RuntimeModes(quantization="fp8_e4m3fn_fast", attention="sdpa", precision=torch.float16)
    assert m.quantization is QuantMode.FP8_E4M3FN_FAST
    assert m.attention is AttentionMode.SDPA
    assert m.precision is BasePrecision.FP16 and m.dtype == torch.float16


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [
        ("fp32", torch.float32),
        ("bf16", torch.bfloat16),
        ("fp16", torch.float16),
        ("fp16_fast", torch.float16),
    ],
)
def test_base_precision_knows_its_dtype(precision, dtype):
    assert BasePrecision(precision).dtype == dtype
    assert RuntimeModes(precision=precision).dtype == dtype


def test_unknown_names_are_refused_with_a_suggestion():
    with pytest.raises(UnknownOptionError, match="Did you mean 'fp8_e4m3fn_fast'"):
        RuntimeModes(quantization="fp8_e4m3_fast")
    with pytest.raises(UnknownOptionError, match="float64"):
        RuntimeModes(precision=torch.float64)


@pytest.mark.parametrize("bad", [-1, True, 1.5, "2"])
def test_counts_must_be_non_negative_integers(bad):
    with pytest.raises(ConfigError, match=f"prefetch must be an integer >= 0, got {bad!r}"):
        RuntimeModes(prefetch=bad)
    with pytest.raises(ws.BlockSwapError, match="blocks_to_swap must be an integer >= 0, found"):
        RuntimeModes(blocks_to_swap=bad)  # offload.check_blocks_to_swap: the one check


def test_switches_must_be_booleans():
    with pytest.raises(ConfigError, match="compile must be True or False"):
        RuntimeModes(compile="yes")


def test_merge_applies_given_keywords_over_modes():
    base = RuntimeModes(quantization="fp8_e4m3fn", blocks_to_swap=2)
    merged = RuntimeModes.merge(base, quantization=None, attention="sdpa", precision="fp32")
    assert merged.quantization is QuantMode.FP8_E4M3FN and merged.blocks_to_swap == 2
    assert merged.precision is BasePrecision.FP32
    assert RuntimeModes.merge(None) == RuntimeModes()
    with pytest.raises(ConfigError, match="unknown runtime mode"):
        RuntimeModes.merge(None, quantisation="fp8_e4m3fn")


def test_fp16_fast_is_refused_off_cuda():
    with pytest.raises(UnsupportedModeError, match="needs a CUDA GPU"):
        RuntimeModes(precision="fp16_fast").check_device("cpu")
    RuntimeModes(quantization="fp8_e4m3fn_scaled_fast").check_device("cpu")  # emulated: allowed


def _tiny(seed=0):
    torch.manual_seed(seed)
    return ws.WanModel(ws.WanConfig.preset("tiny-i2v")).eval()


def test_apply_modes_quantizes_like_quantize_and_is_idempotent():
    inputs = make_inputs(ws.WanConfig.preset("tiny-i2v"), frames=2, height=4, width=4)
    reference = ws.quantize(_tiny(), "fp8_e4m3fn_scaled")
    model = apply_modes(_tiny(), RuntimeModes(quantization="fp8_e4m3fn_scaled", precision="fp32"))
    with torch.no_grad():
        assert torch.equal(call(model, inputs), call(reference, inputs))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert layers and model.quantization is QuantMode.FP8_E4M3FN_SCALED
    apply_modes(model, model.modes)  # again: nothing re-quantized
    assert {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)} == layers
    with pytest.raises(UnsupportedModeError, match="already quantized"):
        apply_modes(model, RuntimeModes(quantization="fp4_scaled"))


def test_apply_modes_turns_switches_on_and_back_off():
    model = apply_modes(_tiny(), RuntimeModes(strict_layout=True, compile=True, precision="fp32"))
    assert is_strict_layout(model)
    assert all(getattr(b, "_wanstudio_compiled", False) for b in model.blocks)
    apply_modes(model, RuntimeModes(precision="fp32"))
    assert not is_strict_layout(model)
    assert not any(getattr(b, "_wanstudio_compiled", False) for b in model.blocks)


def test_load_model_takes_modes_or_the_old_keywords(tmp_path):
    model = _tiny()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "dit.safetensors")
    inputs = make_inputs(model.config, frames=2, height=4, width=4)
    modes = RuntimeModes(quantization="fp8_e4m3fn_scaled", precision="fp32", strict_layout=True)
    by_modes = ws.load_model(tmp_path / "dit.safetensors", modes=modes)
    by_keywords = ws.load_model(
        tmp_path / "dit.safetensors",
        dtype=torch.float32,
        quantization="fp8_e4m3fn_scaled",
        strict_layout=True,
    )
    assert by_modes.modes == by_keywords.modes == modes
    assert is_strict_layout(by_modes)
    with torch.no_grad():
        assert torch.equal(call(by_modes, inputs), call(by_keywords, inputs))


# --- blocks_to_swap="auto" ----------------------------------------------------------------------
def test_auto_block_swap_and_the_budget_are_validated():
    modes = RuntimeModes(blocks_to_swap="auto", vram_budget_gb=12)
    assert modes.blocks_to_swap == "auto" and modes.vram_budget_gb == 12
    assert "blocks swapped: auto for 12 GiB (prefetch 1)" in modes.describe()
    assert "auto for free memory" in RuntimeModes(blocks_to_swap="auto").describe()
    for bad in (0, -1, True, "12"):
        with pytest.raises(ConfigError, match="vram_budget_gb must be a number of GiB > 0"):
            RuntimeModes(vram_budget_gb=bad)
    with pytest.raises(ws.BlockSwapError, match="blocks_to_swap must be an integer"):
        RuntimeModes(blocks_to_swap="Auto")  # only the exact word


def test_auto_block_swap_is_zero_off_cuda():
    model = apply_modes(_tiny(), RuntimeModes(blocks_to_swap="auto", vram_budget_gb=0.001, precision="fp32"))
    assert model.modes.blocks_to_swap == 0 and getattr(model, "block_swap_stats", None) is None


def test_auto_block_swap_asks_the_planner(monkeypatch):
    from wanstudio.modes import resolve_blocks_to_swap
    from wanstudio.offload import measure_block_bytes, measure_parts, plan_dit_memory

    torch.manual_seed(0)
    model = ws.WanModel(ws.WanConfig.preset("tiny-i2v").replace(num_layers=8)).eval()
    whole = measure_parts(model).dit
    block = measure_block_bytes(model)
    # a budget 2.5 blocks short of "everything resident" (plus the planner's activation estimate
    # and reserve): prefetch 1 keeps 2 slots, so 5 blocks swapped saves 3
    plan = plan_dit_memory(model, 2**40, prefetch=1)
    budget = whole + plan.peak_bytes - plan.dit_device_bytes - int(2.5 * block)
    modes = RuntimeModes(blocks_to_swap="auto", vram_budget_gb=budget / 2**30, precision="fp32")
    assert resolve_blocks_to_swap(model, modes, device="cuda") == 5
    assert model.memory_plan.blocks_to_swap == 5 and model.memory_plan.prefetch == 1
    monkeypatch.setattr("wanstudio.offload.planner.free_device_bytes", lambda *a, **k: None)  # no CUDA
    with pytest.raises(ws.BlockSwapError, match="torch finds no CUDA device. Pass vram_budget_gb"):
        resolve_blocks_to_swap(model, RuntimeModes(blocks_to_swap="auto"), device="cuda")
