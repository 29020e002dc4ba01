"""Fused Triton kernels of the quantized Linear, with their layout contracts.

* :func:`quantize_rows` — per-token e4m3 quantization of the activations of the fp8 ``_fast``
  modes in ONE pass (load a row, amax, divide, cast, store q and its scale). Done eagerly
  (abs, amax, divide, cast: four passes) it costs as much as the fp8 GEMM itself and the fast
  path stops beating bf16 (docs/MODES.md: 1.21 ms eager vs 0.22 ms fused at 32,760 x 5120).
* :func:`dequantize_fp4` — NVFP4 / MXFP4 weight -> compute dtype in one pass (unpack nibbles,
  decode e2m1, decode the e4m3 / e8m0 block scale, multiply, store): 0.086 ms for a
  5120 x 5120 weight vs 0.42 ms eagerly.
* :func:`dequantize_q8_0` — GGUF Q8_0 weight (int8 codes, fp16 scale per 32) -> compute dtype in
  one pass: ``q * d`` in fp32 (exact), one rounding to the output dtype.

All run on CUDA tensors when Triton is importable and fall back to the eager reference in
``fp8.py`` / ``fp4.py`` elsewhere (the CPU). The fused and eager versions round identically
(IEEE division, round-to-nearest-even casts): the GPU suite checks every bit of the fp4
dequantization. One exception: eager torch on CUDA computes the scale ``amax / 448`` as
``amax * fl(1 / 448)`` (its path for a Python-scalar divisor), which may differ from the
kernel's division in the last bit; an e4m3 code then differs by one step where x / scale lies
within 2 fp32 ulps of a rounding midpoint (the GPU suite checks exactly that;
``benchmarks/diag_fused_quant.py`` shows it).
Scales are decoded from their bits inside the kernel, so no fp8 dtype support is needed for
them. ``TRITON_INTERPRET=1`` runs these kernels on CPU tensors (``*_triton`` functions).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ..layout import LayoutContract, Operand, StrideRule
from . import fp4, fp8, q8_0

try:  # Triton ships with CUDA builds of torch; CPU builds usually lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

HAS_TRITON = triton is not None

QUANT_ROWS_CONTRACT = LayoutContract(
    "triton:quantize_rows_e4m3",
    (
        Operand(
            "x",
            dtypes=(torch.bfloat16, torch.float16, torch.float32),
            ndim=2,
            stride=StrideRule.LAST_DIM_CONTIGUOUS,
        ),
    ),
)
DEQUANT_FP4_CONTRACT = LayoutContract(
    "triton:dequantize_fp4",
    (
        Operand("packed", dtypes=(torch.uint8,), ndim=2, stride=StrideRule.CONTIGUOUS),
        Operand("scale", ndim=2, stride=StrideRule.CONTIGUOUS),
        Operand("tensor_scale", dtypes=(torch.float32,), optional=True),
    ),
)


DEQUANT_Q8_0_CONTRACT = LayoutContract(
    "triton:dequantize_q8_0",
    (
        Operand("q", dtypes=(torch.int8,), ndim=2, stride=StrideRule.CONTIGUOUS),
        Operand("d", dtypes=(torch.float16,), ndim=2, stride=StrideRule.CONTIGUOUS),
    ),
)


def use_triton(t: torch.Tensor) -> bool:
    """Whether the fused kernels serve tensors on this device."""
    return HAS_TRITON and t.is_cuda


# --- per-token e4m3 activation quantization ---------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _quantize_rows_kernel(
        x_ptr,
        q_ptr,
        s_ptr,
        K,
        stride_x,
        stride_q,
        FP8_MAX: tl.constexpr,
        TINY: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # int64: M * K can exceed 2^31
        offs = tl.arange(0, BLOCK_K)
        mask = offs < K
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=0)
        # IEEE division (`/` and fdiv lower to approximate div.full in some Tritons): eager CPU bits
        scale = tl.maximum(tl.div_rn(amax, FP8_MAX), TINY)
        q = tl.div_rn(x, scale)
        q = tl.minimum(tl.maximum(q, -FP8_MAX), FP8_MAX)
        q = q.to(q_ptr.dtype.element_ty, fp_downcast_rounding="rtne")  # cvt.rn.satfinite
        tl.store(q_ptr + row * stride_q + offs, q, mask=mask)
        tl.store(s_ptr + row, scale)

    @triton.jit
    def _pow2(e):
        """2^e for int32 e in [-126, 127], exact (built from the float32 bits)."""
        return ((e + 127) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _e2m1_value(code):
        e = (code >> 1) & 3
        m = (code & 1).to(tl.float32)
        mag = tl.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * _pow2(e - 1))
        return tl.where((code & 8) != 0, -mag, mag)

    @triton.jit
    def _dequantize_fp4_kernel(
        p_ptr,
        s_ptr,
        g_ptr,
        out_ptr,
        N,
        KP,
        K,
        stride_p,
        stride_s,
        stride_o,
        BLOCK: tl.constexpr,
        NVFP4: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # packed byte columns
        mask = (rows < N)[:, None] & (cols < KP)[None, :]
        r64 = rows.to(tl.int64)[:, None]
        b = tl.load(p_ptr + r64 * stride_p + cols[None, :], mask=mask, other=0).to(tl.int32)
        sb = tl.load(s_ptr + r64 * stride_s + ((2 * cols) // BLOCK)[None, :], mask=mask, other=0)
        sb = sb.to(tl.int32)
        if NVFP4:  # e4m3 bits: (8 + m) * 2^(e - 10), subnormal m * 2^-9
            se = (sb >> 3) & 15
            sm = sb & 7
            scale = tl.where(
                se == 0, sm.to(tl.float32) * 0.001953125, (8 + sm).to(tl.float32) * _pow2(se - 10)
            )
        else:  # e8m0 bits: 2^(b - 127); b == 0 is 2^-127, a float32 subnormal
            bits = (sb << 23) | tl.where(sb == 0, 1 << 22, 0)
            scale = bits.to(tl.float32, bitcast=True)
        lo = _e2m1_value(b & 15) * scale
        hi = _e2m1_value((b >> 4) & 15) * scale
        if NVFP4:
            g = tl.load(g_ptr)
            lo = lo * g
            hi = hi * g
        out = out_ptr + r64 * stride_o + (2 * cols)[None, :]
        lo = lo.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        hi = hi.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        # element 2j from the low nibble, 2j + 1 from the high one; L2 merges the two halves
        tl.store(out, lo, mask=mask & (2 * cols < K)[None, :])
        tl.store(out + 1, hi, mask=mask & (2 * cols + 1 < K)[None, :])


def quantize_rows_triton(
    x2d: torch.Tensor, where: str = "quantize_rows"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused per-token quantization: x [M, K] -> (q e4m3 [M, K] row-major, scale fp32 [M, 1])."""
    x2d = QUANT_ROWS_CONTRACT.enforce(where, x=x2d)["x"]
    m, k = x2d.shape
    q = torch.empty(m, k, dtype=fp8.ACT_DTYPE, device=x2d.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x2d.device)
    if m == 0:
        return q, scale
    block = triton.next_power_of_2(k)
    warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    with torch.cuda.device(x2d.device) if x2d.is_cuda else nullcontext():
        _quantize_rows_kernel[(m,)](
            x2d,
            q,
            scale,
            k,
            x2d.stride(0),
            q.stride(0),
            FP8_MAX=fp8.fp8_max(fp8.ACT_DTYPE),
            TINY=fp8._TINY,
            BLOCK_K=block,
            num_warps=warps,
        )
    return q, scale


