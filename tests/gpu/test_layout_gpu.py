"""Layout contracts, strict mode and the inspector on a CUDA GPU (issue 5's incidents, for real).

Run on the device machine::

    python -m pytest tests/gpu/test_layout_gpu.py -m gpu -rs -s

On CUDA a misaligned fp8 weight or a row-major mat2 would reach cuBLASLt (CUBLAS_STATUS_NOT_SUPPORTED
or a rejected layout); strict mode must stop both before the launch, and outside strict mode the
one copy the contract makes must give the launch what it needs. The tiny InfiniteTalk model runs
in bf16 in every quantization mode this GPU supports with zero violations, also block-swapped.

``WANSTUDIO_LAYOUT_TEST_DEVICE=cpu python -m pytest tests/gpu/test_layout_gpu.py -m gpu`` rehearses
the file on the CPU (fp32; block swap with FakeTransferBackend).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import call, make_inputs
from torch import nn

import wanstudio as ws
from wanstudio import layout
from wanstudio.attention import attention, available_attention_modes
from wanstudio.errors import LayoutError
from wanstudio.inspector import inspect_layout
from wanstudio.layout import StrideRule, layout_name, strict_layout
from wanstudio.options import AttentionMode, QuantMode

DEVICE = torch.device(os.environ.get("WANSTUDIO_LAYOUT_TEST_DEVICE", "cuda"))
ON_CUDA = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if ON_CUDA else torch.float32
SMALL = dict(frames=3, height=4, width=6)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
quant = pytest.importorskip("wanstudio.quant")


def _capability() -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(DEVICE)) if ON_CUDA else (0, 0)


def _skip_if_unsupported(mode: QuantMode) -> None:
    if ON_CUDA and mode.is_fast and mode.is_fp8 and _capability() < quant.spec.FP8_MIN_CAPABILITY:
        pytest.skip(f"{mode.value} needs compute capability >= 8.9; this GPU is {_capability()}")


@pytest.fixture(scope="module", autouse=True)
def banner():
    if ON_CUDA:
        print(
            f"\n{torch.cuda.get_device_name(DEVICE)}, compute capability {_capability()}, "
            f"torch {torch.__version__}"
        )


def _sync() -> None:
    if ON_CUDA:
        torch.cuda.synchronize(DEVICE)


def _inputs(cfg: ws.WanConfig, **kw) -> dict:
    return {k: v.to(DEVICE) for k, v in make_inputs(cfg, **{**SMALL, **kw}).items()}


def _model(preset: str, mode: QuantMode | None = None) -> ws.WanModel:
    torch.manual_seed(0)
    model = ws.WanModel(ws.WanConfig.preset(preset), device=DEVICE, dtype=DTYPE).eval()
    if mode is not None:
        quant.quantize(model, mode)
    return model


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    raw = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = raw[1:].view(t.shape)
    view.copy_(t)
    return view


class _Launches:
    def __init__(self):
        self.real, self.calls = torch._scaled_mm, []

    def __call__(self, a, b, *args, **kwargs):
        self.calls.append((tuple(b.shape), tuple(b.stride()), b.data_ptr() % 16))
        return self.real(a, b, *args, **kwargs)


# --- incidents (a) and (b) on the real fp8 matmul -------------------------------------------------
@pytest.mark.parametrize("bad", ["misaligned", "row-major mat2"])
@pytest.mark.parametrize("mode", [QuantMode.FP8_E4M3FN_FAST, QuantMode.FP8_E5M2_SCALED_FAST], ids=str)
def test_a_b_strict_mode_stops_the_launch_and_the_copy_fixes_it(mode, bad, monkeypatch):
    _skip_if_unsupported(mode)
    model = _model("tiny-t2v", mode)
    inputs = _inputs(model.config)
    with torch.no_grad():
        reference = call(model, inputs)
    layer = model.blocks[0].self_attn.q
    assert layer.path == "scaled_mm"
    if bad == "misaligned":
        layer.weight = _misaligned(layer.weight)
        assert layer.weight.data_ptr() % 16 == 1
    else:
        layer.weight = layer.weight.t().contiguous().t()  # mat2 = weight.t() is row-major
    launches = _Launches()
    monkeypatch.setattr(torch, "_scaled_mm", launches)
    with strict_layout(), torch.no_grad(), pytest.raises(LayoutError) as err:
        call(model, inputs)
    _sync()  # no CUDA error pending: nothing was launched with the bad operand
    assert launches.calls == []
    assert str(err.value).startswith("blocks.0.self_attn.q: kernel torch._scaled_mm")
    assert ("align" if bad == "misaligned" else "column-major") in str(err.value)
    report = inspect_layout(model, inputs)
    _sync()
    (row,) = report.violations()
    assert (row.module, row.tensor, row.copies) == ("blocks.0.self_attn.q", "mat2", 1)
    first = launches.calls[0]
    assert first[1][0] == 1 and first[2] == 0  # what cuBLASLt got: column-major, aligned
    with torch.no_grad():
        torch.testing.assert_close(call(model, inputs), reference)


# --- incident (c) on every available attention backend --------------------------------------------
class _Permuted(nn.Module):
    def __init__(self, mode: AttentionMode):
        super().__init__()
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, L, H, D)
        q = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # (B, L, H, D), stride(-1) == H
        return attention(q, x, x, mode=self.mode, where=layout_name(self))


@pytest.mark.parametrize("mode", list(AttentionMode), ids=str)
def test_c_non_contiguous_q_is_copied_for_each_backend_that_needs_it(mode):
    found = available_attention_modes(DEVICE)[mode]
    if not found.available:
        pytest.skip(f"{mode.value}: {found.reason}")
    backend = ws.attention.BACKENDS[mode]
    if backend.contract.operand("q").stride is not StrideRule.LAST_DIM_CONTIGUOUS:
        pytest.skip(f"{mode.value} takes any stride")
    dtype = torch.bfloat16 if torch.bfloat16 in backend.needs.dtypes else backend.needs.dtypes[0]
    module = _Permuted(mode)
    layout.assign_layout_names(module)
    x = torch.randn(1, 256, 2, 128, device=DEVICE, dtype=dtype)
    report = inspect_layout(module, x)
    _sync()
    (row,) = report.violations()
    assert (row.tensor, row.copies, row.copy_bytes) == ("q", 1, x.numel() * x.element_size())
    with strict_layout(), pytest.raises(LayoutError, match="operand 'q'"):
        module(x)


# --- the tiny InfiniteTalk model on the device, every mode, also block-swapped --------------------
@pytest.fixture(scope="module")
def talk() -> ws.WanModel:
    return _model("tiny-infinitetalk")


@pytest.mark.parametrize("mode", list(QuantMode), ids=str)
def test_tiny_infinitetalk_has_no_violations_in_every_mode(talk, mode):
    _skip_if_unsupported(mode)
    model = quant.quantize(copy.deepcopy(talk), mode)
    for speakers in (1, 2):
        with strict_layout():
            report = inspect_layout(model, _inputs(model.config, speakers=speakers))
        _sync()
        assert report.violations() == [] and report.copies() == []
        assert all(r.aligned16 for r in report.filter(role="parameter") if r.module.startswith("blocks."))
        kernels = {r.kernel for r in report.filter(role="kernel operand")}
        if mode.is_fast and mode.is_fp8:
            assert any("_scaled_mm" in k for k in kernels)
            if ON_CUDA and quant.kernels.HAS_TRITON:
                assert "triton:quantize_rows_e4m3" in kernels
        if mode.is_fp4 and ON_CUDA and quant.kernels.HAS_TRITON:
            assert "triton:dequantize_fp4" in kernels or any("nvfp4" in k for k in kernels)
    print(f"{mode.value}: {len(report)} rows, {len(report.filter(role='kernel operand'))} operand checks")


@pytest.mark.parametrize("mode", [QuantMode.FP8_E4M3FN_SCALED_FAST, QuantMode.FP4_SCALED], ids=str)
def test_d_block_swapped_weights_keep_their_contracts_on_the_device(talk, mode):
    _skip_if_unsupported(mode)
    from wanstudio import offload

    model = quant.quantize(copy.deepcopy(talk), mode)
    inputs = _inputs(model.config, speakers=2)
    with torch.no_grad():
        reference = call(model, inputs)
    kw = {} if ON_CUDA else {"backend": offload.FakeTransferBackend()}
    offload.enable_block_swap(model, 1, prefetch=1, offload_txt_emb=True, **kw)
    hooks = _hooks(model)
    try:
        with strict_layout():
            report = inspect_layout(model, inputs)
        _sync()
        assert _hooks(model) == hooks
        assert report.violations() == [] and report.copies() == []
        swapped = report.filter(kernel="block_swap_copy")
        assert swapped.rows and all(r.aligned16 and r.status == "ok" for r in swapped)
        with torch.no_grad():
            assert torch.equal(call(model, inputs), reference)
    finally:
        offload.disable_block_swap(model)
    assert _hooks(model) == 0
