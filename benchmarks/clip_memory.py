"""Peak VRAM of each phase of one InfiniteTalk clip, and what the memory savings do.

Every part at its real size with random weights, built on the GPU as in clip_e2e.py: the
infinitetalk-14b DiT quantized to fp8, umT5-XXL (bf16), CLIP ViT-H/14 (fp16), wav2vec2-base,
the Wan VAE (bf16). One clip of 81 frames at 832 x 480 goes through its phases: text, image and
audio encoding, the VAE encode of the conditioning video, one DiT forward (a sampling step is
2-3 of them, each with the same peak) and the VAE decode. Scenarios:

* ``resident``: every part on the GPU, VAE untiled (the pipeline as it is);
* ``offload+tiles``: encoders on the GPU only while they run (``EncoderPlacement``, pinned
  host copies), VAE tiled (``VAETiling()``), no block swap; ``+text on CPU``: and umT5 on the CPU;
* ``16 GB`` / ``12 GB`` card: ``torch.cuda.set_per_process_memory_fraction`` caps the allocator
  at the card minus 0.6 GiB for the CUDA context, and the plan of ``offload.plan_memory`` (from
  the measured part sizes) is applied: block swap, encoder placement, text encoder on the CPU,
  VAE tiling.

Prints a markdown table: per phase the measured peak (``torch.cuda.max_memory_allocated``,
GiB) and, in brackets, the planner's prediction for that phase without its reserve; OOM when
the phase ran out of memory.

    python benchmarks/clip_memory.py           # ~5 min on an H200
    python benchmarks/clip_memory.py --quick   # ~1 min: 10 DiT blocks, 6 umT5 layers, 33 frames
    python benchmarks/clip_memory.py --tiny    # tiny presets, 9 frames of 64 x 96: a rehearsal
                                               # of every path (on the CPU: no peaks, no swap)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

import wanstudio as ws
from wanstudio.encoders import VAE, AudioEncoder, EncoderPlacement, ImageEncoder, TextEncoder, VAETiling
from wanstudio.encoders.text import tiny_tokenizer
from wanstudio.encoders.weights import CONFIG_DIR
from wanstudio.offload import (
    disable_block_swap,
    dit_activation_bytes,
    enable_block_swap,
    measure_block_bytes,
    measure_parts,
    plan_memory,
)

GiB = 2**30
CONTEXT_GIB = 0.6  # what a real card loses to the CUDA context before PyTorch allocates
PHASES = ("text", "image", "audio", "vae_encode", "dit", "vae_decode")
PLAN_PHASE = dict(
    text="text", image="image", audio="audio", vae_encode="vae", dit="denoise", vae_decode="vae"
)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def build_tiny() -> dict:
    torch.manual_seed(0)
    cfg = ws.WanConfig.preset("tiny-infinitetalk")
    dit = ws.WanModel(cfg, device=DEVICE).eval().requires_grad_(False)
    parts = dict(
        dit=dit, vae=VAE.tiny(), text=TextEncoder.tiny(), image=ImageEncoder.tiny(), audio=AudioEncoder.tiny()
    )
    for n in ("vae", "text", "image", "audio"):
        parts[n].model.to(DEVICE)
    return parts


def build(quick: bool) -> dict:
    from diffusers import AutoencoderKLWan
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        UMT5Config,
        UMT5EncoderModel,
        Wav2Vec2Config,
        Wav2Vec2Model,
    )

    def config(name: str) -> dict:
        return json.loads((CONFIG_DIR / name).read_text())

    torch.manual_seed(0)
    cfg = ws.WanConfig.preset("infinitetalk-14b")
    t5 = config("umt5-xxl.json")
    if quick:
        cfg = cfg.replace(num_layers=10)
        t5["num_layers"] = 6
    dit = ws.WanModel(cfg, device="cuda", dtype=torch.bfloat16).eval().requires_grad_(False)
    ws.quantize(dit, "fp8_e4m3fn_scaled")
    with torch.device("cuda"):
        vae = VAE(
            AutoencoderKLWan.from_config(config("wan2.1-vae.json"))
            .to(torch.bfloat16)
            .eval()
            .requires_grad_(False)
        )
        text = TextEncoder(
            UMT5EncoderModel(UMT5Config.from_dict(t5)).to(torch.bfloat16).eval().requires_grad_(False),
            tiny_tokenizer(),
        )
        clip = ImageEncoder(
            CLIPVisionModel(CLIPVisionConfig.from_dict(config("clip-vit-h-14.json")))
            .to(torch.float16)
            .eval()
            .requires_grad_(False)
        )
        audio = AudioEncoder(
            Wav2Vec2Model(Wav2Vec2Config.from_dict(config("chinese-wav2vec2-base.json")))
            .eval()
            .requires_grad_(False)
        )
    return dict(dit=dit, vae=vae, text=text, image=clip, audio=audio)


def inputs(cfg, frames: int, height: int, width: int) -> dict:
    g = torch.Generator().manual_seed(0)
    t = np.arange(int(frames / 25 * 16000)) / 16000
    wave = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    lat = (1 + (frames - 1) // 4, height // 8, width // 8)
    model_inputs = ws.ModelInputs.example(
        cfg, frames=lat[0], height=lat[1], width=lat[2], text_tokens=12, clip_tokens=257, device=DEVICE
    )
    return dict(
        image=torch.rand(1, 3, height, width, generator=g) * 2 - 1,
        wave=wave,
        latents=torch.randn(1, 16, *lat, generator=g),
        model=model_inputs.as_kwargs(),
        frames=frames,
    )


def timed(fn: Callable[[], object]) -> tuple[float | None, float]:
    """(peak GiB, or None on OOM / off CUDA, seconds) of fn, earlier allocations counted."""
    gc.collect()
    if DEVICE != "cuda":
        start = time.perf_counter()
        fn()
        return None, time.perf_counter() - start
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        out = fn()
        torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        out = None
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        return None, time.perf_counter() - start
    del out
    return torch.cuda.max_memory_allocated() / GiB, time.perf_counter() - start


def run_clip(parts: dict, data: dict, placement: EncoderPlacement | None, tiled: bool) -> dict:
    """Each phase's (peak GiB | None, seconds)."""
    vae, dit = parts["vae"], parts["dit"]

    def enc(name: str, *args, **kwargs):
        if placement is None:
            return lambda: parts[name].encode(*args, **kwargs)
        return lambda: placement.run(parts[name], *args, **kwargs)

    frames, (_, _, H, W) = data["frames"], data["image"].shape
    results = {
        "text": timed(enc("text", ["a person talking to the camera", "blurry, static"])),
        "image": timed(enc("image", data["image"].to(DEVICE))),
        "audio": timed(enc("audio", data["wave"], sample_rate=16000, num_frames=frames)),
    }

    def vae_encode():
        video = torch.zeros(1, 3, frames, H, W, device="cpu" if tiled else DEVICE)  # tiles: host
        video[:, :, 0] = data["image"]
        return vae.encode(video, tiled=tiled)

    results["vae_encode"] = timed(vae_encode)

    def dit_forward():
        kw = dict(data["model"])
        with torch.inference_mode():
            return dit(kw.pop("x"), kw.pop("t"), kw.pop("context"), **kw)

    results["dit"] = timed(dit_forward)
    decode_kw = dict(tiled=True, out_device="cpu") if tiled else {}
    results["vae_decode"] = timed(lambda: vae.decode(data["latents"].to(DEVICE), **decode_kw))
    return results


