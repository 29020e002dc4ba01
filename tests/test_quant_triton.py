"""The fused Triton kernels of wanstudio.quant, checked without a GPU.

Skipped unless Triton is importable (CUDA installs of torch ship it; the CPU CI does not):

* compile each kernel for sm_90 (Triton's own ptxas; no GPU needed) and check the PTX uses
  the IEEE division and the saturating round-to-nearest fp8 conversion the eager path matches;
* with ``TRITON_INTERPRET=1`` set before the run, execute the kernels on CPU tensors. The
  interpreter emulates narrow float conversions only roughly, so only what it does exactly
  is compared: fp32 outputs of the fp4 dequantization and the activation scales.

The GPU suite (``tests/gpu/test_quant_gpu.py``) compares every output bit on real hardware.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from wanstudio.quant import fp4, fp8, kernels, q8_0

pytestmark = pytest.mark.skipif(not kernels.HAS_TRITON, reason="Triton is not installed")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _compile(fn, signature: dict, constexprs: dict, warps: int) -> str:
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:  # the AOT API moves between Triton versions
        pytest.skip(f"this Triton has no AOT API: {exc}")
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]


@pytest.mark.skipif(INTERPRET, reason="compiles real kernels")
@pytest.mark.parametrize("x_dtype", ["bf16", "fp16", "fp32"])
def test_activation_quantization_kernel_compiles_for_sm90(x_dtype):
    ptx = _compile(
        kernels._quantize_rows_kernel,
        {
            "x_ptr": f"*{x_dtype}",
            "q_ptr": "*fp8e4nv",
            "s_ptr": "*fp32",
            "K": "i32",
            "stride_x": "i32",
            "stride_q": "i32",
            "FP8_MAX": "constexpr",
            "TINY": "constexpr",
            "CHUNK": "constexpr",
            "EXACT": "constexpr",
        },
        {"FP8_MAX": 448.0, "TINY": fp8._TINY, "CHUNK": 1024, "EXACT": False},
        4,
    )
    ops = set(re.findall(r"\b(div\.[a-z0-9.]+|cvt\.rn\.satfinite\.e4m3x2\.f32)", ptx))
    assert ops == {"div.rn.f32", "cvt.rn.satfinite.e4m3x2.f32"}


@pytest.mark.skipif(INTERPRET, reason="compiles real kernels")
@pytest.mark.parametrize("out_dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("nvfp4", [True, False], ids=["nvfp4", "mxfp4"])
def test_fp4_dequantization_kernel_compiles_for_sm90(out_dtype, nvfp4):
    _compile(
        kernels._dequantize_fp4_kernel,
        {
            "p_ptr": "*u8",
            "s_ptr": "*u8",
            "g_ptr": "*fp32" if nvfp4 else "*u8",
            "out_ptr": f"*{out_dtype}",
            "N": "i32",
            "KP": "i32",
            "K": "i32",
            "stride_p": "i32",
            "stride_s": "i32",
            "stride_o": "i32",
            "BLOCK": "constexpr",
            "NVFP4": "constexpr",
            "BLOCK_R": "constexpr",
            "BLOCK_C": "constexpr",
        },
        {"BLOCK": 16 if nvfp4 else 32, "NVFP4": nvfp4, "BLOCK_R": 16, "BLOCK_C": 128},
        4,
    )


@pytest.mark.skipif(not INTERPRET, reason="set TRITON_INTERPRET=1 to run kernels on the CPU")
@pytest.mark.parametrize("k", [200, 256])
@pytest.mark.parametrize("nvfp4", [True, False], ids=["nvfp4", "mxfp4"])
def test_fp4_dequantization_kernel_interpreted(k, nvfp4):
    w = torch.randn(40, k, generator=torch.Generator().manual_seed(0)) * 0.02
    w[3, :40] = 0  # all-zero blocks
    if nvfp4:
        packed, scale, ts = fp4.quantize_nvfp4(w)
        ref = fp4.dequantize_nvfp4(packed, scale, ts, k)
    else:
        packed, scale = fp4.quantize_mxfp4(w)
        ts, ref = None, fp4.dequantize_mxfp4(packed, scale, k)
    assert torch.equal(kernels.dequantize_fp4_triton(packed, scale, ts, k, torch.float32), ref)


@pytest.mark.skipif(not INTERPRET, reason="set TRITON_INTERPRET=1 to run kernels on the CPU")
@pytest.mark.parametrize("chunk", [32, 1024])  # four chunks (the last partly past K), or one
def test_activation_quantization_interpreted(chunk):
    """Codes and scales bit for bit the eager reference's (the kernel rounds on the e4m3 grid
    first under the interpreter, whose own fp8 conversion is wrong on carries)."""
    x = torch.randn(9, 100, generator=torch.Generator().manual_seed(0)) * 3
    x[4] = 0
    before = x.clone()
    q, s = kernels.quantize_rows_triton(x, chunk=chunk)
    q_ref, s_ref = fp8.quantize_rows_eager(x)
    assert torch.equal(x, before)
    assert q.dtype == fp8.ACT_DTYPE and q.shape == x.shape and s.shape == (9, 1)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.skipif(INTERPRET, reason="compiles real kernels")
@pytest.mark.parametrize("out_dtype", ["bf16", "fp16", "fp32"])
def test_q8_0_dequantization_kernel_compiles_for_sm90(out_dtype):
    ptx = _compile(
        kernels._dequantize_q8_0_kernel,
        {
            "q_ptr": "*i8",
            "d_ptr": "*fp16",
            "out_ptr": f"*{out_dtype}",
            "N": "i32",
            "K": "i32",
            "stride_q": "i32",
            "stride_d": "i32",
            "stride_o": "i32",
            "QBLOCK": "constexpr",
            "BLOCK_R": "constexpr",
            "BLOCK_C": "constexpr",
        },
        {"QBLOCK": 32, "BLOCK_R": 16, "BLOCK_C": 256},
        4,
    )
    # q * d is exact in fp32 and rounds once, to nearest even: through cvt.rn, or (fp16 out,
    # q and d both exact in fp16) one fp16 multiply, which rounds the same exact product once
    rounding = {"bf16": r"cvt\.rn\.bf16(x2)?\.f32", "fp16": r"cvt\.rn\.f16(x2)?\.f32|mul(\.rn)?\.f16"}
    if out_dtype in rounding:
        assert re.search(rounding[out_dtype], ptx)
    assert not re.search(r"\.(approx|ftz)\b.*f16|mul\.rz|cvt\.rz", ptx)


@pytest.mark.skipif(not INTERPRET, reason="set TRITON_INTERPRET=1 to run kernels on the CPU")
@pytest.mark.parametrize("k", [100, 256])
def test_q8_0_dequantization_kernel_interpreted(k):
    w = torch.randn(40, k, generator=torch.Generator().manual_seed(0)) * 0.02
    w[3, :64] = 0  # all-zero blocks
    q, d = q8_0.quantize_q8_0(w)
    ref = q8_0.dequantize_q8_0(q, d, k)
    assert torch.equal(kernels.dequantize_q8_0_triton(q, d, k, torch.float32), ref)


def _modulation_inputs(b=2, length=37, d=96, dtype=torch.bfloat16, seed=0):
    """x [B, L, D] as a strided view (every other token of a larger tensor, as a slice of the
    stream would be), shift and scale [B, 1, D] fp32 views of one [B, 6, 1, D] tensor, as the
    block unbinds them; the activations carry a per-channel offset, as Wan's stream does."""
    g = torch.Generator().manual_seed(seed)
    big = (torch.randn(b, 2 * length, d, generator=g) * 3 + torch.randn(d, generator=g) * 5).to(dtype)
    mods = torch.randn(b, 6, 1, d, generator=g) * 0.5
    return big[:, ::2], mods[:, 0], mods[:, 1]


