"""Storage formats as objects (quant/formats/), the one kernel_path, and swap_linears."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from torch import nn

from wanstudio.options import QuantMode
from wanstudio.quant import (
    SPECS,
    QuantizedLinear,
    StorageFormat,
    format_for,
    kernel_path,
    quantize_weight,
    swap_linears,
)
from wanstudio.quant.spec import storage_mode_for

QUANTIZED = [m for m in QuantMode if m is not QuantMode.DISABLED]
# (N, K): K a whole number of fp4 blocks, K padded to one, N / K not multiples of 16
SHAPES = [(32, 64), (24, 40), (36, 20)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the registry ---------------------------------------------------------------------------------
def test_every_mode_has_the_format_its_spec_names():
    for mode, spec in SPECS.items():
        if spec.storage is None:
            with pytest.raises(ValueError, match="no quantization"):
                format_for(mode)
            continue
        fmt = format_for(mode)
        assert isinstance(fmt, StorageFormat) and fmt.spec is spec
        assert fmt.name == spec.storage  # the storage name is the module name: one entry registers
        module = importlib.import_module(f"wanstudio.quant.formats.{spec.storage}")
        assert type(fmt) is module.FORMAT
        assert format_for(mode.value) is fmt  # one shared object per mode


def test_format_capabilities_match_the_modes_matmul():
    for mode in QUANTIZED:
        fmt, spec = format_for(mode), SPECS[mode]
        assert (fmt.scaled_mm_dtype is not None) == mode.is_fp8
        if mode.is_fp8:
            assert fmt.scaled_mm_dtype == spec.fp8_dtype
        assert fmt.native_fp4 == (mode in (QuantMode.FP4_SCALED, QuantMode.FP4_SCALED_FAST))


def test_describe_is_one_line_naming_the_format():
    expected = {
        QuantMode.FP8_E4M3FN: "fp8 e4m3fn weight [N, K]",
        QuantMode.FP8_E5M2_SCALED: "fp8 e5m2 weight [N, K] + fp32 scale per output channel",
        QuantMode.FP4_SCALED: "NVFP4: e2m1 weights + e4m3 scale per 16 along K + fp32 scale per tensor",
        QuantMode.FP4_EXPERIMENTAL: "MXFP4: e2m1 weights + power-of-two (e8m0) scale per 32 along K",
    }
    for mode, line in expected.items():
        assert format_for(mode).describe() == line
    for mode in QUANTIZED:
        assert "\n" not in format_for(mode).describe()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


# --- buffers, quantize, dequantize, bytes ---------------------------------------------------------
@pytest.mark.parametrize("mode", QUANTIZED, ids=str)
def test_a_layer_stores_exactly_the_formats_buffers(mode):
    fmt = format_for(mode)
    for n, k in SHAPES:
        layer = QuantizedLinear(k, n, mode, bias=False)
        stored = {name: t for name, t in layer.state_dict().items()}
        bufs = fmt.buffers(n, k)
        assert [b.name for b in bufs] == list(fmt.names) == list(stored)
        for b in bufs:
            assert (tuple(stored[b.name].shape), stored[b.name].dtype) == (b.shape, b.dtype)
            if b.fill is not None:
                assert torch.all(stored[b.name] == b.fill)
        meta = QuantizedLinear.empty(k, n, mode, device="meta")
        assert all(meta._buffers[b.name].device.type == "meta" for b in bufs)


@pytest.mark.parametrize("mode", QUANTIZED, ids=str)
def test_quantize_and_dequantize_round_trip_through_the_format(mode):
    fmt = format_for(mode)
    g = torch.Generator().manual_seed(3)
    for n, k in SHAPES:
        w = torch.randn(n, k, generator=g) * 0.02
        tensors = fmt.quantize(w, None)
        assert tensors.keys() == set(fmt.names)
        for b in fmt.buffers(n, k):
            assert (tuple(tensors[b.name].shape), tensors[b.name].dtype) == (b.shape, b.dtype)
        assert sum(t.nbytes for t in tensors.values()) == fmt.nbytes(n, k)
        assert fmt.nbytes(n, k) * 8 >= math.floor(fmt.bits_per_weight * n * k)  # padding only adds
        # the format is what QuantizedLinear and quantize_weight use
        lin = nn.Linear(k, n, bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        layer = QuantizedLinear.from_linear(lin, mode)
        assert layer.format is fmt and layer.weight_nbytes == fmt.nbytes(n, k)
        ref = quantize_weight(w, mode)
        assert all(torch.equal(_bits(ref[x]), _bits(tensors[x])) for x in ref)
        deq = fmt.dequantize(tensors, k, torch.float32, "test")
        assert deq.shape == (n, k) and torch.equal(deq, layer.dequantized_weight(torch.float32))
        rel = (deq - w).norm() / w.norm()
        assert rel < (0.08 if mode.is_fp8 else 0.2)


def test_fp8_format_keeps_a_checkpoints_weight_and_converts_another_storage_mode():
    w8 = (torch.randn(8, 16) * 0.1).to(torch.float8_e4m3fn)
    fmt = format_for(QuantMode.FP8_E4M3FN_SCALED)
    out = fmt.quantize(w8, torch.tensor([0.5]))
    assert out["weight"] is w8 and out["scale_weight"].item() == 0.5
    assert fmt.holds_as_stored(w8, torch.tensor([0.5]))
    plain = format_for(QuantMode.FP8_E4M3FN)  # a scaled weight in a plain mode: stored x scale, cast
    assert not plain.holds_as_stored(w8, torch.tensor([0.5]))
    assert storage_mode_for(torch.float8_e4m3fn, True) is QuantMode.FP8_E4M3FN_SCALED
    out = plain.quantize(w8, torch.tensor([0.5]))
    assert torch.equal(out["weight"].float(), (w8.float() * 0.5).to(torch.float8_e4m3fn).float())


# --- kernel_path -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", QUANTIZED, ids=str)
def test_kernel_path_is_what_the_layer_reports(mode):
    for n, k in SHAPES:
        for bias in (True, False):
            layer = QuantizedLinear.from_linear(nn.Linear(k, n, bias=bias), mode)
            for dtype in (torch.bfloat16, torch.float32):
                got = kernel_path(mode, "cpu", dtype, in_features=k, out_features=n, bias=bias)
                assert got == layer.path_for("cpu", dtype)


def test_kernel_path_of_a_mode_without_a_shape():
    assert kernel_path("disabled") == ("linear", "F.linear at base precision")
    assert kernel_path(QuantMode.FP8_E4M3FN_SCALED) == (
        "dequantize",
        "fp8 weight upcast x per-channel scale, then F.linear",
    )
    assert kernel_path(QuantMode.FP4_SCALED, "cpu") == (
        "dequantize",
        "NVFP4 weight dequantized per layer (eager on cpu), then F.linear",
    )
    path, detail = kernel_path(QuantMode.FP4_SCALED_FAST, "cpu")
    assert path == "dequantize" and "native FP4 not used: cpu has no FP4 tensor cores" in detail
    path, detail = kernel_path(QuantMode.FP8_E4M3FN_FAST, "cpu")
    assert path == "scaled_mm" and detail.startswith("torch._scaled_mm, per-token e4m3")
    assert kernel_path(QuantMode.FP8_E4M3FN_FAST, "meta")[0] == "undecided"


# --- swap_linears --------------------------------------------------------------------------------
class _Outer(nn.Linear):
    """A Linear with a Linear inside: post-order must swap the inner one first."""

    def __init__(self):
        super().__init__(4, 4)
        self.inner = nn.Linear(4, 4)


def test_swap_linears_replaces_filtered_linears_children_first():
    shared = nn.Linear(3, 3)
    model = nn.Sequential(
        nn.Linear(2, 2),
        nn.Sequential(nn.ReLU(), nn.Linear(2, 5), shared),
        _Outer(),
        shared,  # the same layer under a second name: swapped once
    )
    seen = []

    def factory(name, module):
        seen.append((name, type(module).__name__, type(getattr(module, "inner", None)).__name__))
        return nn.Identity()

    swapped = swap_linears(model, factory, lambda name, m: name != "0")
    assert [s[0] for s in seen] == ["1.1", "1.2", "2.inner", "2"]
    assert seen[-1][2] == "Identity"  # the parent was built after its child was swapped
    assert list(swapped) == ["1.1", "1.2", "2.inner", "2"]
    assert type(model[0]) is nn.Linear  # filtered out
    assert all(type(model.get_submodule(n)) is nn.Identity for n in ("1.1", "1.2", "2"))
    assert isinstance(model[3], nn.Linear)  # the second name of the shared layer is left alone
