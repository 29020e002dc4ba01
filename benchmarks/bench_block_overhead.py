"""The work between kernels in a DiT block: what fusing and sharing the fp8 activation
quantization saves, and what replaying the block as a CUDA graph would save (GPU only).

One i2v-14b block (random weights, bf16, ``fp8_e4m3fn_scaled_fast``, compiled as
``compile_blocks`` does) at 832x480x81 (32,760 tokens), with its inputs taken from a real model
forward. Same run, medians of CUDA-event timings:

* fused — LayerNorm + modulation + per-token e4m3 quantization in one kernel for q/k/v and for
  the FFN's first layer (``modulated_rows``; the code as it is);
* shared — the modulation compiled by Inductor, then one quantization shared by q, k and v
  (``quantize_once``) and one inside the FFN's first layer (the code before ``modulated_rows``);
* separate — q, k and v each quantize the modulated tokens again (before ``quantize_once``);
* shared with the residual stream strided by L, as ``embed`` left it before it stored the
  tokens row-major (every block kept that layout; the row kernels' contracts copied it);
* fused / shared, eager block — the same without ``torch.compile`` (``RuntimeModes``' default);
* graph — "fused" captured once in a CUDA graph and replayed (no Python, no launches);
* the kernels alone at [32760, 5120]: the fused kernel (each launch configuration tried, the
  default marked), and Inductor's modulation followed by ``quantize_rows``.

``--forward`` adds one whole i2v-14b forward (40 blocks, compiled), fused against shared, in
the same run (alternating, medians of ``--reps``).

    python benchmarks/bench_block_overhead.py [--size 480p|720p] [--reps 20] [--forward]
"""

from __future__ import annotations

import argparse
import sys

import torch

import wanstudio.model.blocks as blocks
from wanstudio.bench import SIZES, Timer, build, free, make_inputs
from wanstudio.config import WanConfig
from wanstudio.fusion import compile_blocks, uncompile_blocks
from wanstudio.model import WanModel
from wanstudio.model.layers import FP32LayerNorm
from wanstudio.quant import kernels, quantize, sqnr_db

MODE = "fp8_e4m3fn_scaled_fast"
OWN = (blocks.modulated_rows, blocks.quantize_once)


def median_ms(fn, reps: int) -> float:
    """Median CUDA-event time of ``fn`` over ``reps`` calls after three untimed ones."""
    return Timer("cuda", warmup=3, repeats=reps).median_ms(fn)


def _unfused(norm, x, shift, scale, layers):  # the modulation alone, compiled with the block
    return norm.modulate(x, shift, scale)


def _alone(x, layers):  # no sharing: each layer quantizes x itself
    return x


def use(variant: str) -> None:
    """Switch the blocks' code to ``variant`` (fused / shared / separate). Compiled blocks guard
    on these globals: each variant compiles once and stays cached beside the others."""
    blocks.modulated_rows = OWN[0] if variant == "fused" else _unfused
    blocks.quantize_once = OWN[1] if variant != "separate" else _alone