def _modulated_reference(x, shift, scale, eps=1e-6):
    from wanstudio.model.layers import FP32LayerNorm

    norm = FP32LayerNorm(x.shape[-1], eps, elementwise_affine=False)
    q, s = fp8.quantize_rows_eager(norm.modulate(x, shift, scale).reshape(-1, x.shape[-1]))
    return q.view(x.shape), s.view(*x.shape[:-1], 1)


@pytest.mark.skipif(not INTERPRET, reason="set TRITON_INTERPRET=1 to run kernels on the CPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("chunk", [64, 1024])  # two chunks (the second partly past D), or one
def test_modulate_quantize_kernel_interpreted(dtype, chunk):
    """The fused LayerNorm + modulation + per-token e4m3 quantization gives the codes and scales
    of the unfused path (modulate, round to x's dtype, quantize) from a strided x, which it
    leaves as it was. LayerNorm's fp32 sums run in another order: a code may move one step
    where the modulated value lies on a rounding boundary, nowhere else."""
    x, shift, scale = _modulation_inputs(dtype=dtype)
    before = x.clone()
    q, s = kernels.modulate_quantize_rows_triton(x, shift, scale, 1e-6, chunk=chunk)
    ref_q, ref_s = _modulated_reference(x, shift, scale)
    assert torch.equal(x, before)
    assert q.shape == x.shape and q.dtype == fp8.ACT_DTYPE and s.shape == (2, 37, 1)
    torch.testing.assert_close(s, ref_s, rtol=2e-6, atol=0)
    same = q.view(torch.uint8) == ref_q.view(torch.uint8)
    assert same.float().mean() > 0.999
    step = ref_q.float().abs().clamp_min(2**-6) / 8  # one e4m3 step at that magnitude
    assert ((q.float() - ref_q.float()).abs() <= step).all()


@pytest.mark.skipif(not INTERPRET, reason="set TRITON_INTERPRET=1 to run kernels on the CPU")
def test_modulate_quantize_kernel_refuses_mismatched_modulation():
    x, shift, scale = _modulation_inputs()
    with pytest.raises(ValueError, match=r"shift and scale must be \[2, 1, 96\]"):
        kernels.modulate_quantize_rows_triton(x, shift[:1], scale, 1e-6)


@pytest.mark.skipif(INTERPRET, reason="compiles real kernels")
def test_modulate_quantize_kernel_compiles_for_sm90():
    ptx = _compile(
        kernels._modulate_quantize_kernel,
        {
            **{name: "*fp32" for name in ("shift_ptr", "scale_ptr", "s_ptr")},
            "x_ptr": "*bf16",
            "q_ptr": "*fp8e4nv",
            **{name: "i32" for name in ("L", "D", "stride_xb", "stride_xl", "stride_shift", "stride_scale")},
            "eps": "fp32",
            **{name: "constexpr" for name in ("FP8_MAX", "TINY", "ROUND_TO", "CHUNK", "EXACT")},
        },
        {"FP8_MAX": 448.0, "TINY": fp8._TINY, "ROUND_TO": 1, "CHUNK": 1024, "EXACT": False},
        4,
    )
    float_ops = r"\b(div\.[a-z.]*f32|sqrt\.[a-z.]*f32|cvt\.rn\.satfinite\.e4m3x2\.f32|cvt\.rn\.bf16)"
    ops = set(re.findall(float_ops, ptx))
    # IEEE division and square root (no approximations), bf16 and e4m3 rounded to nearest even
    assert ops == {"div.rn.f32", "sqrt.rn.f32", "cvt.rn.satfinite.e4m3x2.f32", "cvt.rn.bf16"}, ops
