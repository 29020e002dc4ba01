"""``wanstudio bench`` (also ``benchmarks/dit_step.py``): one DiT forward at Wan-14B shapes,
wanstudio in each mode, diffusers in the same run, and the roofline of this card.

Weights are random and built directly on the GPU (never on the host). Each row is the median of
>= 5 forwards timed with CUDA events after one warm-up. FLOPs per forward are counted from the
config (formula in `forward_flops`); "attainable" divides them by the GEMM and attention rates
measured in the same run at the model's own shapes.

    wanstudio bench --suite roofline matrix peer --compile --quant disabled fp8_e4m3fn_scaled_fast
    wanstudio bench --suite matrix --quant disabled fp8_e4m3fn_fast --attention sdpa sageattn --swap 0 40
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from .config import WanConfig
from .model import ModelInputs, WanModel
from .options import AttentionMode, QuantMode, parse_option
from .quant import sqnr_db

SIZES = {"480p": (832, 480), "720p": (1280, 720)}


# --- timing (shared with the scripts in benchmarks/) -------------------------------------------------
def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """One call of ``fn``, in milliseconds (device time on CUDA: events around the call)."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


class Timer:
    """Median of ``repeats`` (at least ``min_repeats``) calls after ``warmup`` untimed ones."""

    def __init__(self, device, warmup: int = 1, repeats: int = 5, min_repeats: int = 3):
        self.device, self.warmup, self.repeats = torch.device(device), warmup, max(min_repeats, repeats)

    def median_ms(self, fn: Callable[[], object]) -> float:
        """Median time of ``fn`` in ms over ``repeats`` calls, after ``warmup`` untimed calls."""
        for _ in range(self.warmup):
            fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return statistics.median(time_ms(fn, self.device) for _ in range(self.repeats))


