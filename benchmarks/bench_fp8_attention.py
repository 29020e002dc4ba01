"""Our FP8 attention (wanstudio/attention_backends/fp8_triton.py) against cuDNN / flash SDPA in
bf16, same run, at Wan's shapes: B=1, H=40, D=128, L = 32,760 (480p, 81 frames) and 75,600
(720p). Inputs are Wan-like: K and V with a large per-channel mean over tokens.

Prints, per L: milliseconds (median of CUDA-event timings) and TFLOP/s (4 L^2 H D per call) of
each SDPA backend and of each FP8 block configuration (pre-pass included, and the kernel alone),
and the relative L2 error of each against fp32 SDPA on 4 of the heads.

    python benchmarks/bench_fp8_attention.py            # both lengths
    python benchmarks/bench_fp8_attention.py 32760
"""

from __future__ import annotations

import statistics
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

from wanstudio.attention_backends import fp8_triton as F

CONFIGS = [  # block_m, block_n, num_warps, num_stages
    (128, 64, 8, 3),
    (128, 128, 8, 2),
    (128, 128, 8, 3),
    (128, 64, 4, 3),
    (64, 64, 4, 3),
    (128, 32, 8, 4),
]


def wan_like(length: int, heads: int = 40, dim: int = 128, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device="cuda")

    q = randn(1, length, heads, dim)
    k = randn(1, length, heads, dim) + 4 * randn(1, 1, heads, dim)  # per-channel offsets
    v = randn(1, length, heads, dim) + 2 * randn(1, 1, heads, dim)
    return [t.to(torch.bfloat16) for t in (q, k, v)]


def timed(fn, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def sdpa_bhld(q, k, v, backend):
    with sdpa_kernel(backend):
        return sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def main(argv: list[str]) -> int:
    lengths = [int(a) for a in argv] or [32760, 75600]
    print(f"Card: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for length in lengths:
        bench_length(length)
    return 0


def bench_length(length: int) -> None:
    """The table for one sequence length."""
    q, k, v = wan_like(length)
    flop = 4 * length * length * 40 * 128
    heads = slice(0, 4)
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):  # fp32 reference on 4 heads
        ref = sdpa(*(t[:, :, heads].float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)

    def err(out):
        return ((out[:, :, heads].float() - ref).norm() / ref.norm()).item()

    print(f"\nL = {length}: B=1, H=40, D=128, bf16 inputs\n", flush=True)
    print("| kernel | ms | TFLOP/s | rel. error vs fp32 |")
    print("|---|---|---|---|")
    base = None
    for name, backend in (
        ("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION),
        ("SDPA flash", SDPBackend.FLASH_ATTENTION),
    ):
        try:
            ms = timed(lambda b=backend: sdpa_bhld(q, k, v, b))  # noqa: B023 - called at once
            e = err(sdpa_bhld(q, k, v, backend))
        except RuntimeError as exc:
            print(f"| {name} | failed: {str(exc)[:80]} | | |")
            continue
        base = base or ms
        print(f"| {name} | {ms:.2f} | {flop / ms / 1e9:.0f} | {e:.2e} |", flush=True)
    for bm, bn, warps, stages in CONFIGS:
        kw = dict(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)
        try:
            out = F.fp8_attention(q, k, v, **kw)
            ms = timed(lambda kw=kw: F.fp8_attention(q, k, v, **kw))  # noqa: B023 - called at once
            qq = F.quantize_qkv(q, k, v, bm, bn)
            pre = timed(lambda: F.quantize_qkv(q, k, v, bm, bn))  # noqa: B023 - called at once
        except Exception as exc:  # noqa: BLE001 - a config that does not compile is a row
            print(f"| fp8 {bm}x{bn} w{warps} s{stages} | failed: {type(exc).__name__} {str(exc)[:100]} | | |")
            continue
        del qq
        label = f"fp8 {bm}x{bn} w{warps} s{stages}"
        print(
            f"| {label} | {ms:.2f} (pre-pass {pre:.2f}) | {flop / ms / 1e9:.0f} ({flop / (ms - pre) / 1e9:.0f} kernel) "
            f"| {err(out):.2e} |",
            flush=True,
        )
    if base:
        print(f"\n(the 1.5x target: {base / 1.5:.2f} ms at this L)")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
