"""One InfiniteTalk clip end to end on emulated 12 / 16 / 24 GB cards (issue 17).

Every part at its real size with random weights (clip_e2e.build_pipeline): the
infinitetalk-14b DiT in fp8 ``_scaled_fast`` with compiled blocks, umT5-XXL stored in
``fp8_e4m3fn_scaled`` (7.7 GB), CLIP ViT-H, wav2vec2-base, the Wan VAE (bf16). One 81-frame clip
in the distilled setting (4 steps, one DiT call each: what small-card users run) after a 1-step
warm-up that compiles. The scenarios run in one process, in this order, on the same parts:

* ``480p resident``: everything on the GPU, nothing capped (the reference time);
* ``480p offload``: encoders on the GPU only while they run, no block swap;
* ``720p resident`` and then, with all 40 blocks swapped and encoders parked,
  ``720p 24 GB``;
* ``480p 16 GB`` and ``480p 12 GB`` (all 40 blocks swapped, encoders parked).

A card of N GB is emulated with ``torch.cuda.set_per_process_memory_fraction`` at N GB less
0.6 GiB for the CUDA context, and the pipeline's ``vram_budget_gb`` set to the same figure (the
text encoder runs on the GPU when it fits beside the DiT, the VAE tiles when it would not fit).
Prints one markdown row per scenario: seconds per clip, median step, peak VRAM
(``max_memory_allocated`` and ``max_memory_reserved``), where the text encoder ran, host RSS
now and its peak (VmHWM).

    python benchmarks/clip_low_vram.py                          # all, ~6 min on an H200
    python benchmarks/clip_low_vram.py "480p 12 GB" "480p 16 GB"  # only these
"""

from __future__ import annotations

import gc
import statistics
import sys
import time

import numpy as np
import torch
from clip_e2e import build_pipeline, clip_wave, timed_clip

import wanstudio as ws
from wanstudio.pipeline.memory import EncoderRunner

GiB = 2**30
CONTEXT_GIB = 0.6
SIZES = {480: (832, 480), 720: (1280, 720)}


