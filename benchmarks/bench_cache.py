"""Step caches on the GPU: the DiT calls of one 81-frame 480p clip, uncached vs TeaCache / MagCache.

The real InfiniteTalk-14B shapes (832x480, 81 frames = 21 latent frames, 32,760 tokens, 512 text
and 257 CLIP tokens), random bf16 weights built on the GPU, an Euler loop of 40 steps at shift 7
with text 5 / audio 4 guidance: 3 DiT calls per step (cond, drop-text, uncond). Each mode runs
the same loop from the same noise; the table gives its wall time, the DiT calls it computed and
skipped, and the PSNR of its final latents against the uncached run's.

Random weights, no trained model: TeaCache's e0 signal comes from a random time embedding, which
is not smooth in t (e0 changes ~50-70% between steps, rescaled to ~5e4), so e0-TeaCache skips
nothing here; that says nothing about the trained model. MagCache's pattern depends on the step
count only, so it is the real one. The PSNR measures how far reuse moves *this* random model's
trajectory, not video quality.

    python benchmarks/bench_cache.py            # all 40 blocks: ~15 min eager on an H200
    python benchmarks/bench_cache.py --quick    # 6 of the 40 blocks, same shapes: ~3.5 min
    python benchmarks/bench_cache.py --quick --modes none teacache magcache teacache:modulated
    python benchmarks/bench_cache.py --compile --quant fp8_e4m3fn_scaled_fast --teacache-threshold 0.3

The full compiled run is longer than one 10-minute device call; split it, the uncached run
first (its final latents and seconds saved), the rest later against that reference:

    python benchmarks/bench_cache.py --compile --quant fp8_e4m3fn_scaled_fast \
        --modes none teacache:modulated --save-reference ref.pt
    python benchmarks/bench_cache.py --compile --quant fp8_e4m3fn_scaled_fast \
        --modes magcache --reference ref.pt
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time

import torch

import wanstudio as ws
from wanstudio.cache import make_cache
from wanstudio.pipeline.guidance import Condition, Guidance, GuidanceConfig
from wanstudio.pipeline.sampler import EulerSampler


def build(preset: str, layers: int | None, quant: str, compile_blocks: bool, device: str) -> ws.WanModel:
    cfg = ws.WanConfig.preset(preset)
    if layers:
        cfg = cfg.replace(num_layers=layers)
    torch.manual_seed(0)
    model = ws.WanModel(cfg, device=device, dtype=torch.bfloat16).eval().requires_grad_(False)
    ws.quantize(model, quant)
    if compile_blocks:
        ws.compile_blocks(model)
    return model


def conditions(cfg: ws.WanConfig, frames: int, width: int, height: int, device: str) -> dict:
    """Per condition, the ModelInputs fields other than x and t (real text / CLIP lengths)."""
    shape = dict(frames=(frames - 1) // 4 + 1, height=height // 8, width=width // 8)
    kw = dict(text_tokens=cfg.text_len, clip_tokens=257, device=device, dtype=torch.bfloat16)
    cond = ws.ModelInputs.example(cfg, seed=1, **shape, **kw)
    negative = ws.ModelInputs.example(cfg, seed=2, **shape, **kw).context  # the negative prompt
    silent = torch.zeros_like(cond.audio) if cond.audio is not None else None
    return {
        Condition.COND: (cond.context, cond.audio),
        Condition.DROP_TEXT: (negative, cond.audio),
        Condition.UNCOND: (negative, silent),
        "x": cond.x.float(),
        "fixed": (cond.clip_fea, cond.y),
    }


def run(model, cache, parts: dict, steps: int, shift: float) -> tuple[torch.Tensor, float]:
    """One clip's sampling loop; returns (final latents fp32 on the CPU, seconds)."""
    sampler = EulerSampler(steps, shift)
    guidance = Guidance(GuidanceConfig(text_scale=5.0, audio_scale=4.0))
    clip_fea, y = parts["fixed"]
    x = parts["x"].clone()
    cache.reset()
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        for i, t in enumerate(sampler.timesteps):
            t_b = t.reshape(1).to(x.device)

            def predict(c, x=x, i=i, t_b=t_b):
                context, audio = parts[c]
                inputs = ws.ModelInputs(x, t_b, context, clip_fea, y, audio)
                return cache.forward(model, inputs, c, i, steps)

            x = sampler.step(guidance(predict), i, x)
    sync()
    return x.float().cpu(), time.perf_counter() - start


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    """10 log10(range(ref)^2 / MSE) in dB (inf when identical)."""
    mse = (out.double() - ref.double()).pow(2).mean().item()
    span = (ref.max() - ref.min()).item()
    return math.inf if mse == 0 else 10 * math.log10(span**2 / mse)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="infinitetalk-14b")
    p.add_argument("--quick", action="store_true", help="6 blocks instead of all (same shapes)")
    p.add_argument("--layers", type=int, default=None, help="blocks to build (default: all, 6 with --quick)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--shift", type=float, default=7.0)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--quant", default="disabled")
    p.add_argument("--compile", action="store_true")
    p.add_argument(
        "--modes", nargs="+", default=["none", "teacache", "magcache"], help="also e.g. teacache:modulated"
    )
    p.add_argument("--teacache-threshold", type=float, default=None)
    p.add_argument("--teacache-indicator", default="e0")
    p.add_argument("--magcache-threshold", type=float, default=None)
    p.add_argument("--magcache-k", type=int, default=2)
    p.add_argument("--device", default="cuda", help="cuda; cpu (with a tiny --preset) checks the script")
    p.add_argument("--save-reference", default=None, help="save the uncached run's latents and seconds here")
    p.add_argument("--reference", default=None, help="an uncached run saved earlier: 'none' is not run again")
    args = p.parse_args(argv)
    layers = args.layers or (6 if args.quick else None)
    width, height = args.width, args.height

    model = build(args.preset, layers, args.quant, args.compile, args.device)
    parts = conditions(model.config, args.frames, width, height, args.device)
    cuda = model.device.type == "cuda"
    warm = make_cache("none")  # one untimed step: kernels chosen, blocks compiled
    with torch.inference_mode():
        c, a = parts[Condition.COND]
        t = torch.tensor([999.0], device=model.device)
        warm.forward(model, ws.ModelInputs(parts["x"], t, c, *parts["fixed"], a), "warm-up", 0, 1)

    options = {
        "none": {},
        "teacache": dict(
            threshold=args.teacache_threshold, indicator=args.teacache_indicator, size_class="480"
        ),
        "magcache": dict(threshold=args.magcache_threshold, max_skip_steps=args.magcache_k, size_class="480"),
    }
    rows, reference = [], None
    if args.reference:  # same settings, same seed: the saved uncached run stands in for 'none'
        saved = torch.load(args.reference)
        reference, base = saved["latents"], saved["seconds"]
        print(f"reference: the uncached run in {args.reference}, {base:.1f} s", flush=True)
    modes = [m for m in args.modes if m != "none"]
    for mode in modes if reference is not None else ["none", *modes]:
        name, _, indicator = mode.partition(":")  # "teacache:modulated": another indicator
        kw = {**options[name], **({"indicator": indicator} if indicator else {})}
        cache = make_cache(name, **kw)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        latents, seconds = run(model, cache, parts, args.steps, args.shift)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        summary = cache.summary()
        if reference is None:
            reference, base = latents, seconds
            if args.save_reference:
                torch.save({"latents": latents, "seconds": seconds}, args.save_reference)
        rows.append((mode, summary, seconds, base / seconds, psnr(latents, reference), peak))
        print(summary, flush=True)
        for key in (Condition.COND, Condition.UNCOND):
            print(f"  {key.name.lower()} skipped steps: {list(summary.skipped_steps(key))}", flush=True)
        values = [
            round(d.value, 4) for d in summary.decisions if d.key is Condition.COND and d.value is not None
        ]
        if values:  # what was compared with the threshold, first steps that were considered
            print(f"  cond accumulated values: {values[:10]}", flush=True)
        gc.collect()

    n = model.config.num_layers
    print(
        f"\nCard: {torch.cuda.get_device_name() if cuda else 'CPU'}, torch {torch.__version__}; {args.preset} with {n} of "
        f"{ws.WanConfig.preset(args.preset).num_layers} blocks, random bf16 weights, quantization "
        f"{args.quant}, {'compiled blocks' if args.compile else 'eager'}; {width}x{height}, {args.frames} frames; "
        f"{args.steps} Euler steps at shift {args.shift}, text 5 / audio 4 (3 DiT calls per step)\n"
    )
    print(
        "| cache | settings | DiT calls computed / skipped | seconds | speed-up | PSNR vs none dB | peak GiB |"
    )
    print("|---|---|---|---|---|---|---|")
    for mode, s, seconds, speedup, db, peak in rows:
        calls = f"{s.calls - s.skipped_calls} / {s.skipped_calls}"
        print(f"| {mode} | {s.detail} | {calls} | {seconds:.1f} | {speedup:.2f}x | {db:.1f} | {peak:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
