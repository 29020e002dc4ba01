"""Time every available attention backend at Wan2.1 shapes; print a markdown table.

    python benchmarks/bench_attention.py                      # B=1, H=40, D=128, L=32760 and 75600
    python benchmarks/bench_attention.py --output benchmarks/attention_h100.md

For each sequence length: every AttentionMode through the dispatcher (unavailable ones with
their reason), then SDPA's own kernels forced one at a time (cuDNN / flash / efficient), with
median time of ``--repeats`` calls after ``--warmup`` calls (CUDA events), TFLOP/s counted as
4 * Lq * Lk * D * H * B, and the relative error of a slice of the output (2 heads x 1024
queries) against an fp64 reference. Then InfiniteTalk's audio attention (21 * B frames x 1560
queries vs 32 audio tokens, 40 heads), and the dispatcher's CPU overhead per call.

``--device cpu`` with small ``--lengths`` rehearses the script without a GPU (wall-clock timing).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_timing import Timer  # noqa: E402

import wanstudio.attention as A  # noqa: E402
from wanstudio.attention_backends import sdpa  # noqa: E402
from wanstudio.options import AttentionMode  # noqa: E402

SDPA_KERNELS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[32760, 75600])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=40)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--audio-frames", type=int, default=21)
    p.add_argument("--audio-queries", type=int, default=1560)
    p.add_argument("--audio-keys", type=int, default=32)
    p.add_argument("--modes", nargs="*", default=None, help="attention modes (default: all)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--output", type=Path, default=None, help="also write the table here")
    return p.parse_args(argv)


def make_qkv(batch, q_len, k_len, heads, head_dim, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)  # drawn where they live
    shapes = [(batch, q_len, heads, head_dim), (batch, k_len, heads, head_dim)]
    q = torch.randn(shapes[0], generator=g, device=device, dtype=dtype)
    k = torch.randn(shapes[1], generator=g, device=device, dtype=dtype)
    v = torch.randn(shapes[1], generator=g, device=device, dtype=dtype)
    return q, k, v


def slice_reference(q, k, v, heads=2, queries=1024):
    """fp64 attention for the first ``heads`` heads and ``queries`` queries of batch 0."""
    qs = q[0, :queries, :heads].double().transpose(0, 1)  # (h, Lq', D)
    ks, vs = (t[0, :, :heads].double().transpose(0, 1) for t in (k, v))  # (h, Lk, D)
    probs = ((qs @ ks.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1)  # (h, Lq', Lk)
    return (probs @ vs).transpose(0, 1), (heads, queries)  # (Lq', h, D)


def slice_error(out, ref_slice) -> float:
    ref, (heads, queries) = ref_slice
    got = out[0, :queries, :heads].double()
    return float((got - ref).norm() / ref.norm())


def tflops(batch, q_len, k_len, heads, head_dim, ms) -> float:
    return 4 * batch * q_len * k_len * head_dim * heads / (ms * 1e-3) / 1e12


def short(text: str, width: int = 90) -> str:
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= width else text[: width - 1] + "…"


def bench_shape(label, q, k, v, timer, modes, availability, rows) -> dict[str, float]:
    """Append one row per available mode and per forced SDPA kernel; return SDPA kernel times."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    ref = slice_reference(q, k, v)
    sdpa_ms: dict[str, float] = {}

    def run_row(name, kernel, fn) -> float | None:
        ms = None
        try:
            out = fn()
            err = slice_error(out, ref)
            del out
            ms = timer.median_ms(fn)
            rows.append(
                (label, name, kernel, f"{ms:.2f}", f"{tflops(B, Lq, Lk, H, D, ms):.0f}", f"{err:.2%}", "")
            )
        except Exception as e:  # record and go on: one backend's failure is a result
            rows.append((label, name, kernel, "—", "—", "—", short(f"failed: {type(e).__name__}: {e}")))
        if q.is_cuda:
            torch.cuda.empty_cache()
        return ms

    for mode in modes:
        found = availability[mode]
        if not found.available:
            continue
        before = sum(A.rerouted_attention_calls().values())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_row(mode.value, found.kernel, lambda mode=mode: A.attention(q, k, v, mode=mode, where=label))
        if sum(A.rerouted_attention_calls().values()) > before:
            rows[-1] = (*rows[-1][:-1], "ran SDPA: outside the kernel's key-count domain")
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, D) views
    for name, backend in SDPA_KERNELS.items():

        def forced(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2)

        ms = run_row(f"sdpa[{name}]", "torch SDPA, this kernel only", forced)
        if ms is not None:
            sdpa_ms[name] = ms
    return sdpa_ms