def host_rss_gib() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process, GiB."""
    fields = {}
    with open("/proc/self/status") as status:
        lines = status.read().splitlines()
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024 / GiB
    return fields["VmRSS"], fields["VmHWM"]


def cap(card_gb: float | None) -> float | None:
    """Cap the allocator at a card of ``card_gb`` (None: uncapped); returns the budget in GiB."""
    total = torch.cuda.get_device_properties(0).total_memory
    if card_gb is None:
        torch.cuda.set_per_process_memory_fraction(1.0)
        return None
    budget = card_gb * 1e9 / GiB - CONTEXT_GIB  # a "12 GB" card: 12e9 bytes
    torch.cuda.set_per_process_memory_fraction(budget * GiB / total)
    return budget


def set_memory(pipe, *, offload: bool, budget_gib: float | None) -> None:
    pipe.encoders = EncoderRunner(
        pipe.device, offload=offload, budget_bytes=None if budget_gib is None else int(budget_gib * GiB)
    )
    pipe.encoders.prepare(pipe.text_encoder, pipe.image_encoder, pipe.audio_encoder)
    if not offload:  # resident: back on the GPU
        for enc in (pipe.text_encoder, pipe.image_encoder, pipe.audio_encoder):
            enc.model.to(pipe.device)


def trace_parts(pipe) -> None:
    """Print device memory around every encoder and VAE call: allocated before it, and the
    scenario's peak so far before and after it (the peak before the decode is the denoising's)."""
    runner_cls = type(pipe.encoders)

    def traced(fn, label):
        def call(self, part, *args, **kwargs):
            what = label(part, args)
            before = torch.cuda.memory_allocated() / GiB
            peak_before = torch.cuda.max_memory_allocated() / GiB
            try:
                return fn(self, part, *args, **kwargs)
            finally:
                peak = torch.cuda.max_memory_allocated() / GiB
                print(
                    f"  {what}: {before:.2f} GiB allocated before; peak so far {peak_before:.2f} -> {peak:.2f}",
                    flush=True,
                )

        return call

    runner_cls.run = traced(runner_cls.run, lambda part, args: type(part).__name__)
    runner_cls.vae = traced(runner_cls.vae, lambda part, args: f"VAE.{args[0]} {tuple(args[1].shape)}")


def run_clip(pipe, size: tuple[int, int], steps: int, wave: np.ndarray) -> tuple[float, list[float]]:
    """The distilled setting (4 x 1 DiT call) at ``size`` on a random reference frame."""
    image = torch.rand(3, size[1], size[0]) * 2 - 1
    distilled = dict(text_scale=1.0, audio_scale=1.0, scheduler="euler_distill", shift=5.0)
    return timed_clip(pipe, image, wave, steps=steps, size=size, **distilled)


def main() -> int:
    t0 = time.perf_counter()
    pipe = build_pipeline(
        "fp8_e4m3fn_scaled_fast", True, text_quant="fp8_e4m3fn_scaled", offload_encoders=False
    )
    print(f"built in {time.perf_counter() - t0:.0f} s; host RSS {host_rss_gib()[0]:.1f} GiB", flush=True)
    wave = clip_wave()
    scenarios = [  # name, size, card GB, blocks swapped, encoders parked, warm-up first
        ("480p 12 GB", 480, 12, 40, True, True),
        ("480p 16 GB", 480, 16, 40, True, False),
        ("720p 24 GB", 720, 24, 40, True, True),
        ("480p resident", 480, None, 0, False, False),
        ("480p offload", 480, None, 0, True, False),
        ("720p resident", 720, None, 0, False, False),
    ]
    wanted = sys.argv[1:]
    unknown = set(wanted) - {s[0] for s in scenarios}
    if unknown:
        raise SystemExit(f"unknown scenarios {sorted(unknown)}; choose from {[s[0] for s in scenarios]}")
    scenarios = [s for s in scenarios if not wanted or s[0] in wanted]
    trace_parts(pipe)
    rows = []
    for name, res, card, swap, offload, warm in scenarios:
        cap(None)
        ws.apply_modes(pipe.model, pipe.model.modes.replace(blocks_to_swap=swap), device="cuda")
        set_memory(pipe, offload=offload, budget_gib=None)
        gc.collect()
        torch.cuda.empty_cache()
        if warm:  # compiles for this size
            run_clip(pipe, SIZES[res], 1, wave)
        budget = cap(card)
        set_memory(pipe, offload=offload, budget_gib=budget)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        print(f"{name}: {torch.cuda.memory_allocated() / GiB:.2f} GiB allocated at the start", flush=True)
        try:
            wall, steps_s = run_clip(pipe, SIZES[res], 4, wave)
        except Exception as e:  # an OOM is a result here
            print(f"{name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            rows.append((name, card, swap, offload, None, None, None, None, "-", *host_rss_gib()))
            continue
        peak = torch.cuda.max_memory_allocated() / GiB
        reserved = torch.cuda.max_memory_reserved() / GiB
        rss, hwm = host_rss_gib()
        text = pipe.encoders.text_ran_on or "-"
        step = statistics.median(steps_s) if steps_s else float("nan")
        rows.append((name, card, swap, offload, wall, step, peak, reserved, text, rss, hwm))
        print(
            f"{name}: clip {wall:.1f} s, step {step:.2f} s, peak {peak:.2f} GiB (reserved {reserved:.2f})",
            flush=True,
        )
    cap(None)
    ws.apply_modes(pipe.model, pipe.model.modes.replace(blocks_to_swap=40), device="cuda")
    set_memory(pipe, offload=True, budget_gib=None)
    gc.collect()
    torch.cuda.empty_cache()
    print(
        f"after the resident runs, 40 blocks swapped again: {torch.cuda.memory_allocated() / GiB:.2f} GiB allocated"
    )
    print(
        f"\nCard: {torch.cuda.get_device_name()}, torch {torch.__version__}; infinitetalk-14b "
        "fp8_e4m3fn_scaled_fast compiled + umT5-XXL fp8_e4m3fn_scaled + CLIP ViT-H fp16 + wav2vec2-base "
        "+ Wan VAE bf16, random weights; 81 frames (1 clip), distilled setting: 4 steps x 1 DiT call "
        "(euler_distill), prefetch 1, sdpa\n"
    )
    print(
        "| scenario | card (emulated) | blocks swapped | encoders | clip s | step s (median) "
        "| peak VRAM GiB (allocated / reserved) | text encoder ran on | host RSS GiB (now / peak) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, card, swap, offload, wall, step, peak, reserved, text, rss, hwm in rows:
        card_s = f"{card} GB" if card else "141 GB (uncapped)"
        enc = "parked" if offload else "resident"
        if wall is None:
            print(f"| {name} | {card_s} | {swap} | {enc} | OOM | | | | {rss:.1f} / {hwm:.1f} |")
            continue
        print(
            f"| {name} | {card_s} | {swap} | {enc} | {wall:.1f} | {step:.2f} | {peak:.2f} / {reserved:.2f} "
            f"| {text} | {rss:.1f} / {hwm:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
