"""Time one Linear at the Wan-14B shapes in bf16 and every quantization mode; print markdown.

    python benchmarks/bench_linear.py                          # M = 32,760; 5120x5120, 5120->13824, 13824->5120
    python benchmarks/bench_linear.py --output benchmarks/linear_h100.md
    python benchmarks/bench_linear.py --device cpu --m 256 --shapes 256x256 --repeats 3   # rehearsal

For each shape: ``nn.Linear`` in bf16 (with bias, as in the DiT), then ``QuantizedLinear`` in
every mode, each timed as the median of ``--repeats`` forward calls after ``--warmup`` calls
(CUDA events), with the path the layer took, TFLOP/s (2 M K N), speed against bf16, the
weight bytes, and the output SQNR on the first 4096 rows against an fp32 reference. Then the
parts of the fast paths alone: per-token activation quantization fused (Triton) vs eager, the
row-wise ``torch._scaled_mm`` on pre-quantized operands, and the NVFP4 weight dequantization
fused vs eager. ``--check`` exits 1 if an fp8 ``_fast`` mode on its ``scaled_mm`` path does
not beat bf16. ``--device cpu`` times wall-clock and only rehearses the script.
"""

from __future__ import annotations

import argparse
import gc
import platform
import sys
import warnings
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_timing import Timer  # noqa: E402

from wanstudio.errors import UnsupportedModeError  # noqa: E402
from wanstudio.options import QuantMode, parse_option  # noqa: E402
from wanstudio.quant import QuantizedLinear, fp4, fp8, kernels, sqnr_db  # noqa: E402

