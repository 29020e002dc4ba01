"""GGUF Q8_0 weights (``gguf_q8_0``) on the GPU vs bf16 and fp8 ``_scaled``: one Wan forward.

    python benchmarks/bench_gguf.py                      # i2v-14b, 480p, 81 frames (~3 min on an H200)
    python benchmarks/bench_gguf.py --blocks 1           # one block at real size (~30 s)
    python benchmarks/bench_gguf.py --output benchmarks/results/h200_gguf.md
    python benchmarks/bench_gguf.py --device cpu --preset tiny-i2v --size 64x64 --frames 5 --m 256  # rehearsal

A model of the preset's shapes with random (default-init) weights is built once in bf16; each
mode is a copy quantized with ``wanstudio.quant.quantize`` (Q8_0 with GGML's rounding, exactly
what a GGUF Q8_0 file holds). Per mode: median forward time (CUDA events, ``--repeats`` after
one warm-up), the bytes of the model's weights, the forward's peak VRAM above them (the
activations and the per-layer dequantized weight), the VRAM the mode needs alone (both) and the
output's SQNR against the bf16 forward. Then the Q8_0 parts alone at the 14B Linear shapes: the
fused Triton dequantization vs eager, and a Q8_0 Linear vs ``F.linear`` in bf16 at M tokens.
``--device cpu`` times wall-clock and only rehearses the script.
"""

from __future__ import annotations

import argparse
import copy
import gc
import platform
import sys
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_timing import Timer  # noqa: E402

from wanstudio import ModelInputs, WanConfig, WanModel  # noqa: E402
from wanstudio.bench import forward_flops  # noqa: E402
from wanstudio.quant import QuantizedLinear, kernels, q8_0, quantize, sqnr_db  # noqa: E402

MODES = ["disabled", "gguf_q8_0", "fp8_e4m3fn_scaled", "fp8_e4m3fn_scaled_fast"]
LINEAR_SHAPES = [(5120, 5120), (13824, 5120), (5120, 13824)]  # (N, K): out, in
GIB = 2**30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="i2v-14b")
    p.add_argument("--blocks", type=int, default=None, help="run this many blocks (default: the preset's)")
    p.add_argument("--size", default="832x480", help="video width x height in pixels")
    p.add_argument("--frames", type=int, default=81, help="video frames (latent frames: (F - 1) / 4 + 1)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated quantization modes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--m", type=int, default=32760, help="tokens of the Linear-alone part (480p: 32,760)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--output", default=None, help="also write the markdown here")
    return p.parse_args(argv)


def weight_bytes(model: nn.Module) -> int:
    return sum(t.nbytes for t in model.state_dict().values())


