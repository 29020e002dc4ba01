"""Forward time, peak VRAM and copy overlap of block swap at i2v-14b; print a markdown table.

    python benchmarks/bench_block_swap.py                    # i2v-14b bf16, 832x480, 81 frames
    python benchmarks/bench_block_swap.py --quantization fp8_e4m3fn_scaled
    python benchmarks/bench_block_swap.py --output benchmarks/block_swap_h100.md

One model with random weights is built directly on the GPU (nothing 14B-sized is ever
materialised on the host: swapped blocks go from the GPU into pinned host memory one block
at a time). Then for each ``--blocks`` N (default 0, 20, 40), in one process with the same
attention backend (the model's default, sdpa): ``--warmup`` forwards, then ``--repeats``
timed forwards (CUDA events; the median is reported), peak VRAM
(``torch.cuda.max_memory_allocated`` over the timed forwards), and from
``model.block_swap_stats`` the per-forward copy time and how much of it hid behind compute.
N = 0 is measured again at the end (after ``disable_block_swap``) to show the baseline did
not drift. The target: all 40 blocks swapped costs at most 5% over resident.

``--device cpu --preset tiny-i2v --frames 9 --height 64 --width 96`` rehearses the script
without a GPU (FakeTransferBackend, wall-clock timing).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_timing import time_ms  # noqa: E402

from wanstudio import WanConfig, WanModel  # noqa: E402
from wanstudio.offload import (  # noqa: E402
    FakeTransferBackend,
    disable_block_swap,
    enable_block_swap,
)

GIB = 1 << 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="i2v-14b")
    p.add_argument("--blocks", type=int, nargs="+", default=[0, 20, 40])
    p.add_argument("--prefetch", type=int, default=1)
    p.add_argument("--frames", type=int, default=81, help="video frames (4k + 1)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quantization", default="disabled", help="a QuantMode name (wanstudio.quant)")
    p.add_argument("--no-recheck", action="store_true", help="skip re-measuring N=0 at the end")
    p.add_argument("--device", default="cuda")
    p.add_argument("--output", type=Path, default=None, help="also write the table here")
    return p.parse_args(argv)


def make_inputs(cfg: WanConfig, args, device) -> tuple[dict, tuple[int, int, int], int]:
    """Random latents for a (frames, height, width) video: [1, 16, 1 + (F-1)/4, H/8, W/8]."""
    f = 1 + (args.frames - 1) // 4
    h, w = args.height // 8, args.width // 8
    g = torch.Generator(device=device).manual_seed(1)
    kw = dict(
        x=torch.randn(1, cfg.out_dim, f, h, w, device=device, generator=g),
        t=torch.tensor([500.0], device=device),
        context=torch.randn(1, cfg.text_len, cfg.text_dim, device=device, generator=g),
    )
    if cfg.is_i2v:
        kw["y"] = torch.randn(1, cfg.cond_dim, f, h, w, device=device, generator=g)
        kw["clip_fea"] = torch.randn(1, 257, cfg.clip_dim, device=device, generator=g)
    tokens = f * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
    return kw, (f, h, w), tokens


def measure(model, inputs, args, device, n: int, backend) -> dict:
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    enable_block_swap(model, n, prefetch=args.prefetch, device=device if cuda else None, backend=backend)
    if cuda:
        torch.cuda.synchronize()
    enable_s = time.perf_counter() - t0

    def forward():
        with torch.inference_mode():
            model(
                inputs["x"],
                inputs["t"],
                inputs["context"],
                **{k: v for k, v in inputs.items() if k not in ("x", "t", "context")},
            )

    for _ in range(args.warmup):
        time_ms(forward, device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = [time_ms(forward, device) for _ in range(args.repeats)]
    row = dict(
        n=n,
        ms=statistics.median(times),
        times=times,
        peak=torch.cuda.max_memory_allocated() if cuda else 0,
        enable_s=enable_s,
        rss=psutil.Process().memory_info().rss,
    )
    stats = getattr(model, "block_swap_stats", None)
    if stats is not None:
        steps = stats.steps[-args.repeats :]
        row.update(
            copy=statistics.median(s.copy_ms for s in steps),
            hidden=statistics.median(s.hidden_ms for s in steps),
            exposed=statistics.median(s.exposed_ms for s in steps),
            on_gpu=stats.bytes_on_gpu,
            pinned=stats.bytes_pinned,
            host_memory=stats.host_memory,
            summary=stats.summary(),
        )
    else:
        row.update(on_gpu=sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]))
    return row


def table(rows: list[dict], header: list[str]) -> str:
    base = rows[0]["ms"]
    lines = [
        *header,
        "",
        "| blocks swapped | forward ms (median) | vs resident | peak VRAM GiB | weights on GPU GiB "
        "| pinned host GiB | copy ms / forward | hidden ms | exposed ms | enable s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        swap = "copy" in r
        lines.append(
            f"| {r['label']} | {r['ms']:.1f} | {100 * (r['ms'] / base - 1):+.1f}% | "
            f"{r['peak'] / GIB:.2f} | {r['on_gpu'] / GIB:.2f} | "
            f"{r['pinned'] / GIB if swap else 0:.2f} | "
            f"{r['copy'] if swap else 0:.1f} | {r['hidden'] if swap else 0:.1f} | "
            f"{r['exposed'] if swap else 0:.1f} | {r['enable_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = WanConfig.preset(args.preset)
    bad = [n for n in args.blocks if not 0 <= n <= cfg.num_layers]
    if bad:
        raise SystemExit(f"--blocks {bad}: {args.preset} has {cfg.num_layers} blocks")
    backend = None if cuda else FakeTransferBackend()

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = WanModel(cfg, device=device, dtype=dtype).eval().requires_grad_(False)
    if args.quantization != "disabled":
        from wanstudio.quant import quantize

        quantize(model, args.quantization)
    if cuda:
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    inputs, latent, tokens = make_inputs(cfg, args, device)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    print(
        f"built {args.preset} ({weights / GIB:.2f} GiB of weights, {args.quantization}) on "
        f"{device} in {build_s:.1f} s; latents {latent} = {tokens} tokens",
        flush=True,
    )

    rows = []
    plan = list(args.blocks) + ([0] if not args.no_recheck and 0 in args.blocks else [])
    for i, n in enumerate(plan):
        row = measure(model, inputs, args, device, n, backend)
        row["label"] = str(n) if i < len(args.blocks) else f"{n} (again, after disable)"
        rows.append(row)
        times = ", ".join(f"{t:.1f}" for t in row["times"])
        print(
            f"N={row['label']}: {row['ms']:.1f} ms (runs {times}); peak "
            f"{row['peak'] / GIB:.2f} GiB; host RSS {row['rss'] / GIB:.2f} GiB",
            flush=True,
        )
        if "summary" in row:
            print(row["summary"], flush=True)
    disable_block_swap(model)

    card = torch.cuda.get_device_name(device) if cuda else "CPU (rehearsal, simulated copies)"
    host = next((r["host_memory"] for r in rows if "host_memory" in r), "-")
    header = [
        f"Block swap, {args.preset} {str(dtype).replace('torch.', '')} "
        f"(quantization {args.quantization}), {args.width}x{args.height}, {args.frames} frames: "
        f"latents {latent}, {tokens} tokens; attention sdpa (model default); prefetch "
        f"{args.prefetch}; median of {args.repeats} forwards after {args.warmup} warm-up.",
        f"Card: {card}; torch {torch.__version__}"
        + (f", CUDA {torch.version.cuda}" if cuda else "")
        + f"; host memory pinned with {host}.",
    ]
    if 0 in args.blocks and max(args.blocks) > 0:
        full = [r for r in rows if r["n"] == max(args.blocks)][0]
        header.append(
            f"{full['n']} of {cfg.num_layers} blocks swapped vs resident: "
            f"{100 * (full['ms'] / rows[0]['ms'] - 1):+.1f}% (target: at most +5%)."
        )
    text = table(rows, header)
    print()
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