def block_rows(size: str, reps: int) -> dict[str, float]:
    torch.manual_seed(0)
    cfg = WanConfig.preset("i2v-14b").replace(num_layers=1)
    model = quantize(WanModel(cfg, device="cuda", dtype=torch.bfloat16).eval(), MODE)
    width, height = SIZES[size]
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

    rows = {}
    for variant in ("fused", "shared", "separate"):
        use(variant)
        rows[variant] = median_ms(run, reps)
    # the stream as the model stored it before it was made row-major at the embedding: each
    # token strided by L (conv output flattened and transposed), a layout every block kept
    strided = a[0].transpose(1, 2).contiguous().transpose(1, 2)  # (B, L, D), stride (L*D, 1, L)
    row_major = a
    a = (strided, *a[1:])
    use("shared")
    rows["shared, stream strided by L (before)"] = median_ms(run, reps)
    a = row_major
    use("fused")
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
        rows["graph"] = median_ms(graph.replay, reps)
    except Exception as exc:  # report why capture is refused, keep the other rows
        print(f"graph: capture refused: {type(exc).__name__}: {str(exc).splitlines()[0]}", flush=True)
    uncompile_blocks(model)  # the default: RuntimeModes(compile=False)
    for variant in ("fused", "shared"):
        use(variant)
        rows[f"{variant}, eager block"] = median_ms(run, reps)
    use("fused")

    # the kernels alone, on the block's own input and modulation
    x, mod = a[0], (block.modulation.float() + a[1]).unsqueeze(2)  # (B, L, D), (B, 6, 1, D)
    shift, scale = mod[:, 0], mod[:, 1]
    norm = FP32LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
    modulate = torch.compile(norm.modulate, dynamic=False)
    rows["modulate (Inductor) + quantize_rows"] = median_ms(
        lambda: kernels.quantize_rows(modulate(x, shift, scale).view(-1, cfg.dim)), reps
    )
    rows["modulate (Inductor) alone"] = median_ms(lambda: modulate(x, shift, scale), reps)
    rows["quantize_rows alone"] = median_ms(lambda: kernels.quantize_rows(x.view(-1, cfg.dim)), reps)
    rows["fused kernel (default)"] = median_ms(
        lambda: kernels.modulate_quantize_rows_triton(x, shift, scale, cfg.eps), reps
    )
    for chunk, warps in ((512, 2), (512, 4), (1024, 4), (1024, 8), (2048, 4), (2048, 8), (8192, 8)):
        rows[f"fused kernel, chunk {chunk} x {warps} warps"] = median_ms(
            lambda c=chunk, w=warps: kernels.modulate_quantize_rows_triton(
                x, shift, scale, cfg.eps, chunk=c, num_warps=w
            ),
            reps,
        )
        rows[f"quantize_rows, chunk {chunk} x {warps} warps"] = median_ms(
            lambda c=chunk, w=warps: kernels.quantize_rows_triton(x.view(-1, cfg.dim), chunk=c, num_warps=w),
            reps,
        )
    wide = torch.randn(x.shape[1], cfg.ffn_dim, device="cuda", dtype=torch.bfloat16)  # the FFN's 2nd input
    for chunk, warps in ((1024, 4), (2048, 8), (16384, 16)):
        rows[f"quantize_rows [L, {cfg.ffn_dim}], chunk {chunk} x {warps} warps"] = median_ms(
            lambda c=chunk, w=warps: kernels.quantize_rows_triton(wide, chunk=c, num_warps=w), reps
        )
    return rows


def forward_rows(size: str, reps: int) -> dict[str, float]:
    """One whole i2v-14b forward, compiled blocks, fused against shared (alternating)."""
    cfg = WanConfig.preset("i2v-14b")
    model = compile_blocks(quantize(build("i2v-14b"), MODE))
    width, height = SIZES[size]
    inputs = make_inputs(cfg, 81, width, height)
    times: dict[str, list[float]] = {"forward, fused": [], "forward, shared": []}
    outs = {}
    timer = Timer("cuda", warmup=1, repeats=reps)
    for _ in range(2):  # fused, shared, fused, shared: the second round runs cached graphs
        for variant in ("fused", "shared"):
            use(variant)
            with torch.no_grad():
                times[f"forward, {variant}"].append(timer.median_ms(lambda: model(**inputs)))
                outs[variant] = model(**inputs).float()
    use("fused")
    print(f"forward rounds (ms): {times}", flush=True)
    print(
        f"forward output, fused vs shared: SQNR {sqnr_db(outs['shared'], outs['fused']):.1f} dB", flush=True
    )
    return {name: min(ms) for name, ms in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="480p", choices=list(SIZES))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--forward", action="store_true", help="also time one whole 40-block forward")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = block_rows(args.size, args.reps)
    for name, ms in rows.items():
        print(f"{name:>40}: {ms:8.3f} ms", flush=True)
    print(f"block, saved by fusing: {rows['shared'] - rows['fused']:.3f} ms", flush=True)
    print(f"eager block, saved by fusing: {rows['shared, eager block'] - rows['fused, eager block']:.3f} ms")
    print(f"block, saved by sharing: {rows['separate'] - rows['shared']:.3f} ms", flush=True)
    if "graph" in rows:
        print(f"block, saved by a CUDA graph: {rows['fused'] - rows['graph']:.3f} ms", flush=True)
    if args.forward:
        free()  # the one-block model and its compiled graphs
        fw = forward_rows(args.size, max(3, args.reps // 4))
        for name, ms in fw.items():
            print(f"{name:>40}: {ms:8.1f} ms (best round's median)", flush=True)
        print(f"forward, saved by fusing: {fw['forward, shared'] - fw['forward, fused']:.1f} ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