def inputs_for(cfg: WanConfig, args, device: torch.device) -> dict:
    width, height = map(int, args.size.split("x"))
    return ModelInputs.example(
        cfg,
        frames=(args.frames - 1) // 4 + 1,
        height=height // 8,
        width=width // 8,
        text_tokens=cfg.text_len if device.type == "cuda" else 16,
        clip_tokens=257,
        t=500.0,
        device=device,
        dtype=torch.bfloat16,
    ).as_kwargs()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model: nn.Module, inputs: dict, timer: Timer, device: torch.device):
    """(median ms, peak bytes above the resident tensors, output) of one forward."""
    with torch.no_grad():
        sync(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        out = model(**inputs).float()
        peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else 0
        ms = timer.median_ms(lambda: model(**inputs))
    return ms, peak, out


def model_rows(args, device: torch.device) -> list[str]:
    cfg = WanConfig.preset(args.preset)
    if args.blocks:
        cfg = cfg.replace(num_layers=args.blocks)
    width, height = map(int, args.size.split("x"))
    flops = forward_flops(cfg, args.frames, width, height)
    torch.manual_seed(0)
    base = WanModel(cfg, device=device, dtype=torch.bfloat16).eval()
    inputs = inputs_for(cfg, args, device)
    timer = Timer(device, warmup=1, repeats=args.repeats, min_repeats=1)
    rows = [
        f"### {args.preset}, {cfg.num_layers} blocks, {args.size}, {args.frames} frames "
        f"({flops['tokens']:,} tokens), random weights",
        "",
        "| mode | forward ms | vs bf16 | weights GiB | forward peak above weights GiB | VRAM alone GiB | "
        "SQNR vs bf16 dB | path of blocks.0.ffn.0 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    reference = None
    base_ms = None
    for mode in args.modes.split(","):
        model = base if mode == "disabled" else quantize(copy.deepcopy(base), mode)
        ms, peak, out = measure(model, inputs, timer, device)
        if reference is None:
            reference, base_ms = out, ms
        layer = model.blocks[0].ffn[0]
        path = layer.path_detail if isinstance(layer, QuantizedLinear) else "F.linear, bf16"
        wbytes = weight_bytes(model)
        sqnr = "—" if mode == "disabled" else f"{sqnr_db(reference, out):.1f}"
        rows.append(
            f"| {mode} | {ms:.0f} | {base_ms / ms:.2f}x | {wbytes / GIB:.2f} | {peak / GIB:.2f} | "
            f"{(wbytes + peak) / GIB:.2f} | {sqnr} | {path} |"
        )
        print(rows[-1], flush=True)
        if model is not base:
            del model
        del out
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def linear_rows(args, device: torch.device) -> list[str]:
    timer = Timer(device, warmup=2, repeats=max(5, args.repeats), min_repeats=3)
    shapes = LINEAR_SHAPES if device.type == "cuda" else [(256, 256)]
    rows = [
        "",
        f"### Q8_0 parts alone (M = {args.m:,} tokens)",
        "",
        "| N x K | dequantize fused ms | eager ms | bit-exact | F.linear bf16 ms | Q8_0 Linear ms | "
        "Q8_0 / bf16 |",
        "|---|---|---|---|---|---|---|",
    ]
    g = torch.Generator(device=device).manual_seed(0)
    for n, k in shapes:
        w = torch.randn(n, k, generator=g, device=device) * 0.02
        q, d = q8_0.quantize_q8_0(w)
        eager_ms = timer.median_ms(lambda q=q, d=d, k=k: q8_0.dequantize_q8_0(q, d, k, torch.bfloat16))
        if kernels.use_triton(q):
            fused_ms = timer.median_ms(
                lambda q=q, d=d, k=k: kernels.dequantize_q8_0_triton(q, d, k, torch.bfloat16)
            )
            same = torch.equal(
                kernels.dequantize_q8_0_triton(q, d, k, torch.bfloat16),
                q8_0.dequantize_q8_0(q, d, k, torch.bfloat16),
            )
            fused, exact = f"{fused_ms:.3f}", "yes" if same else "NO"
        else:
            fused, exact = "—", "—"
        x = torch.randn(args.m, k, generator=g, device=device).to(torch.bfloat16)
        lin = nn.Linear(k, n, device=device, dtype=torch.bfloat16)
        layer = QuantizedLinear.from_linear(lin, "gguf_q8_0")
        with torch.no_grad():
            bf16_ms = timer.median_ms(lambda x=x, lin=lin: F.linear(x, lin.weight, lin.bias))
            q8_ms = timer.median_ms(lambda x=x, layer=layer: layer(x))
        rows.append(
            f"| {n} x {k} | {fused} | {eager_ms:.3f} | {exact} | {bf16_ms:.2f} | {q8_ms:.2f} | "
            f"{q8_ms / bf16_ms:.3f}x |"
        )
        print(rows[-1], flush=True)
        del w, q, d, x, lin, layer
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here: run on the GPU machine, or --device cpu to rehearse", file=sys.stderr)
        return 2
    card = (
        f"{torch.cuda.get_device_name(device)} (cc {'.'.join(map(str, torch.cuda.get_device_capability(device)))})"
        if device.type == "cuda"
        else platform.processor() or "CPU"
    )
    head = [
        f"# GGUF Q8_0 vs bf16 and fp8 ({date.today()})",
        "",
        f"{card}, torch {torch.__version__}, Triton {'yes' if kernels.HAS_TRITON else 'no'}. "
        f"`python benchmarks/bench_gguf.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
        "",
    ]
    rows = head + model_rows(args, device) + linear_rows(args, device)
    text = "\n".join(rows) + "\n"
    print("\n" + text)
    if args.output:
        Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