def rule_check(label, q, k, v, sdpa_ms) -> str:
    """Does the sdpa mode pick the fastest of SDPA's kernels for this shape?"""
    pick = A.sdpa_kernel_choice(q, k, v)
    line = f"{label}: sdpa mode uses **{pick}** (torch's own pick: {torch_default_choice(q, k, v)})"
    if sdpa_ms:
        fastest = min(sdpa_ms, key=sdpa_ms.get)
        verdict = "fastest" if pick == fastest else f"NOT the fastest: {fastest} is"
        line += f"; measured fastest: {fastest} ({sdpa_ms[fastest]:.2f} ms) — pick is {verdict}"
    return line


def torch_default_choice(q, k, v) -> str:
    choose = getattr(torch, "_fused_sdp_choice", None)
    if choose is None:
        return "unknown"
    index = choose(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return sdpa.KERNEL_NAMES.get(SDPBackend(index), str(index))


def dispatch_overhead_us(device, dtype, calls=1000) -> tuple[float, float]:
    """CPU time per call: A.attention vs a direct F.scaled_dot_product_attention (tiny shape)."""
    q, k, v = make_qkv(1, 16, 16, 2, 64, dtype, device)

    def direct():
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ).transpose(1, 2)

    def dispatched():
        return A.attention(q, k, v)

    result = []
    for fn in (direct, dispatched):
        for _ in range(20):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        result.append((time.perf_counter() - t0) / calls * 1e6)
    return result[0], result[1]


def main(argv=None) -> str:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
        card = torch.cuda.get_device_name(device)
        cc = torch.cuda.get_device_capability(device)
        card += f" (sm_{cc[0]}{cc[1]})"
        cuda = f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    else:
        card, cuda = f"{device} (rehearsal, wall-clock timing)", ""
    dtype = DTYPES[args.dtype]
    modes = [AttentionMode(m) for m in args.modes] if args.modes else list(AttentionMode)
    availability = A.available_attention_modes(device)
    timer = Timer(device, args.warmup, args.repeats, min_repeats=5)
    B, H, D = args.batch, args.heads, args.head_dim

    lines = [
        f"# Attention backends on {card}",
        "",
        f"torch {torch.__version__}{cuda}. {args.dtype}, B={B}, H={H}, D={D}; median of "
        f"{timer.repeats} calls after {args.warmup} warm-up calls "
        f"({'CUDA events' if device.type == 'cuda' else 'wall clock'}). TFLOP/s = 4·B·Lq·Lk·D·H "
        "/ time. rel. err: 2 heads x 1024 queries of the output vs fp64.",
        "",
        "SDPA preference rule: "
        + "; ".join(
            f"sm_{'/'.join(str(m) for m in r.arch_majors)}x, fp16/bf16, D <= {r.max_head_dim}: "
            + " > ".join(sdpa.KERNEL_NAMES[b] for b in r.order)
            + f" ({r.evidence})"
            for r in sdpa.SDPA_RULES
        ),
        "",
        "| shape | backend | kernel | ms | TFLOP/s | rel. err | note |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    rows: list[tuple] = []
    picks = []
    for L in args.lengths:
        label = f"L={L}"
        q, k, v = make_qkv(B, L, L, H, D, dtype, device)
        sdpa_ms = bench_shape(label, q, k, v, timer, modes, availability, rows)
        picks.append(rule_check(label, q, k, v, sdpa_ms))
        del q, k, v
        if device.type == "cuda":
            torch.cuda.empty_cache()
    n = args.audio_frames * B
    label = f"audio {n}x{args.audio_queries}q x {args.audio_keys}k"
    q, _, _ = make_qkv(n, args.audio_queries, 1, H, D, dtype, device, seed=1)
    _, k, v = make_qkv(n, 1, args.audio_keys, H, D, dtype, device, seed=2)
    sdpa_ms = bench_shape(label, q, k, v, timer, modes, availability, rows)
    picks.append(rule_check("audio", q, k, v, sdpa_ms))
    del q, k, v

    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    direct, dispatched = dispatch_overhead_us(device, dtype)
    lines += [
        "",
        *[f"- {p}" for p in picks],
        f"- dispatcher CPU overhead: {dispatched - direct:.1f} µs per call "
        f"({dispatched:.1f} µs via attention() vs {direct:.1f} µs direct SDPA, tiny shape)",
        "",
        "Not available here:",
        *[f"- `{m.value}`: {a.reason}" for m, a in availability.items() if m in modes and not a.available],
    ]
    table = "\n".join(lines)
    print(table)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(table + "\n")
    return table


if __name__ == "__main__":
    main()
