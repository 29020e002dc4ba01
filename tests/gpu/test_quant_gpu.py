"""Every quantization mode on a CUDA GPU, against fp64 and bf16 references.

Run on the device machine (prints one line per mode)::

    python -m pytest tests/gpu/test_quant_gpu.py -m gpu -rs -s

Checks: each mode's output SQNR on one Linear (the CPU test's bars, plus a Wan-14B-sized
layer), the path each mode takes (``scaled_mm`` with the fused Triton activation quantization
for the fp8 ``_fast`` modes on compute capability >= 8.9; ``UnsupportedModeError`` below it),
the fused Triton kernels against their eager references, no write to the caller's input,
strict layout contracts with no copies, and the tiny InfiniteTalk model in every mode in bf16.

``WANSTUDIO_QUANT_TEST_DEVICE=cpu python -m pytest tests/gpu/test_quant_gpu.py -m gpu`` rehearses
the file on the CPU (the Triton and capability tests skip).
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from torch import nn

import wanstudio as ws
from wanstudio.errors import UnsupportedModeError
from wanstudio.layout import COPY_COUNTS, is_aligned, listen, strict_layout
from wanstudio.options import QuantMode
from wanstudio.quant import QuantizedLinear, fp4, fp8, kernels, quant_report, quantize, sqnr_db
from wanstudio.quant.spec import FP8_MIN_CAPABILITY

DEVICE = torch.device(os.environ.get("WANSTUDIO_QUANT_TEST_DEVICE", "cuda"))
ON_CUDA = DEVICE.type == "cuda"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

QUANTIZED = [m for m in QuantMode if m is not QuantMode.DISABLED]
FAST_FP8 = [m for m in QUANTIZED if m.is_fp8 and m.is_fast]
E4 = torch.float8_e4m3fn

# The CPU test's bars (K = N = 256); bf16 activations and outputs cost < 0.1 dB.
BARS = {
    QuantMode.FP8_E4M3FN: 28.0,
    QuantMode.FP8_E4M3FN_FAST: 26.0,
    QuantMode.FP8_E4M3FN_SCALED: 30.0,
    QuantMode.FP8_E4M3FN_SCALED_FAST: 27.0,
    QuantMode.FP8_E5M2: 24.0,
    QuantMode.FP8_E5M2_FAST: 23.0,
    QuantMode.FP8_E5M2_SCALED: 24.0,
    QuantMode.FP8_E5M2_SCALED_FAST: 23.0,
    QuantMode.FP4_EXPERIMENTAL: 17.0,
    QuantMode.FP4_SCALED: 19.0,
    QuantMode.FP4_SCALED_FAST: 19.0,
    QuantMode.GGUF_Q8_0: 44.0,
}
# (M, K, N): the CPU test's layer, and a Wan-14B self-attention projection at 4096 tokens.
SHAPES = {"256x256": (512, 256, 256), "5120x5120": (4096, 5120, 5120)}
if not ON_CUDA:  # CPU rehearsal: keep the fp64 references cheap
    SHAPES = {"256x256": (512, 256, 256), "1024x512": (256, 1024, 512)}
BIG = list(SHAPES)[-1]


def _capability() -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(DEVICE)) if ON_CUDA else (0, 0)


def _fast_supported() -> bool:
    return not ON_CUDA or _capability() >= FP8_MIN_CAPABILITY


@pytest.fixture(scope="module", autouse=True)
def banner():
    if ON_CUDA:
        cap = _capability()
        print(
            f"\n{torch.cuda.get_device_name(DEVICE)} (sm_{cap[0]}{cap[1]}), torch {torch.__version__}, "
            f"triton {'yes' if kernels.HAS_TRITON else 'no'}"
        )
    yield


@pytest.fixture(scope="module")
def layers():
    """Per shape: (fp32 Linear on DEVICE, bf16 activations, fp64 reference, bf16 reference)."""
    out = {}
    for name, (m, k, n) in SHAPES.items():
        g = torch.Generator(device=DEVICE).manual_seed(0)
        w = torch.randn(n, k, device=DEVICE, generator=g) * 0.02
        x = torch.randn(m, k, device=DEVICE, generator=g).to(torch.bfloat16)
        lin = nn.Linear(k, n, bias=False, device=DEVICE)
        with torch.no_grad():
            lin.weight.copy_(w)
        ref64 = x.double() @ w.double().t()
        ref_bf16 = nn.functional.linear(x, w.to(torch.bfloat16))
        out[name] = (lin, x, ref64, ref_bf16)
    return out


def _quantized(lin: nn.Linear, mode: QuantMode) -> QuantizedLinear:
    if mode in FAST_FP8 and not _fast_supported():
        with pytest.raises(UnsupportedModeError):
            QuantizedLinear.from_linear(lin, mode).path_for(DEVICE, torch.bfloat16)
        pytest.skip(f"{mode.value} needs compute capability >= 8.9 (raised as it should)")
    return QuantizedLinear.from_linear(lin, mode)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mode", QUANTIZED, ids=str)
def test_mode_meets_its_sqnr_bar(layers, mode, shape):
    lin, x, ref64, ref_bf16 = layers[shape]
    layer = _quantized(lin, mode)
    before = x.clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = layer(x)
    if ON_CUDA:
        torch.cuda.synchronize(DEVICE)
    assert torch.equal(x, before), f"{mode.value} wrote to its input"
    assert out.dtype == torch.bfloat16 and out.shape == ref64.shape
    vs64, vs_bf16 = sqnr_db(ref64, out), sqnr_db(ref_bf16, out)
    print(
        f"  {mode.value:24s} {shape:10s} SQNR vs fp64 {vs64:5.1f} dB, vs bf16 {vs_bf16:5.1f} dB, "
        f"path {layer.path}: {layer.path_detail}" + "".join(f" [warning: {w.message}]" for w in caught)
    )
    assert vs64 >= BARS[mode] - 0.5


@pytest.mark.parametrize("mode", FAST_FP8, ids=str)
def test_fast_modes_run_scaled_mm(layers, mode):
    lin = layers[BIG][0]
    layer = _quantized(lin, mode)
    path, detail = layer.path_for(DEVICE, torch.bfloat16)
    if ON_CUDA and kernels.HAS_TRITON:
        assert "fused Triton" in detail, detail
    if mode.value.startswith("fp8_e5m2") and path != "scaled_mm":
        # cuBLAS takes e4m3 x e5m2 tensor-wise; if this torch refuses it row-wise, say so
        assert "_scaled_mm rejects" in detail, detail
        pytest.xfail(f"{mode.value}: {detail}")
    assert path == "scaled_mm", detail


def test_fast_mode_on_an_older_gpu_is_refused():
    if not ON_CUDA or _fast_supported():
        pytest.skip("this GPU has fp8 tensor cores (the CPU suite simulates an old one)")
    lin = nn.Linear(256, 256, device=DEVICE)
    with pytest.raises(UnsupportedModeError, match=torch.cuda.get_device_name(DEVICE)):
        quantize(nn.Sequential(lin), QuantMode.FP8_E4M3FN_FAST, only_under="")


# Every finite e4m3 value in increasing order (-0 and +0 merged): neighbours are one code step.
_E4M3 = torch.arange(256, dtype=torch.uint8).view(E4).float()
E4M3_VALUES = torch.unique(_E4M3[torch.isfinite(_E4M3)])
# How close to a rounding midpoint x / s must be for the fused and eager codes to differ.
# The kernel's scale is fl(amax / 448) (IEEE division); eager torch on CUDA divides a tensor by
# the Python scalar 448 as amax * fl(1 / 448), so its scale may differ in the last bit: the two
# scales differ by a relative <= 3u (u = 2^-24, the fp32 unit roundoff), so do the exact
# quotients x / s, and each fp32 quotient adds <= u. Both casts round to nearest even, so codes
# can differ only if an e4m3 midpoint m lies between the two fp32 quotients, which puts the
# exact x / s (either scale) within 4u = 2^-22 (2 fp32 ulps) of m, relatively; the last factor
# covers second-order terms.
TIE_RTOL = 4 * 2.0**-24 * (1 + 2.0**-20)


def fused_vs_eager_mismatches(x, q, s, q_ref, s_ref):
    """Where the fused codes ``q`` and the eager ``q_ref`` differ (bitwise): (mask, e4m3 code
    steps between them, largest relative distance of the exact x / s from the midpoint of the
    two values, over s = either path's scale), the last two per differing code."""
    bad = q.view(torch.uint8) != q_ref.view(torch.uint8)
    values = E4M3_VALUES.to(q.device)
    a, b = q.float()[bad], q_ref.float()[bad]
    steps = (torch.searchsorted(values, a) - torch.searchsorted(values, b)).abs()
    mid = (a.double() + b.double()) / 2
    rows = bad.nonzero()[:, 0]
    xs = x.double()[bad]  # exact: float64 holds every bf16 / fp16 / fp32 value
    dist = torch.stack([(xs / sc.double()[rows, 0] - mid).abs() / mid.abs() for sc in (s, s_ref)]).amax(dim=0)
    return bad, steps, dist


@pytest.mark.parametrize("k", [256, 5120, 13824, 200])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_fused_activation_quantization_matches_eager(k, dtype):
    if not (ON_CUDA and kernels.HAS_TRITON):
        pytest.skip("needs Triton on CUDA")
    if not _fast_supported():
        pytest.skip("fp8 conversion needs compute capability >= 8.9")
    g = torch.Generator(device=DEVICE).manual_seed(1)
    x = (torch.randn(333, k, device=DEVICE, generator=g) * 3).to(dtype)
    x[7] = 0  # an all-zero row: scale floor, zeros out
    before = x.clone()
    q, s = kernels.quantize_rows_triton(x)
    q_ref, s_ref = fp8.quantize_rows_eager(x)
    assert torch.equal(x, before)
    assert q.shape == (333, k) and q.dtype == E4 and s.shape == (333, 1) and s.dtype == torch.float32
    assert torch.allclose(s, s_ref, rtol=1e-6, atol=0)
    # every code bit-identical, except one-step differences at rounding ties (TIE_RTOL)
    bad, steps, dist = fused_vs_eager_mismatches(x, q, s, q_ref, s_ref)
    n = int(bad.sum())
    assert torch.all(steps == 1), f"{n} codes differ, up to {int(steps.max())} e4m3 steps"
    far = int((dist > TIE_RTOL).sum())
    assert far == 0, f"{far} of {n} differing codes are not at a tie (max {dist.max().item():.2e})"
    assert torch.all(q[7].float() == 0)


@pytest.mark.parametrize("shape", [(48, 200), (5120, 5120), (13824, 5120), (5120, 13824)])
@pytest.mark.parametrize("nvfp4", [True, False], ids=["nvfp4", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_fused_fp4_dequantization_is_bit_exact(shape, nvfp4, dtype):
    if not (ON_CUDA and kernels.HAS_TRITON):
        pytest.skip("needs Triton on CUDA")
    n, k = shape
    w = torch.randn(n, k, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(2)) * 0.02
    if nvfp4:
        packed, scale, ts = fp4.quantize_nvfp4(w)
        ref = fp4.dequantize_nvfp4(packed, scale, ts, k, dtype)
    else:
        packed, scale = fp4.quantize_mxfp4(w)
        ts = None
        ref = fp4.dequantize_mxfp4(packed, scale, k, dtype)
    out = kernels.dequantize_fp4_triton(packed, scale, ts, k, dtype)
    torch.cuda.synchronize(DEVICE)
    assert out.shape == (n, k) and out.dtype == dtype
    assert torch.equal(out, ref)


@pytest.mark.parametrize("mode", QUANTIZED, ids=str)
def test_strict_layout_and_no_copies(layers, mode):
    lin, x, _, _ = layers["256x256"]
    layer = _quantized(lin, mode)
    layer._layout_name = "test.layer"
    for t in layer.state_dict().values():
        assert t.is_contiguous() and is_aligned(t)
    events = []
    copies = sum(COPY_COUNTS.values())
    with strict_layout(), listen(events.append):
        layer(x[:100])  # an M that is not a multiple of 16
        layer(x[:100].view(4, 25, 256))
    assert events and not any(e.copied for e in events)
    assert sum(COPY_COUNTS.values()) == copies


def test_layer_quantized_on_cpu_then_moved_keeps_dtypes_and_alignment():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 256)).to(torch.bfloat16)
    quantize(model, QuantMode.FP4_SCALED_FAST, only_under="")
    model.to(DEVICE)
    layer = model[0]
    assert layer.weight_packed.device.type == DEVICE.type
    assert layer.weight_scale.dtype == E4 and layer.weight_scale_2.dtype == torch.float32
    assert all(is_aligned(t) for t in layer.state_dict().values())
    out = model(torch.randn(64, 512, device=DEVICE, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    print(f"  fp4_scaled_fast on {DEVICE}: {layer.path}: {layer.path_detail}")


def test_native_fp4_on_blackwell():
    if not ON_CUDA or _capability() < (10, 0):
        pytest.skip("native FP4 needs a Blackwell GPU (compute capability >= 10.0)")
    g = torch.Generator(device=DEVICE).manual_seed(3)
    w = torch.randn(1024, 2048, device=DEVICE, generator=g) * 0.02
    x = torch.randn(512, 2048, device=DEVICE, generator=g).to(torch.bfloat16)
    lin = nn.Linear(2048, 1024, bias=False, device=DEVICE)
    with torch.no_grad():
        lin.weight.copy_(w)
    layer = QuantizedLinear.from_linear(lin, QuantMode.FP4_SCALED_FAST)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = layer(x)
    db = sqnr_db(x.double() @ w.double().t(), out)
    print(
        f"  fp4_scaled_fast native: path {layer.path} ({layer.path_detail}), SQNR {db:.1f} dB"
        + "".join(f" [warning: {c.message}]" for c in caught)
    )
    assert layer.path == "fp4_native", layer.path_detail
    assert db >= 15.0  # weights and activations both NVFP4


def _tiny_inputs(cfg: ws.WanConfig, frames: int = 3, size: int = 8) -> dict:
    g = torch.Generator().manual_seed(0)
    f_video = cfg.vae_scale * (frames - 1) + 1
    inputs = dict(
        x=torch.randn(1, cfg.out_dim, frames, size, size, generator=g),
        t=torch.tensor([700.0]),
        context=torch.randn(1, 7, cfg.text_dim, generator=g),
        y=torch.randn(1, cfg.cond_dim, frames, size, size, generator=g),
        clip_fea=torch.randn(1, 257, cfg.clip_dim, generator=g),
        audio=torch.randn(1, 1, f_video, cfg.audio_window, cfg.audio_layers, cfg.audio_dim, generator=g),
    )
    return {k: v.to(DEVICE) for k, v in inputs.items()}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = ws.WanConfig.preset("tiny-infinitetalk")
    model = ws.WanModel(cfg, device=DEVICE, dtype=torch.bfloat16).eval()
    inputs = _tiny_inputs(cfg)
    with torch.no_grad():
        reference = model(**inputs)
    return model, inputs, reference


@pytest.mark.parametrize("mode", list(QuantMode), ids=str)
def test_tiny_infinitetalk_in_every_mode(tiny, mode):
    base, inputs, reference = tiny
    if mode in FAST_FP8 and not _fast_supported():
        with pytest.raises(UnsupportedModeError):
            quantize(copy.deepcopy(base), mode)
        pytest.skip(f"{mode.value} needs compute capability >= 8.9 (raised as it should)")
    model = quantize(copy.deepcopy(base), mode)
    with torch.no_grad():
        out = model(**inputs)
    db = sqnr_db(reference, out)
    paths = {m.path for m in model.modules() if isinstance(m, QuantizedLinear)}
    print(f"  tiny-infinitetalk bf16 {mode.value:24s} SQNR vs bf16 model {db:5.1f} dB, paths {sorted(paths)}")
    assert torch.isfinite(out).all()
    assert db >= (14.0 if mode.is_fp4 else 20.0)


def test_quant_report_on_cuda(tiny):
    base, inputs, _ = tiny
    mode = QuantMode.FP8_E4M3FN_SCALED_FAST if _fast_supported() else QuantMode.FP8_E4M3FN_SCALED
    report = quant_report(copy.deepcopy(base), mode, inputs)
    print("\n" + report.to_text(limit=6))
    assert len(report.layers) == 30
    assert report.model_sqnr_db > 20.0
    if mode.is_fast:
        assert report.paths() == {"scaled_mm": 30}


def _sqnr_vs(exact: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> float:
    return sqnr_db(exact, (q.double() * s.double()).float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("tokens", [4096, 32760])
def test_fused_modulation_quantization_matches_the_unfused_path(dtype, tokens):
    """LayerNorm + modulation + per-token e4m3 in one kernel, against torch's LayerNorm and
    modulation, rounded to x's dtype, then the fused quantize_rows (the unfused path), at Wan
    14B's width from a strided x. The two LayerNorms sum in different orders (torch: Welford),
    so a modulated value on a rounding boundary of x's dtype may land on the other side:
    a code one e4m3 step away, or (if it is a row's largest) a scale one step of x's dtype away.
    Every value is within those steps; the error against the exact fp64 modulation is the same."""
    if not (ON_CUDA and kernels.HAS_TRITON) or not _fast_supported():
        pytest.skip("needs Triton on CUDA and compute capability >= 8.9")
    from wanstudio.model.layers import FP32LayerNorm

    g = torch.Generator(device=DEVICE).manual_seed(3)
    d = 5120
    big = torch.randn(1, 2 * tokens, d, device=DEVICE, generator=g) * 4
    x = (big + torch.randn(d, device=DEVICE, generator=g) * 8).to(dtype)[:, ::2]  # (1, L, D) strided
    mods = torch.randn(1, 6, 1, d, device=DEVICE, generator=g) * 0.5
    shift, scale = mods[:, 0], mods[:, 1]
    before = x.clone()
    q, s = kernels.modulate_quantize_rows_triton(x, shift, scale, 1e-6)
    assert torch.equal(x, before)
    norm = FP32LayerNorm(d, 1e-6, elementwise_affine=False)
    modulated = norm.modulate(x, shift, scale)
    q_ref, s_ref = kernels.quantize_rows_triton(modulated.view(-1, d))
    q_ref, s_ref = q_ref.view(q.shape), s_ref.view(s.shape)
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    assert ((s / s_ref - 1).abs() <= ulp).all()
    assert (s == s_ref).float().mean() > 0.99
    same = (q.view(torch.uint8) == q_ref.view(torch.uint8)).float().mean().item()
    assert same > 0.999, f"{1 - same:.2%} of codes differ"
    deq, deq_ref = q.float() * s, q_ref.float() * s_ref
    step = deq_ref.abs() / 8 + s_ref * 2.0**-9 + deq_ref.abs() * (s / s_ref - 1).abs()
    assert ((deq - deq_ref).abs() <= step * (1 + 1e-6)).all()
    xd = x.double()
    exact = ((xd - xd.mean(-1, keepdim=True)) / (xd.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()) * (
        1 + scale.double()
    ) + shift.double()
    fused_db, unfused_db = _sqnr_vs(exact.float(), q, s), _sqnr_vs(exact.float(), q_ref, s_ref)
    print(f"  fused {fused_db:.3f} dB, unfused {unfused_db:.3f} dB vs fp64 ({tokens} tokens, {dtype})")
    assert abs(fused_db - unfused_db) < 0.01


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_fused_modulation_in_the_model(compiled):
    """In an fp8 `_fast` model on CUDA, self-attention's q / k / v and the FFN read the fused
    kernel's rows (two launches per block, eager or compiled), and the output is the unfused
    path's: the same up to the rare one-step codes above (SQNR between them > 40 dB)."""
    if not (ON_CUDA and kernels.HAS_TRITON) or not _fast_supported():
        pytest.skip("needs Triton on CUDA and compute capability >= 8.9")
    import wanstudio.model.blocks as blocks
    from wanstudio.fusion import compile_blocks

    torch.manual_seed(0)
    cfg = ws.WanConfig.preset("tiny-infinitetalk").replace(dim=512, num_heads=4, ffn_dim=1024)
    model = quantize(ws.WanModel(cfg, device=DEVICE, dtype=torch.bfloat16).eval(), "fp8_e4m3fn_scaled_fast")
    inputs = _tiny_inputs(cfg)
    if compiled:
        compile_blocks(model)
    calls, real = [], kernels.modulate_quantize_rows_triton
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            kernels, "modulate_quantize_rows_triton", lambda *a, **k: calls.append(a[-1]) or real(*a, **k)
        )
        with torch.no_grad():
            fused = model(**inputs)
        assert calls == [
            f"blocks.{i}.{p}" for i in range(cfg.num_layers) for p in ("self_attn.q+k+v", "ffn.0")
        ]
        torch._dynamo.reset()
        mp.setattr(blocks, "modulated_rows", lambda norm, x, sh, sc, layers: norm.modulate(x, sh, sc))
        with torch.no_grad():
            unfused = model(**inputs)
    torch._dynamo.reset()
    assert len(calls) == 2 * cfg.num_layers  # none in the unfused run
    db = sqnr_db(unfused.float(), fused.float())
    print(f"  fused vs unfused model output: {db:.1f} dB ({'compiled' if compiled else 'eager'})")
    assert db > 40.0
