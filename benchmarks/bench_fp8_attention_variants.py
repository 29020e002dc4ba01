"""Experiments on the FP8 attention kernel's main loop (GPU only): which Hopper features move
it, before any of them goes into ``wanstudio/attention_backends/fp8_triton.py``.

The same quantized inputs as the package's kernel (``quantize_qkv``: INT8 Q and K per block,
smoothed FP8 V stored transposed) and the same arithmetic, with switches:

* ``acc`` — P V accumulated by the MMA into the rescaled running output (one tensor-core
  operation instead of an MMA into a fresh accumulator plus an add; Hopper's FP8 MMA keeps
  fewer bits when it accumulates, so the error column matters);
* ``fold`` — the row maximum taken on the raw INT32 scores, and the block scale, the maximum and
  P's x448 folded into one FMA before exp2 (P comes out in [0, 448]; l sums it so scaled);
* the block shape, warps and pipeline stages.

Round 1 (``results/h200_fp8_attention_variants.md``) also tried Q / K / V tiles through tensor
descriptors (TMA: slower, 36.7 vs 33.0 ms) and Triton's automatic warp specialisation on the key
loop (no change on Hopper; fails to compile at 4 warps); they are gone from the kernel.

Prints per L (B=1, H=40, D=128, Wan-like K and V): cuDNN SDPA bf16, the package's kernel, and
every variant: ms for the kernel alone (the pre-pass is shared and timed once), TFLOP/s,
relative error vs fp32 SDPA on 4 heads; a variant that does not compile is a row.

    python benchmarks/bench_fp8_attention_variants.py [L ...]
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl
from bench_fp8_attention import sdpa_bhld, timed, wan_like
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

from wanstudio.attention_backends import fp8_triton as F

LOG2_448 = tl.constexpr(8.807354922057604)  # log2(448): exp2(x - (m - LOG2_448)) <= 448


@triton.jit
def _variant_kernel(
    q_ptr, k_ptr, v_ptr, qs_ptr, ks_ptr, vs_ptr, vm_ptr, o_ptr,
    Lq, H, n_qblocks, n_kblocks, stride_ob, stride_ol, stride_oh,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr, FOLD: tl.constexpr,
):  # fmt: skip
    # Lk a multiple of BLOCK_N (no masked tail): the experiment's shapes are chosen so
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, D)
    keys = tl.arange(0, BLOCK_N)
    lk_pad = n_kblocks * BLOCK_N
    q = tl.load(q_ptr + (bh * n_qblocks * BLOCK_M + rows[:, None]) * D + cols[None, :])
    q_scale = tl.load(qs_ptr + bh * n_qblocks + blk)
    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    k_ptrs = k_ptr + (bh * lk_pad + keys[:, None]) * D + cols[None, :]
    v_ptrs = v_ptr + (bh * D + cols[:, None]) * lk_pad + keys[None, :]
    for j in range(0, n_kblocks):
        k = tl.load(k_ptrs)
        qk = q_scale * tl.load(ks_ptr + bh * n_kblocks + j)
        raw = tl.dot(q, tl.trans(k)).to(tl.float32)
        if FOLD:
            m_new = tl.maximum(m_i, tl.max(raw, 1) * qk)
            p = tl.math.exp2(raw * qk - (m_new - LOG2_448)[:, None])  # one FMA, then exp2: P * 448
        else:
            s = raw * qk
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(v_ptrs)
        p8 = p.to(tl.float8e4nv) if FOLD else (p * 448.0).to(tl.float8e4nv)
        if ACC:
            acc = tl.dot(p8, tl.trans(vt), acc * alpha[:, None])
        else:
            acc = acc * alpha[:, None] + tl.dot(p8, tl.trans(vt))
        m_i = m_new
        k_ptrs += BLOCK_N * D
        v_ptrs += BLOCK_N
    v_scale = tl.load(vs_ptr + bh * D + cols)
    if not FOLD:
        v_scale = v_scale * (1.0 / 448.0)
    out = acc * v_scale[None, :] / l_i[:, None] + tl.load(vm_ptr + bh * D + cols)[None, :]
    dst = o_ptr + (bh // H) * stride_ob + (bh % H) * stride_oh + rows[:, None] * stride_ol + cols[None, :]
    tl.store(dst, out.to(o_ptr.dtype.element_ty), mask=rows[:, None] < Lq)


def variant(qq: F.QuantizedQKV, out: torch.Tensor, heads: int, *, acc, fold, warps, stages):
    bm, bn, d = qq.block_m, qq.block_n, qq.q.shape[-1]
    nq, nk = qq.q_scale.shape[1], qq.k_scale.shape[1]
    _variant_kernel[(nq, qq.q.shape[0])](
        qq.q, qq.k, qq.v, qq.q_scale, qq.k_scale, qq.v_scale, qq.v_mean, out,
        qq.lq, heads, nq, nk, out.stride(0), out.stride(1), out.stride(2),
        D=d, BLOCK_M=bm, BLOCK_N=bn, ACC=acc, FOLD=fold, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


CONFIGS = [  # block_m, block_n, warps, stages
    (128, 128, 8, 2),
    (128, 128, 8, 3),
    (128, 128, 8, 4),
    (128, 64, 4, 3),
    (128, 64, 4, 4),
    (64, 128, 4, 3),
    (256, 128, 16, 3),
    (256, 64, 8, 3),
]


def bench_length(length: int) -> None:
    heads = 40
    q, k, v = wan_like(length, heads)
    flop = 4 * length * length * heads * 128
    few = slice(0, 4)
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):  # fp32 reference on 4 heads
        ref = sdpa(*(t[:, :, few].float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)

    def err(o):
        return ((o[:, :, few].float() - ref).norm() / ref.norm()).item()

    def row(name, ms, e):
        print(f"| {name} | {ms:.2f} | {flop / ms / 1e9:.0f} | {e:.2e} |", flush=True)

    print(f"\nL = {length}: B=1, H={heads}, D=128, bf16 inputs\n\n| kernel | ms | TFLOP/s | rel. error |")
    print("|---|---|---|---|")
    row("SDPA cuDNN bf16", timed(lambda: sdpa_bhld(q, k, v, SDPBackend.CUDNN_ATTENTION)),
        err(sdpa_bhld(q, k, v, SDPBackend.CUDNN_ATTENTION)))  # fmt: skip
    row("package fp8_attention (pre-pass included)", timed(lambda: F.fp8_attention(q, k, v)),
        err(F.fp8_attention(q, k, v)))  # fmt: skip
    prepared = {}
    for bm, bn, warps, stages in CONFIGS:
        if (bm, bn) not in prepared:
            prepared[(bm, bn)] = F.quantize_qkv(q, k, v, bm, bn)
            pre = timed(lambda: F.quantize_qkv(q, k, v, bm, bn))  # noqa: B023 - called at once
            print(f"| pre-pass {bm}x{bn} | {pre:.2f} | | |", flush=True)
        qq = prepared[(bm, bn)]
        for acc, fold in ((False, False), (True, False), (True, True)):
            name = f"{bm}x{bn} w{warps} s{stages} acc={int(acc)} fold={int(fold)}"
            out = torch.empty_like(q)
            kw = dict(acc=acc, fold=fold, warps=warps, stages=stages)
            try:
                variant(qq, out, heads, **kw)
                ms = timed(lambda kw=kw, qq=qq, out=out: variant(qq, out, heads, **kw))
            except Exception as exc:  # noqa: BLE001 - a variant that does not compile is a row
                print(f"| {name} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:90]} | | |")
                continue
            row(name + " (kernel)", ms, err(out))


def main(argv: list[str]) -> int:
    print(f"Card: {torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}")
    for length in [int(a) for a in argv] or [32768]:
        bench_length(length)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