def to_gpu(parts: dict, names) -> None:
    for n in names:
        parts[n].model.to(DEVICE)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="10 DiT blocks, 6 umT5 layers, 33 frames (~1 min)")
    p.add_argument("--tiny", action="store_true", help="tiny presets, 9 frames of 64 x 96 (rehearsal)")
    p.add_argument("--cards", type=float, nargs="+", default=[16, 12], help="card sizes to emulate, GB")
    args = p.parse_args(argv)
    frames, height, width = (9, 64, 96) if args.tiny else ((33 if args.quick else 81), 480, 832)
    t0 = time.perf_counter()
    parts = build_tiny() if args.tiny else build(args.quick)
    dit, vae = parts["dit"], parts["vae"]
    cfg = dit.config
    data = inputs(cfg, frames, height, width)
    sizes = measure_parts({n: parts[n] for n in ("dit", "text", "image", "audio", "vae")})
    video = (1, 3, frames, height, width)
    latents = tuple(data["latents"].shape)
    plan_kw = dict(
        num_blocks=len(dit.blocks),
        block_bytes=measure_block_bytes(dit),
        activation_bytes=dit_activation_bytes(cfg, frames, height, width, quantized=True),
        vae_bytes=max(vae.working_set_bytes("encode", video), vae.working_set_bytes("decode", latents)),
        vae_tiled_bytes=max(
            vae.working_set_bytes("encode", video, tiling=VAETiling()),
            vae.working_set_bytes("decode", latents, tiling=VAETiling()),
        ),
    )
    print(f"built in {time.perf_counter() - t0:.0f} s; {sizes.describe()}", flush=True)
    total = torch.cuda.get_device_properties(0).total_memory if DEVICE == "cuda" else 0
    rows = []

    scenarios = [("resident", None), ("offload+tiles", None), ("+text on CPU", None)]
    scenarios += [(f"{c:g} GB card", c) for c in args.cards]
    for name, card in scenarios:
        start = time.perf_counter()
        disable_block_swap(dit)
        placement = None
        if name == "resident":
            to_gpu(parts, ("text", "image", "audio"))
            plan = plan_memory(
                sizes,
                2**50,
                **plan_kw,
                blocks_to_swap=0,
                offload_encoders=False,
                text_on_cpu=False,
                tile_vae=False,
            )
        elif card is None:
            plan = plan_memory(
                sizes,
                2**50,
                **plan_kw,
                blocks_to_swap=0,
                offload_encoders=True,
                text_on_cpu=name == "+text on CPU",
                tile_vae=True,
            )
        else:
            budget = int((card - CONTEXT_GIB) * GiB)
            try:
                plan = plan_memory(sizes, budget, **plan_kw)
            except ws.BlockSwapError as e:
                rows.append((name, f"refused: {e}", {}, None, 0.0))
                continue
        if name != "resident":
            placement = EncoderPlacement(
                DEVICE, park="cpu", pin=True, text_device="cpu" if plan.text_on_cpu else None
            )
            for n in ("text", "image", "audio"):
                if plan.offload_encoders or (n == "text" and plan.text_on_cpu):
                    placement.park(parts[n], name=n)
                else:
                    parts[n].model.to(DEVICE)
            if plan.text_on_cpu:
                parts["text"].model.to("cpu")
            if plan.blocks_to_swap and DEVICE == "cuda":
                enable_block_swap(dit, plan.blocks_to_swap, prefetch=plan.prefetch, device="cuda")
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
            fraction = (card - CONTEXT_GIB) * GiB / total if card is not None else 1.0
            torch.cuda.set_per_process_memory_fraction(min(1.0, fraction))
        results = run_clip(parts, data, placement, plan.tile_vae)
        if DEVICE == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0)
        desc = (
            f"swap {plan.blocks_to_swap}/{plan.num_blocks} p{plan.prefetch}"
            + (", enc offload" if plan.offload_encoders else "")
            + (", text CPU" if plan.text_on_cpu else "")
            + (", VAE tiled" if plan.tile_vae else "")
        )
        rows.append((name, desc, results, plan, time.perf_counter() - start))
        print(f"{name}: {desc}; {time.perf_counter() - start:.0f} s", flush=True)
        if plan is not None and card is not None:
            print(plan.summary(), flush=True)

    card_name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (no peaks)"
    models = (
        "tiny presets"
        if args.tiny
        else f"infinitetalk-14b{' (10 blocks)' if args.quick else ''} fp8_e4m3fn_scaled + umT5-XXL"
        f"{' (6 layers)' if args.quick else ''} bf16 + CLIP ViT-H fp16 + wav2vec2-base + Wan VAE bf16"
    )
    print(
        f"\nCard: {card_name}, torch {torch.__version__}; {models}, random weights; {width}x{height}, "
        f"{frames} frames. Peak GiB per phase (max_memory_allocated), planner's prediction without "
        f"its reserve in brackets. Card scenarios cap the allocator at the card minus {CONTEXT_GIB} GiB.\n"
    )
    print("| scenario | choices | " + " | ".join(PHASES) + " | peak | scenario s |")
    print("|---|---|" + "---|" * len(PHASES) + "---|---|")
    for name, desc, results, plan, seconds in rows:
        if plan is None:
            print(f"| {name} | {desc} |" + " |" * len(PHASES) + " | |")
            continue
        predicted = {ph.name: (ph.total - plan.reserve_bytes) / GiB for ph in plan.phases}
        cells, peaks = [], []
        for phase in PHASES:
            peak, secs = results[phase]
            guess = predicted.get(PLAN_PHASE[phase])
            guess_s = f" ({guess:.1f})" if guess is not None else ""
            if peak is None:
                cells.append(f"{'OOM' if DEVICE == 'cuda' else '-'}{guess_s} {secs:.1f}s")
            else:
                cells.append(f"{peak:.1f}{guess_s} {secs:.1f}s")
            if peak is not None:
                peaks.append(peak)
        worst = f"{max(peaks):.1f}" if peaks else "-"
        print(f"| {name} | {desc} | " + " | ".join(cells) + f" | {worst} | {seconds:.0f} |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