def quantize_rows(x2d: torch.Tensor, where: str = "quantize_rows") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token e4m3 quantization, fused on CUDA, eager elsewhere. The input is never modified."""
    if use_triton(x2d):
        return quantize_rows_triton(x2d, where)
    return fp8.quantize_rows_eager(x2d)


# --- fp4 weight dequantization ------------------------------------------------------------------------
def dequantize_fp4_triton(
    packed: torch.Tensor,
    scale: torch.Tensor,
    tensor_scale: torch.Tensor | None,
    k: int,
    dtype: torch.dtype,
    where: str = "dequantize_fp4",
) -> torch.Tensor:
    """Fused NVFP4 (``tensor_scale`` given) / MXFP4 (``None``) dequantization -> [N, K] ``dtype``."""
    ops = DEQUANT_FP4_CONTRACT.enforce(where, packed=packed, scale=scale, tensor_scale=tensor_scale)
    packed, scale = ops["packed"], ops["scale"]
    nvfp4 = tensor_scale is not None
    n, kp = packed.shape
    out = torch.empty(n, k, dtype=dtype, device=packed.device)
    if n == 0 or k == 0:
        return out
    scale_bytes = scale.view(torch.uint8)
    g = tensor_scale.reshape(1) if nvfp4 else scale_bytes  # g_ptr is unused for MXFP4
    br, bc = 16, 128
    grid = (triton.cdiv(n, br), triton.cdiv(kp, bc))
    with torch.cuda.device(packed.device) if packed.is_cuda else nullcontext():
        _dequantize_fp4_kernel[grid](
            packed,
            scale_bytes,
            g,
            out,
            n,
            kp,
            k,
            packed.stride(0),
            scale_bytes.stride(0),
            out.stride(0),
            BLOCK=fp4.NVFP4_BLOCK if nvfp4 else fp4.MXFP4_BLOCK,
            NVFP4=nvfp4,
            BLOCK_R=br,
            BLOCK_C=bc,
            num_warps=4,
        )
    return out


def dequantize_fp4(
    packed: torch.Tensor,
    scale: torch.Tensor,
    tensor_scale: torch.Tensor | None,
    k: int,
    dtype: torch.dtype,
    where: str = "dequantize_fp4",
) -> torch.Tensor:
    """NVFP4 / MXFP4 weight -> [N, K] in ``dtype``: fused on CUDA, eager elsewhere."""
    if use_triton(packed):
        return dequantize_fp4_triton(packed, scale, tensor_scale, k, dtype, where)
    ops = DEQUANT_FP4_CONTRACT.enforce(where, packed=packed, scale=scale, tensor_scale=tensor_scale)
    packed, scale = ops["packed"], ops["scale"]
    if tensor_scale is not None:
        return fp4.dequantize_nvfp4(packed, scale, tensor_scale, k, dtype)
    return fp4.dequantize_mxfp4(packed, scale, k, dtype)


# --- GGUF Q8_0 weight dequantization --------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _dequantize_q8_0_kernel(
        q_ptr,
        d_ptr,
        out_ptr,
        N,
        K,
        stride_q,
        stride_d,
        stride_o,
        QBLOCK: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (rows < N)[:, None] & (cols < K)[None, :]
        r64 = rows.to(tl.int64)[:, None]  # int64: N * K can exceed 2^31
        q = tl.load(q_ptr + r64 * stride_q + cols[None, :], mask=mask, other=0).to(tl.float32)
        d = tl.load(d_ptr + r64 * stride_d + (cols // QBLOCK)[None, :], mask=mask, other=0.0)
        w = q * d.to(tl.float32)  # exact: 8 x 11 significant bits
        w = w.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        tl.store(out_ptr + r64 * stride_o + cols[None, :], w, mask=mask)


def dequantize_q8_0_triton(
    q: torch.Tensor, d: torch.Tensor, k: int, dtype: torch.dtype, where: str = "dequantize_q8_0"
) -> torch.Tensor:
    """Fused Q8_0 dequantization: (q int8 [N, K_pad], d fp16 [N, K_pad / 32]) -> [N, K] ``dtype``."""
    ops = DEQUANT_Q8_0_CONTRACT.enforce(where, q=q, d=d)
    q, d = ops["q"], ops["d"]
    n = q.shape[0]
    out = torch.empty(n, k, dtype=dtype, device=q.device)
    if n == 0 or k == 0:
        return out
    br, bc = 16, 256
    grid = (triton.cdiv(n, br), triton.cdiv(k, bc))
    with torch.cuda.device(q.device) if q.is_cuda else nullcontext():
        _dequantize_q8_0_kernel[grid](
            q,
            d,
            out,
            n,
            k,
            q.stride(0),
            d.stride(0),
            out.stride(0),
            QBLOCK=q8_0.BLOCK,
            BLOCK_R=br,
            BLOCK_C=bc,
            num_warps=4,
        )
    return out


def dequantize_q8_0(
    q: torch.Tensor, d: torch.Tensor, k: int, dtype: torch.dtype, where: str = "dequantize_q8_0"
) -> torch.Tensor:
    """Q8_0 weight -> [N, K] in ``dtype``: fused on CUDA, eager elsewhere (same bits)."""
    if use_triton(q):
        return dequantize_q8_0_triton(q, d, k, dtype, where)
    ops = DEQUANT_Q8_0_CONTRACT.enforce(where, q=q, d=d)
    return q8_0.dequantize_q8_0(ops["q"], ops["d"], k, dtype)
