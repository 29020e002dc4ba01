"""An FP8 attention of our own, in Triton: INT8 Q K^T, FP8 P V (the SageAttention 2 recipe).

Forward only, non-causal, head_dim 64 or 128, any Lq / Lk >= 1 (masked tails), any B and H
(a batch too large for int32 offsets runs in several launches); inputs [B, L, H, D] in fp16 /
bf16 with stride(-1) == 1, never written.

Quantization, one pre-pass per tensor (:func:`quantize_qkv`):

* K is smoothed: its mean over tokens (per batch, head and channel) is subtracted. Every score
  of a query row moves by the same q . mean, which softmax cancels; what is left has no
  per-channel offset (Wan's K carries a large one), so K's INT8 blocks keep their resolution.
* Q per block of ``block_m`` tokens and K per block of ``block_n`` tokens (one head each) ->
  INT8, symmetric, scale amax / 127. Q's scale also carries 1/sqrt(D) and log2(e), so the
  kernel exponentiates with exp2 and never multiplies by them again.
* V is smoothed too (its mean over tokens is subtracted, and added to the output: softmax rows
  sum to 1), then per channel -> FP8 e4m3, scale amax / 448 over all tokens, stored
  transposed [B*H, D, Lk] so that P V's second operand is K-major, as Hopper's FP8 MMA needs.

The kernel: per ``block_m`` queries, loop over key blocks; S = Q K^T in INT32; online softmax
with exp2, the row maximum taken on the raw scores, the two block scales, the maximum and P's
x448 (P in [0, 448] -> FP8) folded into one FMA before exp2; ``acc = acc * alpha + P V`` in one
MMA (Hopper's FP8 MMA keeps fewer bits when it accumulates, but over one key block at a time
onto a rescaled output the error vs fp32 is unchanged, 1.66e-3); at the end acc / l * v_scale +
V's mean (acc and l both carry the 448). Against the first version (a fresh accumulator per
block, scale then subtract, x448 apart): 10-13% faster (``results/h200_fp8_attention_variants.md``).

:func:`quantize_reference` and :func:`attention_reference` are the test oracle: the same
quantization in torch (bit for bit), and the kernel's arithmetic in float64, P rounded block by
block against the running maximum as the kernel does.

Triton 3.6's interpreter (``TRITON_INTERPRET=1``) rounds fp32 -> fp8 wrongly when rounding
carries into the exponent (1.98 -> 1.0). Under it the kernels first round to the e4m3 grid in
fp32 (``EXACT`` of ``quant.kernels._to_e4m3``: round to nearest even, saturating at 448, signed
zeros kept, as the hardware's
conversion; tested against torch's), so the CPU tests check the kernels' own arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..quant.kernels import HAS_TRITON, _to_e4m3, exact_fp8_rounding, tl, triton

E4M3_MAX = 448.0
INT8_MAX = 127.0
LOG2_E = 1.4426950408889634
LOG2_448 = tl.constexpr(math.log2(E4M3_MAX)) if HAS_TRITON else None  # exp2(x + this) = 448 exp2(x)
HEAD_DIMS = (64, 128)


@dataclass(frozen=True)
class QuantizedQKV:
    """The pre-pass's output. Rows past Lq / Lk (up to a whole block) are zero."""

    q: torch.Tensor  # int8 [B*H, Lq_pad, D]
    q_scale: torch.Tensor  # fp32 [B*H, Lq_pad / block_m]: amax / 127 * log2(e) / sqrt(D)
    k: torch.Tensor  # int8 [B*H, Lk_pad, D], mean over tokens removed
    k_scale: torch.Tensor  # fp32 [B*H, Lk_pad / block_n]: amax / 127
    v: torch.Tensor  # float8_e4m3fn [B*H, D, Lk_pad] (transposed)
    v_scale: torch.Tensor  # fp32 [B*H, D]: amax / 448 (of V less its mean)
    v_mean: torch.Tensor  # fp32 [B*H, D]
    lq: int
    lk: int
    block_m: int
    block_n: int


