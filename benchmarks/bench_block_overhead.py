"""The work between kernels in one DiT block: what sharing q/k/v's activation quantization saves,
and what replaying the block as a CUDA graph would save (GPU only).

One i2v-14b block (random weights, bf16, ``fp8_e4m3fn_scaled_fast``, compiled as
``compile_blocks`` does) at 832x480x81 (32,760 tokens), with its inputs taken from a real model
forward. Same run, medians of CUDA-event timings:

* shared — q, k and v read one per-token fp8 quantization of their input (``quantize_once``);
* separate — each of the three quantizes it again (the code before ``quantize_once``);
* graph — "shared" captured once in a CUDA graph and replayed (no Python, no launches);
* quantize_rows alone at [32760, 5120], the pass "shared" saves twice per block.

    python benchmarks/bench_block_overhead.py [--size 480p|720p] [--reps 20]
"""

from __future__ import annotations

import argparse
import sys

import torch

import wanstudio.model.blocks as blocks
from wanstudio.bench import SIZES, Timer, make_inputs
from wanstudio.config import WanConfig
from wanstudio.fusion import compile_blocks
from wanstudio.model import WanModel
from wanstudio.quant import kernels, quantize


def median_ms(fn, reps: int) -> float:
    """Median CUDA-event time of ``fn`` over ``reps`` calls after three untimed ones."""
    return Timer("cuda", warmup=3, repeats=reps).median_ms(fn)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="480p", choices=list(SIZES))
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    cfg = WanConfig.preset("i2v-14b").replace(num_layers=1)
    model = quantize(WanModel(cfg, device="cuda", dtype=torch.bfloat16).eval(), "fp8_e4m3fn_scaled_fast")
    width, height = SIZES[args.size]
    inputs = make_inputs(cfg, 81, width, height)
    seen = {}

    def grab(module, a, kw):
        seen["args"], seen["kwargs"] = a, kw

    handle = model.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    block = model.blocks[0]
    compile_blocks(model)
    a, kw = seen["args"], seen["kwargs"]
    L = a[0].shape[1]
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}; block of i2v-14b, {L} tokens", flush=True
    )

    def run():
        with torch.no_grad():
            return block(*a, **kw)

    rows = {"shared": median_ms(run, args.reps)}
    own = blocks.quantize_once
    blocks.quantize_once = lambda x, layers: x
    try:
        torch._dynamo.reset()
        rows["separate"] = median_ms(run, args.reps)
    finally:
        blocks.quantize_once = own
        torch._dynamo.reset()
    run()
    try:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run()  # warm on the side stream, as capture wants
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            run()
        rows["graph"] = median_ms(graph.replay, args.reps)
    except Exception as exc:  # report why capture is refused, keep the other rows
        print(f"graph: capture refused: {type(exc).__name__}: {str(exc).splitlines()[0]}", flush=True)
    x2 = torch.randn(L, cfg.dim, device="cuda", dtype=torch.bfloat16)
    rows["quantize_rows alone"] = median_ms(lambda: kernels.quantize_rows(x2), args.reps)
    for name, ms in rows.items():
        print(f"{name:>20}: {ms:8.3f} ms", flush=True)
    print(f"saved by sharing: {rows['separate'] - rows['shared']:.3f} ms per block", flush=True)
    if "graph" in rows:
        print(f"saved by a CUDA graph: {rows['shared'] - rows['graph']:.3f} ms per block", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
