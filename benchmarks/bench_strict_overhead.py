"""What strict layout mode costs on a real-size forward: i2v-14b at 832x480x81 on one CUDA GPU.

    python benchmarks/bench_strict_overhead.py                       # bf16, SDPA
    python benchmarks/bench_strict_overhead.py --quantization fp8_e4m3fn_fast
    python benchmarks/bench_strict_overhead.py --preset infinitetalk-14b --reps 5
    python benchmarks/bench_strict_overhead.py --device cpu --preset tiny-i2v   # rehearsal

The model is built with random weights directly on the GPU in bf16 (no checkpoint needed;
layouts and timings do not depend on the values). Latents [1, 16, 21, 60, 104] (832 x 480,
81 frames; ``--latents`` changes it), text [1, 512, 4096], CLIP [1, 257, 1280]. Arms, on the same model and inputs,
interleaved so that clocks and temperature drift hit them alike:

* ``no checks`` — ``LayoutContract.enforce`` replaced by a pass-through: the wrappers as if
  they had no contracts (the baseline);
* ``checks``    — contracts checked, strict mode off (the default: a violation is copied);
* ``strict``    — ``set_strict_layout(model)``: every forward strict, a violation raises.

Each arm: one warm-up forward, then the median of ``--reps`` forwards (wall time between two
``torch.cuda.synchronize()``). The checks are host-side metadata reads; while the GPU is busy
they overlap with queued kernels, so the host time spent inside them (measured separately, on
one more strict forward) is also printed: it is the cost when the host is the bottleneck.
Prints a markdown table naming the card.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import wanstudio as ws
from wanstudio import layout
from wanstudio.layout import LayoutContract, set_strict_layout


def _passthrough(self, where, **tensors):
    return tensors


def _inputs(cfg: ws.WanConfig, device: str, latents: tuple[int, int, int]) -> dict:
    g = torch.Generator(device).manual_seed(0)
    inputs = dict(
        x=torch.randn(1, cfg.out_dim, *latents, device=device, generator=g),
        t=torch.tensor([500.0], device=device),
        context=torch.randn(1, min(512, cfg.text_len), cfg.text_dim, device=device, generator=g),
    )
    if cfg.is_i2v:
        inputs["y"] = torch.randn(1, cfg.cond_dim, *latents, device=device, generator=g)
        inputs["clip_fea"] = torch.randn(1, 257, cfg.clip_dim, device=device, generator=g)
    if cfg.audio:
        f_video = cfg.vae_scale * (latents[0] - 1) + 1
        inputs["audio"] = torch.randn(
            1, 1, f_video, cfg.audio_window, cfg.audio_layers, cfg.audio_dim, device=device, generator=g
        )
    return inputs


def _forward(model, inputs) -> None:
    kw = {k: v for k, v in inputs.items() if k not in ("x", "t", "context")}
    model(inputs["x"], inputs["t"], inputs["context"], **kw)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(model, inputs) -> float:
    _sync()
    t0 = time.perf_counter()
    _forward(model, inputs)
    _sync()
    return (time.perf_counter() - t0) * 1e3


def _set_arm(model, arm: str, real) -> None:
    LayoutContract.enforce = _passthrough if arm == "no checks" else real
    set_strict_layout(model, arm == "strict")


def _host_time_in_checks(model, inputs, real) -> tuple[int, float, float]:
    """(operand checks, ms of host time inside enforce, forward ms) for one strict forward."""
    spent = [0.0]
    checks = []

    def timed_enforce(self, where, **tensors):
        t0 = time.perf_counter()
        try:
            return real(self, where, **tensors)
        finally:
            spent[0] += time.perf_counter() - t0

    LayoutContract.enforce = timed_enforce
    set_strict_layout(model, True)
    try:
        with layout.listen(checks.append):
            ms = _timed(model, inputs)
    finally:
        LayoutContract.enforce = real
        set_strict_layout(model, False)
    return len(checks), spent[0] * 1e3, ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="i2v-14b")
    p.add_argument("--quantization", default="disabled", choices=ws.QUANT_MODES)
    p.add_argument("--attention", default="sdpa", choices=ws.ATTENTION_MODES)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument(
        "--latents",
        type=int,
        nargs=3,
        default=(21, 60, 104),
        metavar=("F", "H", "W"),
        help="latent frames, height, width (default: 81 frames at 832 x 480)",
    )
    p.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a rehearsal)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (--device cpu only rehearses it)")

    if args.device == "cuda":
        cap = torch.cuda.get_device_capability()
        card = f"{torch.cuda.get_device_name()} (compute capability {cap[0]}.{cap[1]})"
    else:
        card = "CPU (rehearsal)"
    cfg = ws.WanConfig.preset(args.preset)
    torch.manual_seed(0)
    model = ws.WanModel(cfg, device=args.device, dtype=torch.bfloat16).eval()
    if args.quantization != "disabled":
        from wanstudio.quant import quantize

        quantize(model, args.quantization)
    if args.attention != "sdpa":
        from wanstudio.attention import set_attention

        set_attention(model, args.attention)
    latents = tuple(args.latents)
    inputs = _inputs(cfg, args.device, latents)

    real = LayoutContract.enforce
    arms = ("no checks", "checks", "strict")
    times: dict[str, list[float]] = {a: [] for a in arms}
    try:
        with torch.no_grad():
            for arm in arms:  # warm-up: cuDNN / cuBLAS plans, allocator, Triton autotune
                _set_arm(model, arm, real)
                _timed(model, inputs)
            for i in range(args.reps):
                for arm in arms if i % 2 == 0 else arms[::-1]:
                    _set_arm(model, arm, real)
                    times[arm].append(_timed(model, inputs))
            checks, host_ms, strict_ms = _host_time_in_checks(model, inputs, real)
    finally:
        LayoutContract.enforce = real
        set_strict_layout(model, False)

    base = statistics.median(times["no checks"])
    pt, ph, pw = cfg.patch_size
    tokens = latents[0] // pt * (latents[1] // ph) * (latents[2] // pw)
    print(
        f"\n{card}, torch {torch.__version__}; "
        f"{args.preset} bf16, quantization {args.quantization}, attention {args.attention}, "
        f"latents {list(latents)} ({tokens} tokens), median of {args.reps} forwards per arm\n"
    )
    print("| card | arm | median forward (ms) | all (ms) | vs no checks |")
    print("|---|---|---:|---|---:|")
    for arm in arms:
        med = statistics.median(times[arm])
        runs = ", ".join(f"{t:.0f}" for t in times[arm])
        print(f"| {card} | {arm} | {med:.1f} | {runs} | {100 * (med / base - 1):+.2f} % |")
    print(
        f"\n{checks} operand checks per forward; host time inside the checks: {host_ms:.2f} ms "
        f"({100 * host_ms / strict_ms:.3f} % of that {strict_ms:.0f} ms strict forward, "
        f"{1e3 * host_ms / max(checks, 1):.1f} us per operand)"
    )


if __name__ == "__main__":
    main()