def _blocks(n: int, block: int) -> int:
    return -(-n // block)


def _round_half_away_int8(y: torch.Tensor) -> torch.Tensor:
    # what the kernel does: add +-0.5, truncate toward zero (fp32 -> int8 conversion)
    return (y + torch.where(y >= 0, 0.5, -0.5)).to(torch.int8)


def _divide(a, b) -> torch.Tensor:
    # IEEE division of two tensors, as tl.div_rn: torch computes scalar / tensor as
    # reciprocal * scalar, and divides by a scalar through its reciprocal on CUDA
    a, b = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    return a.to(b.device if b.dim() else a.device) / b.to(a.device if a.dim() else b.device)


def _int8_blocks(x: torch.Tensor, block: int, extra: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x fp32 [BH, L, D] -> (int8 [BH, L_pad, D], scale fp32 [BH, L_pad / block])."""
    bh, length, d = x.shape
    n = _blocks(length, block)
    padded = x.new_zeros(bh, n * block, d)
    padded[:, :length] = x
    tiles = padded.view(bh, n, block * d)  # (BH, blocks, block*D)
    amax = tiles.abs().amax(dim=2).clamp_min(1e-30)  # (BH, blocks)
    inv = _divide(INT8_MAX, amax)
    q = _round_half_away_int8(tiles * inv[:, :, None]).view(bh, n * block, d)
    scale = _divide(amax, INT8_MAX) * torch.tensor(extra, dtype=torch.float32)
    return q, scale


def quantize_reference(q, k, v, block_m: int = 128, block_n: int = 64) -> QuantizedQKV:
    """The pre-pass in torch: bit for bit what :func:`quantize_qkv`'s kernels write."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    heads_first = lambda t: t.permute(0, 2, 1, 3).reshape(b * h, t.shape[1], d).float()  # noqa: E731
    qf, kf, vf = heads_first(q), heads_first(k), heads_first(v)
    q8, q_scale = _int8_blocks(qf, block_m, LOG2_E / math.sqrt(d))
    mean = k.mean(dim=1, dtype=torch.float32).reshape(b * h, 1, d)  # as the device path computes it
    k8, k_scale = _int8_blocks(kf - mean, block_n, 1.0)
    v_mean, amax = _v_statistics(v)
    v8 = torch.zeros(b * h, d, _blocks(lk, block_n) * block_n, dtype=torch.float8_e4m3fn, device=q.device)
    scaled = ((vf - v_mean[:, None, :]) * _divide(E4M3_MAX, amax)[:, None, :]).clamp(-E4M3_MAX, E4M3_MAX)
    v8[:, :, :lk] = scaled.transpose(1, 2).to(torch.float8_e4m3fn)
    v_scale = _divide(amax, E4M3_MAX)
    return QuantizedQKV(q8, q_scale, k8, k_scale, v8, v_scale, v_mean, lq, lk, block_m, block_n)


def _v_statistics(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """V's mean over tokens and the amax of V less it, both fp32 [B*H, D] (torch reductions,
    shared by the device pre-pass and the reference)."""
    b, _, h, d = v.shape
    mean = v.mean(dim=1, dtype=torch.float32)  # (B, H, D)
    low, high = torch.aminmax(v, dim=1)
    # max |fl(v - mean)| without an fp32 copy of v: fl(v - mean) is monotonic in v
    amax = torch.maximum(high.float() - mean, mean - low.float()).reshape(b * h, d).clamp_min(1e-30)
    return mean.reshape(b * h, d), amax


def attention_reference(qq: QuantizedQKV, batch: int, heads: int) -> torch.Tensor:
    """The kernel's arithmetic in float64 on quantized inputs -> [B, Lq, H, D] float64."""
    q = qq.q.double()[:, : qq.lq]
    qs = qq.q_scale.double().repeat_interleave(qq.block_m, dim=1)[:, : qq.lq]
    m = torch.full(q.shape[:2], -math.inf, dtype=torch.float64, device=q.device)
    l_sum = torch.zeros_like(m)
    acc = torch.zeros(*q.shape, dtype=torch.float64, device=q.device)
    for j in range(_blocks(qq.lk, qq.block_n)):
        keys = slice(j * qq.block_n, min((j + 1) * qq.block_n, qq.lk))
        s = (
            q
            @ qq.k.double()[:, keys].transpose(1, 2)
            * qs[:, :, None]
            * qq.k_scale.double()[:, j, None, None]
        )
        m_new = torch.maximum(m, s.amax(dim=2))
        alpha = torch.exp2(m - m_new)
        p = torch.exp2(s - m_new[:, :, None])
        l_sum = l_sum * alpha + p.sum(dim=2)
        p8 = (p * E4M3_MAX).float().to(torch.float8_e4m3fn).double()
        acc = acc * alpha[:, :, None] + p8 @ qq.v.double()[:, :, keys].transpose(1, 2)
        m = m_new
    out = (
        acc * (qq.v_scale.double() / E4M3_MAX)[:, None, :] / l_sum[:, :, None]
        + qq.v_mean.double()[:, None, :]
    )
    return out.view(batch, heads, qq.lq, -1).permute(0, 2, 1, 3)


if HAS_TRITON:

    @triton.jit
    def _head_tile(
        x_ptr, mean_ptr, bh, rows, L, H, stride_b, stride_l, stride_h,
        HAS_MEAN: tl.constexpr, D: tl.constexpr,
    ):  # fmt: skip
        """Rows ``rows`` of head ``bh`` of a [B, L, H, D] tensor in fp32, less the per-channel
        mean when given; rows past L are 0."""
        cols = tl.arange(0, D)
        inside = rows[:, None] < L
        src = x_ptr + (bh // H) * stride_b + (bh % H) * stride_h + rows[:, None] * stride_l + cols[None, :]
        x = tl.load(src, mask=inside, other=0.0).to(tl.float32)
        if HAS_MEAN:
            x = tl.where(inside, x - tl.load(mean_ptr + bh * D + cols)[None, :], 0.0)
        return x

    @triton.jit
    def _quantize_int8_kernel(
        x_ptr, mean_ptr, out_ptr, scale_ptr, extra, L, H, n_blocks,
        stride_b, stride_l, stride_h,
        HAS_MEAN: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr,
    ):  # fmt: skip
        blk = tl.program_id(0)
        bh = tl.program_id(1)
        rows = blk * BLOCK + tl.arange(0, BLOCK)
        cols = tl.arange(0, D)
        x = _head_tile(x_ptr, mean_ptr, bh, rows, L, H, stride_b, stride_l, stride_h, HAS_MEAN, D)
        amax = tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0), 1e-30)
        y = x * tl.div_rn(tl.full((), 127.0, tl.float32), amax)
        q = (y + tl.where(y >= 0, 0.5, -0.5)).to(tl.int8)  # +-0.5, then truncation
        tl.store(out_ptr + (bh * n_blocks * BLOCK + rows[:, None]) * D + cols[None, :], q)
        tl.store(scale_ptr + bh * n_blocks + blk, tl.div_rn(amax, tl.full((), 127.0, tl.float32)) * extra)

    @triton.jit
    def _quantize_v_kernel(
        v_ptr, mean_ptr, inv_ptr, out_ptr, L, L_pad, H,
        stride_b, stride_l, stride_h,
        BLOCK: tl.constexpr, D: tl.constexpr, EXACT: tl.constexpr,
    ):  # fmt: skip
        blk = tl.program_id(0)
        bh = tl.program_id(1)
        rows = blk * BLOCK + tl.arange(0, BLOCK)
        cols = tl.arange(0, D)
        v = _head_tile(v_ptr, mean_ptr, bh, rows, L, H, stride_b, stride_l, stride_h, True, D)
        y = tl.minimum(tl.maximum(v * tl.load(inv_ptr + bh * D + cols)[None, :], -448.0), 448.0)
        vt = tl.trans(_to_e4m3(y, EXACT))  # (D, BLOCK): stored transposed
        tl.store(out_ptr + (bh * D + cols[:, None]) * L_pad + rows[None, :], vt)

    @triton.jit
    def _attend_block(
        q, q_scale, k_ptrs, v_ptrs, k_scale, m_i, l_i, acc, start, Lk,
        MASK: tl.constexpr, BLOCK_N: tl.constexpr, EXACT: tl.constexpr,
    ):  # fmt: skip
        k = tl.load(k_ptrs)  # int8 (BLOCK_N, D)
        raw = tl.dot(q, tl.trans(k)).to(tl.float32)  # scores in units of q_scale * k_scale
        if MASK:
            raw = tl.where((start + tl.arange(0, BLOCK_N))[None, :] < Lk, raw, -float("inf"))
        qk = q_scale * k_scale  # > 0: the row maximum can be taken before scaling (log2 units)
        m_new = tl.maximum(m_i, tl.max(raw, 1) * qk)
        alpha = tl.math.exp2(m_i - m_new)
        # P * 448 straight from one FMA and exp2 (<= 448: the FP8 range); l sums it so scaled
        p = tl.math.exp2(raw * qk - (m_new - LOG2_448)[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(v_ptrs)  # fp8 (D, BLOCK_N)
        # the MMA adds P V to the rescaled output itself (8% faster than a fresh accumulator and
        # an add, same error: results/h200_fp8_attention_variants.md)
        return m_new, l_i, tl.dot(_to_e4m3(p, EXACT), tl.trans(vt), acc * alpha[:, None])

    @triton.jit
    def _attention_kernel(
        q_ptr, k_ptr, v_ptr, qs_ptr, ks_ptr, vs_ptr, vm_ptr, o_ptr,
        Lq, Lk, H, n_qblocks, n_kblocks, n_full,
        stride_ob, stride_ol, stride_oh,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EXACT: tl.constexpr,
    ):  # fmt: skip
        blk = tl.program_id(0)
        bh = tl.program_id(1)
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, D)
        keys = tl.arange(0, BLOCK_N)
        lk_pad = n_kblocks * BLOCK_N
        q = tl.load(q_ptr + (bh * n_qblocks * BLOCK_M + rows[:, None]) * D + cols[None, :])
        q_scale = tl.load(qs_ptr + bh * n_qblocks + blk)
        k_ptrs = k_ptr + (bh * lk_pad + keys[:, None]) * D + cols[None, :]
        v_ptrs = v_ptr + (bh * D + cols[:, None]) * lk_pad + keys[None, :]
        m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for j in range(0, n_full):
            k_scale = tl.load(ks_ptr + bh * n_kblocks + j)
            m_i, l_i, acc = _attend_block(
                q, q_scale, k_ptrs, v_ptrs, k_scale, m_i, l_i, acc, j * BLOCK_N, Lk, False, BLOCK_N, EXACT
            )
            k_ptrs += BLOCK_N * D
            v_ptrs += BLOCK_N
        if n_full < n_kblocks:  # the partial last block: missing keys score -inf
            k_scale = tl.load(ks_ptr + bh * n_kblocks + n_full)
            m_i, l_i, acc = _attend_block(
                q, q_scale, k_ptrs, v_ptrs, k_scale, m_i, l_i, acc, n_full * BLOCK_N, Lk, True, BLOCK_N, EXACT
            )
        v_scale = tl.load(vs_ptr + bh * D + cols)  # acc and l_i both carry P's x448
        out = acc * v_scale[None, :] / l_i[:, None] + tl.load(vm_ptr + bh * D + cols)[None, :]
        dst = o_ptr + (bh // H) * stride_ob + (bh % H) * stride_oh + rows[:, None] * stride_ol + cols[None, :]
        tl.store(dst, out.to(o_ptr.dtype.element_ty), mask=rows[:, None] < Lq)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError("the FP8 attention kernel needs Triton (pip install triton)")
    d = q.shape[-1]
    if d not in HEAD_DIMS:
        raise ValueError(f"the FP8 attention kernel takes head_dim {HEAD_DIMS}, got {d}")


_INT32_MAX = 2**31 - 1
_GRID_Y_MAX = 65535  # CUDA's limit on the second grid dimension (B * H programs)


def _batch_per_launch(q, k, v, block_m: int, block_n: int) -> int:
    """How many batch entries one launch may take with every offset inside int32."""
    _, lq, h, d = q.shape
    lk = k.shape[1]

    def one_entry(t):  # the farthest element of one batch entry, and the step to the next
        return max(abs(t.stride(0)), 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape[1:], t.stride()[1:])))

    per_entry = max(
        h * _blocks(lq, block_m) * block_m * d,  # the quantized Q, K, V buffers
        h * _blocks(lk, block_n) * block_n * d,
        lq * h * d,  # the output
        *(one_entry(t) for t in (q, k, v)),
    )
    step = min(_INT32_MAX // per_entry, _GRID_Y_MAX // h)
    if step < 1:
        raise ValueError(
            f"the FP8 attention kernel addresses its tensors with int32 offsets; one batch entry of "
            f"{per_entry:,} elements (Lq {lq}, Lk {lk}, {h} heads of {d}) is over 2^31: use attention='sdpa'"
        )
    return step


def quantize_qkv(q, k, v, block_m: int = 128, block_n: int = 64) -> QuantizedQKV:
    """The pre-pass on the device: three quantization kernels, after torch reductions for K's
    mean and V's mean and range (:func:`_v_statistics`). Same output as :func:`quantize_reference`."""
    _check(q, k, v)
    b, lq, h, d = q.shape
    lk = k.shape[1]
    nq, nk = _blocks(lq, block_m), _blocks(lk, block_n)
    dev = q.device
    q8 = torch.empty(b * h, nq * block_m, d, dtype=torch.int8, device=dev)
    k8 = torch.empty(b * h, nk * block_n, d, dtype=torch.int8, device=dev)
    q_scale = torch.empty(b * h, nq, dtype=torch.float32, device=dev)
    k_scale = torch.empty(b * h, nk, dtype=torch.float32, device=dev)
    mean = k.mean(dim=1, dtype=torch.float32).contiguous()  # (B, H, D)
    # enable_fp_fusion=False: x * inv + 0.5 fused into one FMA rounds once, torch rounds twice
    _quantize_int8_kernel[(nq, b * h)](
        q, q, q8, q_scale, LOG2_E / math.sqrt(d), lq, h, nq, q.stride(0), q.stride(1), q.stride(2),
        HAS_MEAN=False, BLOCK=block_m, D=d, enable_fp_fusion=False,
    )  # fmt: skip
    _quantize_int8_kernel[(nk, b * h)](
        k, mean, k8, k_scale, 1.0, lk, h, nk, k.stride(0), k.stride(1), k.stride(2),
        HAS_MEAN=True, BLOCK=block_n, D=d, enable_fp_fusion=False,
    )  # fmt: skip
    v_mean, amax = _v_statistics(v)
    v8 = torch.empty(b * h, d, nk * block_n, dtype=torch.float8_e4m3fn, device=dev)
    _quantize_v_kernel[(nk, b * h)](
        v, v_mean, _divide(E4M3_MAX, amax), v8, lk, nk * block_n, h, v.stride(0), v.stride(1), v.stride(2),
        BLOCK=block_n, D=d, EXACT=exact_fp8_rounding(), enable_fp_fusion=False,
    )  # fmt: skip
    return QuantizedQKV(
        q8, q_scale, k8, k_scale, v8, _divide(amax, E4M3_MAX), v_mean, lq, lk, block_m, block_n
    )


def fp8_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_m: int = 128,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for [B, L, H, D] q / k / v -> [B, Lq, H, D] in q's dtype.

    The default blocks are the fastest of 8 configurations of the kernel as it is on an H200 at
    L = 32,768 (``benchmarks/results/h200_fp8_attention_variants.md``; 128 x 128 with 8 warps,
    the default before, is 4% slower). The kernels' offsets are int32: a batch too large for one
    launch runs in several.
    """
    step = _batch_per_launch(q, k, v, block_m, block_n)
    if step < q.shape[0]:
        kw = dict(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)
        chunks = range(0, q.shape[0], step)
        return torch.cat(
            [fp8_attention(q[i : i + step], k[i : i + step], v[i : i + step], **kw) for i in chunks]
        )
    qq = quantize_qkv(q, k, v, block_m, block_n)
    b, lq, h, d = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    nq, nk = qq.q_scale.shape[1], qq.k_scale.shape[1]
    _attention_kernel[(nq, b * h)](
        qq.q, qq.k, qq.v, qq.q_scale, qq.k_scale, qq.v_scale, qq.v_mean, out,
        lq, qq.lk, h, nq, nk, qq.lk // block_n, out.stride(0), out.stride(1), out.stride(2),
        D=d, BLOCK_M=block_m, BLOCK_N=block_n, EXACT=exact_fp8_rounding(),
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out
