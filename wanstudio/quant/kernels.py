"""Fused Triton kernels of the quantized Linear, with their layout contracts.

* :func:`quantize_rows` — per-token e4m3 quantization of the activations of the fp8 ``_fast``
  modes in ONE pass (load a row, amax, divide, cast, store q and its scale). Done eagerly
  (abs, amax, divide, cast: four passes) it costs as much as the fp8 GEMM itself and the fast
  path stops beating bf16 (docs/MODES.md: 1.21 ms eager vs 0.22 ms fused at 32,760 x 5120).
* :func:`modulate_quantize_rows` — the same quantization of ``LayerNorm(x) * (1 + scale) +
  shift`` (Wan's adaLN input to self-attention and the FFN) straight from x: the modulated
  activations are never written in bf16 and read back.
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

import os
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
MODULATE_ROWS_CONTRACT = LayoutContract(
    "triton:modulate_quantize_rows_e4m3",
    (
        Operand(
            "x",
            dtypes=(torch.bfloat16, torch.float16, torch.float32),
            ndim=3,
            stride=StrideRule.LAST_DIM_CONTIGUOUS,
        ),
        Operand("shift", dtypes=(torch.float32,), ndim=3, stride=StrideRule.LAST_DIM_CONTIGUOUS),
        Operand("scale", dtypes=(torch.float32,), ndim=3, stride=StrideRule.LAST_DIM_CONTIGUOUS),
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


def exact_fp8_rounding() -> bool:
    """Whether kernels must round in fp32 before converting: Triton 3.6's interpreter
    (``TRITON_INTERPRET=1``) rounds fp32 -> fp8 wrongly when rounding carries into the exponent
    (1.98 -> 1.0), and truncates fp32 -> bf16."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# --- per-token e4m3 activation quantization ---------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _to_e4m3(x, EXACT: tl.constexpr):
        """fp32 with |x| <= 448 -> float8e4nv, round to nearest even (EXACT: via the e4m3 grid
        in fp32 first, signed zeros kept, for the interpreter; the hardware rounds the same)."""
        if EXACT:
            a = tl.abs(x)
            exponent = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)  # subnormals: -6
            ulp = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2^(e-3): 3 mantissa bits
            inv_ulp = ((3 - exponent + 127) << 23).to(tl.float32, bitcast=True)
            y = a * inv_ulp  # exact: a power of two; 0 <= y < 16
            y = (y + 12582912.0) - 12582912.0  # 1.5 * 2^23: round half to even
            r = tl.minimum(y * ulp, 448.0)
            sign = x.to(tl.int32, bitcast=True) & -2147483648  # keeps -0.0 and tiny negatives negative
            x = (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
        return x.to(tl.float8e4nv, fp_downcast_rounding="rtne")

    @triton.jit
    def _quantize_rows_kernel(
        x_ptr, q_ptr, s_ptr, K, stride_x, stride_q,
        FP8_MAX: tl.constexpr, TINY: tl.constexpr, CHUNK: tl.constexpr, EXACT: tl.constexpr,
    ):  # fmt: skip
        # One row per program, read in chunks: a whole row held in registers (8192 lanes for
        # K = 5120) leaves room for one or two programs per SM, too few loads in flight to
        # stream the rows; the second read of a row comes from the cache.
        row = tl.program_id(0).to(tl.int64)  # int64: M * K can exceed 2^31
        cols = tl.arange(0, CHUNK)
        big = tl.zeros([CHUNK], tl.float32)
        for c in range(0, K, CHUNK):
            x = tl.load(x_ptr + row * stride_x + c + cols, mask=c + cols < K, other=0.0).to(tl.float32)
            big = tl.maximum(big, tl.abs(x))
        # IEEE division (`/` and fdiv lower to approximate div.full in some Tritons): eager CPU bits
        scale = tl.maximum(tl.div_rn(tl.max(big, axis=0), FP8_MAX), TINY)
        for c in range(0, K, CHUNK):
            x = tl.load(x_ptr + row * stride_x + c + cols, mask=c + cols < K, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(tl.div_rn(x, scale), -FP8_MAX), FP8_MAX)
            tl.store(q_ptr + row * stride_q + c + cols, _to_e4m3(q, EXACT), mask=c + cols < K)
        tl.store(s_ptr + row, scale)

    @triton.jit
    def _modulated_chunk(
        x_row, shift_row, scale_row, c, cols, D, mean, rstd, ROUND_TO: tl.constexpr, EXACT: tl.constexpr
    ):
        """Columns c .. c + CHUNK of LN(x) * (1 + scale) + shift in fp32, rounded to x's dtype
        as the unfused path rounds it (fp32: nothing to do); 0 past D."""
        inside = c + cols < D
        x = tl.load(x_row + c + cols, mask=inside, other=0.0).to(tl.float32)
        shift = tl.load(shift_row + c + cols, mask=inside, other=0.0)
        scale = tl.load(scale_row + c + cols, mask=inside, other=0.0)
        y = shift + ((x - mean) * rstd) * (1.0 + scale)
        y = tl.where(inside, y, 0.0)
        if ROUND_TO == 1 and EXACT:  # the interpreter truncates to bf16: round the bits here
            bits = y.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # to nearest even, low 16 bits cleared
            y = bits.to(tl.float32, bitcast=True)
        elif ROUND_TO == 1:
            y = y.to(tl.bfloat16, fp_downcast_rounding="rtne").to(tl.float32)
        elif ROUND_TO == 2:
            y = y.to(tl.float16, fp_downcast_rounding="rtne").to(tl.float32)
        return y

    @triton.jit
    def _modulate_quantize_kernel(
        x_ptr, shift_ptr, scale_ptr, q_ptr, s_ptr,
        L, D, stride_xb, stride_xl, stride_shift, stride_scale, eps,
        FP8_MAX: tl.constexpr, TINY: tl.constexpr, ROUND_TO: tl.constexpr,
        CHUNK: tl.constexpr, EXACT: tl.constexpr,
    ):  # fmt: skip
        # One token per program, four chunked passes over its row (the first from memory, the
        # others from the cache): sum, squared deviations (LayerNorm in fp32, biased variance,
        # as FP32LayerNorm), the modulated row's amax, then its codes.
        row = tl.program_id(0).to(tl.int64)  # token b * L + l; int64: B * L * D can exceed 2^31
        b = row // L
        x_row = x_ptr + b * stride_xb + (row % L) * stride_xl
        shift_row = shift_ptr + b * stride_shift
        scale_row = scale_ptr + b * stride_scale
        cols = tl.arange(0, CHUNK)
        n = D.to(tl.float32)
        acc = tl.zeros([CHUNK], tl.float32)
        for c in range(0, D, CHUNK):
            acc += tl.load(x_row + c + cols, mask=c + cols < D, other=0.0).to(tl.float32)
        mean = tl.div_rn(tl.sum(acc, axis=0), n)  # IEEE division and square root: no approximations
        acc = tl.zeros([CHUNK], tl.float32)
        for c in range(0, D, CHUNK):
            x = tl.load(x_row + c + cols, mask=c + cols < D, other=0.0).to(tl.float32)
            acc += tl.where(c + cols < D, (x - mean) * (x - mean), 0.0)
        rstd = tl.div_rn(tl.full((), 1.0, tl.float32), tl.sqrt_rn(tl.div_rn(tl.sum(acc, axis=0), n) + eps))
        big = tl.zeros([CHUNK], tl.float32)
        for c in range(0, D, CHUNK):
            y = _modulated_chunk(x_row, shift_row, scale_row, c, cols, D, mean, rstd, ROUND_TO, EXACT)
            big = tl.maximum(big, tl.abs(y))
        s = tl.maximum(tl.div_rn(tl.max(big, axis=0), FP8_MAX), TINY)
        for c in range(0, D, CHUNK):
            y = _modulated_chunk(x_row, shift_row, scale_row, c, cols, D, mean, rstd, ROUND_TO, EXACT)
            q = tl.minimum(tl.maximum(tl.div_rn(y, s), -FP8_MAX), FP8_MAX)
            tl.store(q_ptr + row * D + c + cols, _to_e4m3(q, EXACT), mask=c + cols < D)  # cvt.rn.satfinite
        tl.store(s_ptr + row, s)

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


def _row_launch(k: int, chunk: int | None, num_warps: int | None) -> tuple[int, int]:
    """(chunk, num_warps) of a row kernel for rows of k elements: the given ones, else the
    fastest measured on an H200 at Wan 14B's widths (``benchmarks/results/h200_block_overhead.md``):
    1024 x 4 at 5120, 2048 x 8 at 13824. The chunk never exceeds the row (rounded up to 2^n)."""
    wide = k > 8192
    chunk = chunk or (2048 if wide else 1024)
    return min(chunk, triton.next_power_of_2(k)), num_warps or (8 if wide else 4)


def quantize_rows_triton(
    x2d: torch.Tensor, where: str = "quantize_rows", chunk: int | None = None, num_warps: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused per-token quantization: x [M, K] -> (q e4m3 [M, K] row-major, scale fp32 [M, 1]).
    ``chunk`` / ``num_warps``: the launch (default :func:`_row_launch`)."""
    x2d = QUANT_ROWS_CONTRACT.enforce(where, x=x2d)["x"]
    m, k = x2d.shape
    q = torch.empty(m, k, dtype=fp8.ACT_DTYPE, device=x2d.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x2d.device)
    if m == 0:
        return q, scale
    chunk, num_warps = _row_launch(k, chunk, num_warps)
    with torch.cuda.device(x2d.device) if x2d.is_cuda else nullcontext():
        _quantize_rows_kernel[(m,)](
            x2d, q, scale, k, x2d.stride(0), q.stride(0),
            FP8_MAX=fp8.fp8_max(fp8.ACT_DTYPE), TINY=fp8._TINY, CHUNK=chunk,
            EXACT=exact_fp8_rounding(), num_warps=num_warps,
        )  # fmt: skip
    return q, scale


_ROUND_TO = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def modulate_quantize_rows_triton(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    where: str = "modulate_quantize_rows",
    chunk: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rows(LayerNorm(x) * (1 + scale) + shift)`` in one kernel, never writing the
    modulated x: x [B, L, D]; shift, scale fp32 [B, 1, D] -> (q e4m3 [B, L, D], scale fp32
    [B, L, 1]). The LayerNorm has no affine part and computes in fp32; the modulated value is
    rounded to x's dtype before it is quantized, as the unfused path rounds it. x is never
    written. ``chunk`` / ``num_warps``: the launch (default :func:`_row_launch`)."""
    ops = MODULATE_ROWS_CONTRACT.enforce(where, x=x, shift=shift, scale=scale)
    x, shift, scale = ops["x"], ops["shift"], ops["scale"]
    b, length, d = x.shape
    if shift.shape != (b, 1, d) or scale.shape != (b, 1, d):
        raise ValueError(
            f"{where}: shift and scale must be [{b}, 1, {d}] for x {tuple(x.shape)}, "
            f"got {tuple(shift.shape)} and {tuple(scale.shape)}"
        )
    q = torch.empty(b, length, d, dtype=fp8.ACT_DTYPE, device=x.device)
    row_scale = torch.empty(b, length, 1, dtype=torch.float32, device=x.device)
    if b * length == 0:
        return q, row_scale
    chunk, num_warps = _row_launch(d, chunk, num_warps)
    with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
        _modulate_quantize_kernel[(b * length,)](
            x, shift, scale, q, row_scale,
            length, d, x.stride(0), x.stride(1), shift.stride(0), scale.stride(0), eps,
            FP8_MAX=fp8.fp8_max(fp8.ACT_DTYPE), TINY=fp8._TINY, ROUND_TO=_ROUND_TO[x.dtype],
            CHUNK=chunk, EXACT=exact_fp8_rounding(), num_warps=num_warps,
        )  # fmt: skip
    return q, row_scale


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