DEFAULT_SHAPES = ["5120x5120", "5120x13824", "13824x5120"]  # K x N (in -> out)
SQNR_ROWS = 4096


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, default=32760, help="tokens (rows of the activation)")
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="KxN in->out features")
    p.add_argument("--modes", nargs="*", default=None, help="quantization modes (default: all)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="cuda")
    p.add_argument("--output", type=Path, default=None, help="also write the tables here")
    p.add_argument("--check", action="store_true", help="exit 1 if a fast fp8 mode loses to bf16")
    return p.parse_args(argv)


def card(device: torch.device) -> str:
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        triton = "none"
        if kernels.HAS_TRITON:
            triton = kernels.triton.__version__
        return (
            f"{torch.cuda.get_device_name(device)} (sm_{cap[0]}{cap[1]}), torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}, Triton {triton}"
        )
    return f"CPU {platform.processor() or platform.machine()}, torch {torch.__version__} (rehearsal)"


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_shape(k: int, n: int, args, modes, timer: Timer, device: torch.device) -> tuple[list, list]:
    """Rows of the main table and of the parts table for one K x N."""
    m, flops = args.m, 2.0 * args.m * k * n
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(n, k, device=device, generator=g) * 0.02
    b = torch.randn(n, device=device, generator=g) * 0.01
    x = torch.randn(m, k, device=device, generator=g).to(torch.bfloat16)
    lin = nn.Linear(k, n, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    rows = min(m, SQNR_ROWS)
    ref = F.linear(x[:rows].float(), w, b)  # fp32 (TF32 off by default)
    del w, b
    shape = f"{k}->{n}"
    table = []
    with torch.no_grad():
        base_ms = timer.median_ms(lambda: lin(x))
        table.append(
            dict(
                shape=shape,
                mode="bf16",
                path="F.linear",
                ms=base_ms,
                tflops=flops / base_ms / 1e9,
                speed=1.0,
                mib=lin.weight.nbytes / 2**20,
                sqnr=sqnr_db(ref, lin(x[:rows])),
                note="",
            )
        )
        for mode in modes:
            row = dict(
                shape=shape,
                mode=mode.value,
                path="",
                ms=None,
                tflops=None,
                speed=None,
                mib=None,
                sqnr=None,
                note="",
            )
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    q = QuantizedLinear.from_linear(lin, mode)
                    path, detail = q.path_for(device, torch.bfloat16)
                    ms = timer.median_ms(lambda q=q: q(x))
                    row.update(
                        path=path,
                        ms=ms,
                        tflops=flops / ms / 1e9,
                        speed=base_ms / ms,
                        mib=q.weight_nbytes / 2**20,
                        sqnr=sqnr_db(ref, q(x[:rows])),
                    )
                row["note"] = detail + "".join(f"; warning: {c.message}" for c in caught)
                del q
            except UnsupportedModeError as exc:
                row.update(path="refused", note=str(exc).splitlines()[0])
            except Exception as exc:  # report and go on: one table, every mode
                row.update(path="error", note=f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
            table.append(row)
            free(device)
        parts = bench_parts(x, lin, timer, device, shape)
    return table, parts  # x, lin, ref are freed by the caller's free()


def bench_parts(x, lin, timer: Timer, device, shape: str) -> list:
    """The pieces of the fast paths, timed alone."""
    out = []
    m, k = x.shape
    n = lin.out_features
    eager_ms = timer.median_ms(lambda: fp8.quantize_rows_eager(x))
    out.append((shape, f"per-token e4m3 quantization of x [{m}, {k}], eager", eager_ms))
    if device.type == "cuda" and kernels.HAS_TRITON:
        fused_ms = timer.median_ms(lambda: kernels.quantize_rows_triton(x))
        out.append((shape, f"per-token e4m3 quantization of x [{m}, {k}], fused Triton", fused_ms))
    try:
        q = QuantizedLinear.from_linear(lin, QuantMode.FP8_E4M3FN_SCALED_FAST)
        if q.path_for(device, torch.bfloat16)[0] == "scaled_mm":
            xq, sa = fp8.quantize_rows_eager(x)
            wt, sb, bias = q.weight.t(), q._scale_b, lin.bias
            mm_ms = timer.median_ms(
                lambda: torch._scaled_mm(xq, wt, scale_a=sa, scale_b=sb, bias=bias, out_dtype=torch.bfloat16)
            )
            out.append((shape, "torch._scaled_mm e4m3, row-wise scales, bf16 out + bias", mm_ms))
            del xq, sa
        del q
    except (UnsupportedModeError, RuntimeError) as exc:
        out.append((shape, f"torch._scaled_mm: {str(exc).splitlines()[0]}", float("nan")))
    packed, bscale, ts = fp4.quantize_nvfp4(lin.weight)
    deq_eager = timer.median_ms(lambda: fp4.dequantize_nvfp4(packed, bscale, ts, k, torch.bfloat16))
    out.append((shape, f"NVFP4 weight [{n}, {k}] -> bf16, eager", deq_eager))
    if device.type == "cuda" and kernels.HAS_TRITON:
        deq_fused = timer.median_ms(
            lambda: kernels.dequantize_fp4_triton(packed, bscale, ts, k, torch.bfloat16)
        )
        out.append((shape, f"NVFP4 weight [{n}, {k}] -> bf16, fused Triton", deq_fused))
    return out


def _f(v, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def render(header: str, table: list, parts: list) -> str:
    lines = [
        header,
        "",
        "| K -> N | mode | path | ms | TFLOP/s | x bf16 | weight MiB | SQNR dB |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in table:
        lines.append(
            f"| {r['shape']} | `{r['mode']}` | {r['path']} | {_f(r['ms'], '.3f')} | "
            f"{_f(r['tflops'], '.1f')} | {_f(r['speed'], '.2f')} | {_f(r['mib'], '.1f')} | "
            f"{_f(r['sqnr'], '.1f')} |"
        )
    lines += ["", "Paths (what each mode ran):", ""]
    seen = set()
    for r in table:
        key = (r["mode"], r["note"])
        if r["note"] and key not in seen:
            seen.add(key)
            lines.append(f"- `{r['mode']}` ({r['shape']}): {r['note']}")
    lines += ["", "| K -> N | part | ms |", "|---|---|---:|"]
    lines += [f"| {s} | {what} | {ms:.3f} |" for s, what, ms in parts]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; use --device cpu to rehearse", file=sys.stderr)
        return 2
    modes = (
        [parse_option(QuantMode, m) for m in args.modes]
        if args.modes
        else [m for m in QuantMode if m is not QuantMode.DISABLED]
    )
    timer = Timer(device, args.warmup, args.repeats, min_repeats=3)
    header = (
        f"## One Linear, M = {args.m:,} tokens, bf16 activations — {card(device)}\n\n"
        f"{date.today().isoformat()}; median of {timer.repeats} calls after {args.warmup} warm-up "
        f"calls; SQNR of the first {min(args.m, SQNR_ROWS)} output rows against an fp32 "
        f"reference; weights ~ N(0, 0.02^2), activations ~ N(0, 1)."
    )
    table, parts = [], []
    for spec in args.shapes:
        k, n = (int(v) for v in spec.lower().split("x"))
        t, p = bench_shape(k, n, args, modes, timer, device)
        free(device)
        table += t
        parts += p
        print(f"done {k}->{n}", file=sys.stderr, flush=True)
    text = render(header, table, parts)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    slower = [
        r
        for r in table
        if r["mode"].startswith("fp8")
        and r["mode"].endswith("_fast")
        and r["path"] == "scaled_mm"
        and r["speed"] is not None
        and r["speed"] <= 1.0
    ]
    for r in slower:
        print(f"SLOWER THAN BF16: {r['mode']} at {r['shape']}: {r['speed']:.2f}x", file=sys.stderr)
    return 1 if args.check and slower else 0


if __name__ == "__main__":
    sys.exit(main())