# --- the arithmetic ------------------------------------------------------------------------------
def forward_flops(cfg: WanConfig, frames: int, width: int, height: int, speakers: int = 1) -> dict:
    """FLOPs of one forward (multiply-add = 2), split into linear layers and attention."""
    f = (frames - 1) // 4 + 1
    L = f * (height // 16) * (width // 16)
    D, F, T = cfg.dim, cfg.ffn_dim, cfg.text_len
    img = 257 if cfg.is_i2v else 0
    per_block_linear = 2 * L * D * D * 4 + 2 * L * D * D * 2 + 2 * T * D * D * 2 + 2 * L * D * F * 2
    per_block_attn = 4 * L * L * D + 4 * L * T * D
    if cfg.is_i2v:
        per_block_linear += 2 * img * D * D * 2
        per_block_attn += 4 * L * img * D
    if cfg.audio:
        n_audio = cfg.context_tokens * speakers
        per_block_linear += 2 * L * D * D * 2 + 2 * f * n_audio * cfg.output_dim * 2 * D
        per_block_attn += 4 * L * n_audio * D
    return {
        "tokens": L,
        "linear": per_block_linear * cfg.num_layers,
        "attention": per_block_attn * cfg.num_layers,
    }


# --- inputs and models ---------------------------------------------------------------------------
def make_inputs(cfg: WanConfig, frames: int, width: int, height: int, dtype=torch.bfloat16) -> dict:
    """Seeded inputs of one forward for a video of frames x height x width pixels, on the GPU.

    Full text length, 257 CLIP tokens, t = 500; features in ``dtype`` (the model casts them to
    its own anyway).
    """
    inputs = ModelInputs.example(
        cfg,
        frames=(frames - 1) // 4 + 1,
        height=height // 8,
        width=width // 8,
        text_tokens=cfg.text_len,
        clip_tokens=257,
        t=500.0,
        device="cuda",
        dtype=dtype,
    )
    return inputs.as_kwargs()


def run_model(model, inputs: dict):
    """One forward with the inputs of :func:`make_inputs`."""
    return model(**inputs)


def build(preset: str, seed: int = 0) -> WanModel:
    """A seeded random-weight bf16 WanModel of ``preset``, built directly on the GPU, in eval mode."""
    torch.manual_seed(seed)
    return WanModel(WanConfig.preset(preset), device="cuda", dtype=torch.bfloat16).eval()


def free() -> None:
    """Release what the caller has dropped, compiled graphs (they hold their model's weights) too."""
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


@dataclass
class Row:
    """One row of the report: a runtime in one mode, its median ms, peak GiB, TFLOP/s and a note."""

    name: str
    preset: str
    size: str
    quant: str
    attention: str
    swap: int
    ms: float
    peak_gib: float
    tflops: float
    note: str = ""


# --- suites --------------------------------------------------------------------------------------
def measure(model, inputs, flops: dict, reps: int) -> tuple[float, float, float]:
    """(median ms, peak allocated GiB, achieved TFLOP/s) of ``reps`` forwards of ``model``."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        ms = Timer("cuda", 1, reps).median_ms(lambda: run_model(model, inputs))
    peak = torch.cuda.max_memory_allocated() / 2**30
    return ms, peak, (flops["linear"] + flops["attention"]) / (ms * 1e-3) / 1e12


def suite_matrix(args, rows: list[Row], reference: dict) -> None:
    """wanstudio's DiT in every requested preset x quant x attention x swap, appended to ``rows``;
    SQNR against each preset's bf16 output (computed once, kept in ``reference``). Each combination
    is a ``RuntimeModes`` applied with ``apply_modes``, the path every other entry point takes."""
    from .attention import available_attention_modes
    from .modes import RuntimeModes, apply_modes

    width, height = SIZES[args.size]
    for preset in args.presets:
        cfg = WanConfig.preset(preset)
        flops = forward_flops(cfg, args.frames, width, height)
        inputs = make_inputs(cfg, args.frames, width, height)
        avail = available_attention_modes("cuda")
        for qname in args.quant:
            quant = parse_option(QuantMode, qname)
            model = build(preset)
            if preset not in reference:  # the bf16 output every mode's SQNR is measured against
                with torch.no_grad():
                    reference[preset] = run_model(model, inputs).float().cpu()
            for aname in args.attention:
                mode = parse_option(AttentionMode, aname)
                if not avail[mode].available:
                    print(f"skip {aname}: {avail[mode].reason}", flush=True)
                    continue
                for swap in args.swap:
                    modes = RuntimeModes(
                        quantization=quant,
                        attention=mode,
                        blocks_to_swap=swap,
                        prefetch=args.prefetch,
                        compile=args.compile,
                    )
                    apply_modes(model, modes)  # quantizes once; later calls change attention / swap
                    ms, peak, tflops = measure(model, inputs, flops, args.reps)
                    with torch.no_grad():
                        out = run_model(model, inputs).float().cpu()
                    sqnr = sqnr_db(out, reference[preset])
                    note = f"SQNR {sqnr:.1f} dB"
                    if swap:
                        step = model.block_swap_stats.last_step
                        note += f"; copies {step.copy_ms:.0f} ms, exposed {step.exposed_ms:.0f} ms"
                        apply_modes(model, modes.replace(blocks_to_swap=0))  # every block back on the GPU
                    name = "wanstudio" + (" (compiled blocks)" if args.compile else "")
                    rows.append(Row(name, preset, args.size, qname, aname, swap, ms, peak, tflops, note))
                    print(rows[-1], flush=True)
            del model
            free()


def suite_peer(args, rows: list[Row], reference: dict) -> None:
    """diffusers' WanTransformer3DModel with the same weights and inputs: eager, and group offload."""
    import diffusers

    from .checkpoints import diffusers_to_official

    width, height = SIZES[args.size]
    preset = args.presets[0]
    cfg = WanConfig.preset(preset)
    if cfg.audio:
        preset, cfg = "i2v-14b", WanConfig.preset("i2v-14b")
    flops = forward_flops(cfg, args.frames, width, height)
    inputs = make_inputs(cfg, args.frames, width, height)
    model = build(preset)
    host = {k: v.cpu() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ours = run_model(model, inputs).float().cpu()
    del model
    free()
    kw = dict(
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        text_dim=cfg.text_dim,
    )
    if cfg.is_i2v:
        kw.update(image_dim=cfg.clip_dim, added_kv_proj_dim=cfg.dim)
    torch.set_default_dtype(torch.bfloat16)  # built straight on the GPU in bf16, as ours
    try:
        with torch.device("cuda"):
            twin = diffusers.WanTransformer3DModel(**kw).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    names = {diffusers_to_official(k): k for k in twin.state_dict()}
    twin.load_state_dict({names[k]: v for k, v in host.items()})
    del host
    hidden = torch.cat([inputs["x"], inputs["y"]], 1).bfloat16() if cfg.is_i2v else inputs["x"].bfloat16()

    def call():
        return twin(
            hidden_states=hidden,
            timestep=inputs["t"],
            encoder_hidden_states=inputs["context"],
            encoder_hidden_states_image=inputs.get("clip_fea"),
            return_dict=False,
        )[0]

    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        ms = Timer("cuda", 1, args.reps).median_ms(call)
        theirs = call().float().cpu()
    peak = torch.cuda.max_memory_allocated() / 2**30
    tflops = (flops["linear"] + flops["attention"]) / (ms * 1e-3) / 1e12
    note = f"same weights; SQNR of ours vs theirs {sqnr_db(ours, theirs):.1f} dB"
    rows.append(Row("diffusers eager", preset, args.size, "bf16", "default", 0, ms, peak, tflops, note))
    print(rows[-1], flush=True)
    if "peer-offload" in args.suite:
        twin = twin.to("cpu")
        free()
        twin.enable_group_offload(
            onload_device=torch.device("cuda"),
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=True,
        )
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            ms = Timer("cuda", 1, args.reps).median_ms(call)
        peak = torch.cuda.max_memory_allocated() / 2**30
        rows.append(
            Row(
                "diffusers group offload",
                preset,
                args.size,
                "bf16",
                "default",
                cfg.num_layers,
                ms,
                peak,
                (flops["linear"] + flops["attention"]) / (ms * 1e-3) / 1e12,
                "block_level, 1 block per group, stream",
            )
        )
        print(rows[-1], flush=True)
    twin = None  # noqa: F841  (the closure above holds the name)
    free()


def suite_roofline(args, rows: list[Row], reference: dict) -> dict:
    """GEMM and attention rates at the model's own shapes on this card."""
    import torch.nn.functional as F

    width, height = SIZES[args.size]
    cfg = WanConfig.preset(args.presets[0])
    L = forward_flops(cfg, args.frames, width, height)["tokens"]
    D, Fd = cfg.dim, cfg.ffn_dim
    rates = {}
    for name, (k, n) in {"qkvo": (D, D), "ffn_up": (D, Fd), "ffn_down": (Fd, D)}.items():
        a = torch.randn(L, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        ms = Timer("cuda", 1, 10).median_ms(lambda: F.linear(a, w))  # noqa: B023
        rates[f"bf16 {name}"] = 2 * L * k * n / (ms * 1e-3) / 1e12
        a8, w8 = a.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
        sa = torch.ones(L, 1, device="cuda")
        sb = torch.ones(1, n, device="cuda")
        ms = Timer("cuda", 1, 10).median_ms(
            lambda a8=a8, w8=w8, sa=sa, sb=sb: torch._scaled_mm(
                a8, w8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16
            )
        )
        rates[f"fp8 {name}"] = 2 * L * k * n / (ms * 1e-3) / 1e12
    q = torch.randn(1, cfg.num_heads, L, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
    ms = Timer("cuda", 1, 5).median_ms(lambda: F.scaled_dot_product_attention(q, q, q))
    rates["attention sdpa"] = 4 * L * L * cfg.head_dim * cfg.num_heads / (ms * 1e-3) / 1e12
    try:
        from sageattention import sageattn

        ms = Timer("cuda", 1, 5).median_ms(lambda: sageattn(q, q, q, tensor_layout="HND"))
        rates["attention sageattn"] = 4 * L * L * cfg.head_dim * cfg.num_heads / (ms * 1e-3) / 1e12
    except ImportError:
        pass
    q = a = w = a8 = w8 = None  # drop the buffers before the models are built  # noqa: F841
    free()
    return rates


# --- report --------------------------------------------------------------------------------------
def report(rows: list[Row], rates: dict, args) -> str:
    """The markdown report: the card, the measured rates, and a table of ``rows`` with FLOP ratios."""
    width, height = SIZES[args.size]
    lines = [
        f"Card: {torch.cuda.get_device_name()} (cc {'.'.join(map(str, torch.cuda.get_device_capability()))}), "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, {time.strftime('%Y-%m-%d')}",
        f"Input: {width}x{height}, {args.frames} frames; median of {args.reps} forwards (CUDA events)",
        "",
    ]
    if rates:
        lines += ["| rate at the model's shapes | TFLOP/s |", "|---|---|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in rates.items()]
        lines.append("")
    if rows:
        by_preset = {}
        for r in rows:
            cfg = WanConfig.preset(r.preset)
            w, h = SIZES[r.size]
            by_preset[r.preset] = forward_flops(cfg, args.frames, w, h)
        peer = next((r.ms for r in rows if r.name == "diffusers eager"), None)
        lines += [
            "| runtime | preset | quant | attention | swap | ms | vs diffusers | TFLOP/s | achieved/attainable | peak GiB | note |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            fl = by_preset[r.preset]
            floor = None
            if rates:
                gemm = min(
                    v for k, v in rates.items() if k.startswith("fp8" if "fast" in r.quant else "bf16")
                )
                attn = max(v for k, v in rates.items() if k.startswith("attention"))
                floor = (fl["linear"] / gemm + fl["attention"] / attn) / 1e9  # ms
            ratio = f"{peer / r.ms:.2f}x" if peer else ""
            att = f"{floor / r.ms:.2f}" if floor else ""
            lines.append(
                f"| {r.name} | {r.preset} {r.size} | {r.quant} | {r.attention} | {r.swap} | {r.ms:.0f} | "
                f"{ratio} | {r.tflops:.0f} | {att} | {r.peak_gib:.1f} | {r.note} |"
            )
        fl = by_preset[rows[0].preset]
        lines += [
            "",
            f"FLOPs per forward ({rows[0].preset}): linear {fl['linear'] / 1e15:.3f} PFLOP, "
            f"attention {fl['attention'] / 1e15:.3f} PFLOP, {fl['tokens']} tokens",
        ]
    return "\n".join(lines)


def main(argv=None) -> int:
    """``wanstudio bench``: run the chosen suites, print the report (and write ``--json``); exit code."""
    p = argparse.ArgumentParser(
        prog="wanstudio bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--suite",
        nargs="+",
        default=["roofline", "matrix", "peer"],
        choices=["roofline", "matrix", "peer", "peer-offload"],
    )
    p.add_argument("--presets", nargs="+", default=["i2v-14b"])
    p.add_argument("--size", default="480p", choices=list(SIZES))
    p.add_argument("--frames", type=int, default=81)
    p.add_argument(
        "--quant", nargs="+", default=["disabled", "fp8_e4m3fn_scaled_fast"], choices=QuantMode.names()
    )
    p.add_argument("--attention", nargs="+", default=["sdpa"], choices=AttentionMode.names())
    p.add_argument("--swap", nargs="+", type=int, default=[0])
    p.add_argument("--prefetch", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="torch.compile each block (wanstudio.fusion)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("wanstudio bench needs a CUDA GPU", file=sys.stderr)
        return 2
    rows: list[Row] = []
    reference: dict = {}
    rates = suite_roofline(args, rows, reference) if "roofline" in args.suite else {}
    if "matrix" in args.suite:
        suite_matrix(args, rows, reference)
    if any(s.startswith("peer") for s in args.suite):
        suite_peer(args, rows, reference)
    text = report(rows, rates, args)
    print(text)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"rates": rates, "rows": [asdict(r) for r in rows]}, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
