"""One 81-frame InfiniteTalk clip end to end on the GPU: encoders, sampler, VAE (issue 10).

Every part is built at its real size (infinitetalk-14b DiT, umT5-XXL, CLIP ViT-H/14,
wav2vec2-base, Wan VAE) with random weights directly on the GPU; the audio is 81 frames long
(3.24 s), so exactly one clip runs. Reports the whole clip's wall time and the median sampling
step (a CFG step: 3 DiT calls, or 2 when text_scale == 1) from the progress events.

    python benchmarks/clip_e2e.py --steps 4 --text-scale 1 --audio-scale 2 --quant fp8_e4m3fn_scaled_fast --compile

The distilled setting users run (issue 16): a random rank-64 LoRA over every block Linear
merged into the bf16 weights before quantization (timed), 4 steps on the distill timesteps,
one DiT call per step::

    python benchmarks/clip_e2e.py --preset distill_4step --audio-scale 1 --lora-rank 64 \
        --quant fp8_e4m3fn_scaled_fast --compile
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

import wanstudio as ws
from wanstudio.encoders import VAE, AudioEncoder, ImageEncoder, TextEncoder
from wanstudio.encoders.text import tiny_tokenizer
from wanstudio.encoders.weights import CONFIG_DIR


def random_lora(model: ws.WanModel, rank: int, path: str) -> str:
    """A kijai-format LoRA file touching every Linear of every block (as lightx2v's does)."""
    from safetensors.torch import save_file

    g = torch.Generator(device="cuda").manual_seed(1)
    tensors = {}
    for name, module in model.blocks.named_modules():
        if isinstance(module, torch.nn.Linear):
            n, k = module.weight.shape
            base = f"diffusion_model.blocks.{name}"
            tensors[f"{base}.lora_down.weight"] = (
                (torch.randn(rank, k, device="cuda", generator=g) * 0.01).bfloat16().cpu()
            )
            tensors[f"{base}.lora_up.weight"] = (
                (torch.randn(n, rank, device="cuda", generator=g) * 0.01).bfloat16().cpu()
            )
            tensors[f"{base}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, path)
    return path


def clip_wave(frames: int = 81) -> np.ndarray:
    """A voiced-like 16 kHz signal as long as ``frames`` video frames (seeded; content does not
    matter for timing, only its length)."""
    rng = np.random.default_rng(0)
    t = np.arange(int(frames / 25 * 16000)) / 16000
    wave = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.01 * rng.standard_normal(
        t.size
    )
    return wave.astype(np.float32)


def timed_clip(pipe, image, wave, **call) -> tuple[float, list[float]]:
    """One 81-frame clip: (wall seconds, each sampling step's seconds). ``call``: the
    pipeline's sampling keywords and size."""
    events = []
    torch.cuda.synchronize()
    start = time.perf_counter()
    pipe(
        image,
        wave,
        prompt="a person talking",
        frame_num=81,
        progress=events.append,
        keep_frames=False,
        **call,
    )
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return wall, [b.elapsed - a.elapsed for a, b in zip(events, events[1:]) if a.kind == b.kind == "step"]


def build_pipeline(
    quant: str,
    compile_blocks: bool,
    lora_rank: int = 0,
    *,
    blocks_to_swap: int = 0,
    text_quant: str | None = None,
    **pipeline_kwargs,
) -> ws.InfiniteTalkPipeline:
    """Every part at its real size with random weights on the GPU; the DiT configured by
    ``apply_modes`` (quantization, block swap, compiled blocks), umT5 stored in ``text_quant``
    when given; ``pipeline_kwargs`` go to InfiniteTalkPipeline (offload_encoders, ...)."""
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
    model = ws.WanModel(cfg, device="cuda", dtype=torch.bfloat16).eval().requires_grad_(False)
    if lora_rank:
        path = random_lora(model, lora_rank, "/tmp/clip_e2e_lora.safetensors")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ws.apply_lora(model, path, keep_originals=False)  # what load_model does per weight, on the GPU
        torch.cuda.synchronize()
        print(
            f"LoRA rank {lora_rank} merged into {len(ws.lora.LoraSet([ws.LoRA(path)], {k: tuple(v.shape) for k, v in model.state_dict().items()}).targets)} weights in {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
    modes = ws.RuntimeModes(quantization=quant, compile=compile_blocks, blocks_to_swap=blocks_to_swap)
    ws.apply_modes(model, modes, device="cuda")
    with torch.device("cuda"):
        vae = VAE(AutoencoderKLWan.from_config(config("wan2.1-vae.json")).eval().requires_grad_(False))
        text = TextEncoder(
            UMT5EncoderModel(UMT5Config.from_dict(config("umt5-xxl.json")))
            .to(torch.bfloat16)
            .eval()
            .requires_grad_(False),
            tiny_tokenizer(),
        )
        if text_quant:
            text.quantize(text_quant)
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
    return ws.InfiniteTalkPipeline(
        model,
        vae,
        text,
        clip,
        audio,
        identity=f"random infinitetalk-14b ({quant})",
        frame_num=81,
        size=(832, 480),
        **pipeline_kwargs,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[4])
    p.add_argument("--text-scale", type=float, default=None, help="default: the preset's")
    p.add_argument("--audio-scale", type=float, default=None, help="default: the preset's")
    p.add_argument("--preset", default="standard", help="a GenerationPreset (scheduler, shift, scales)")
    p.add_argument("--lora-rank", type=int, default=0, help="merge a random LoRA of this rank first")
    p.add_argument("--quant", default="disabled")
    p.add_argument("--compile", action="store_true")
    args = p.parse_args(argv)
    preset = ws.options.parse_option(ws.options.GenerationPreset, args.preset).settings
    args.text_scale = preset.text_scale if args.text_scale is None else args.text_scale
    args.audio_scale = preset.audio_scale if args.audio_scale is None else args.audio_scale
    sampling = dict(
        scheduler=preset.scheduler.value, **({} if preset.shift is None else {"shift": preset.shift})
    )
    pipe = build_pipeline(args.quant, args.compile, args.lora_rank)
    wave = clip_wave()
    image = torch.rand(3, 480, 832) * 2 - 1
    rows = []
    for steps in [1] + args.steps:  # the 1-step run warms up (and compiles)
        wall, step_times = timed_clip(
            pipe,
            image,
            wave,
            steps=steps,
            text_scale=args.text_scale,
            audio_scale=args.audio_scale,
            **sampling,
            size=(832, 480),
        )
        calls = 1 if (args.text_scale, args.audio_scale) == (1, 1) else 2 if args.text_scale == 1 else 3
        if steps > 1:
            rows.append((steps, calls, wall, statistics.median(step_times) if step_times else float("nan")))
        print(
            f"steps={steps}: clip {wall:.1f} s; step times {[round(s, 2) for s in step_times[:5]]}",
            flush=True,
        )
    print(
        f"\nCard: {torch.cuda.get_device_name()}, torch {torch.__version__}; infinitetalk-14b + umT5-XXL + CLIP ViT-H "
        f"+ wav2vec2-base + Wan VAE, random weights; 832x480, 81 frames (1 clip); quantization {args.quant}, "
        f"{'compiled blocks' if args.compile else 'eager'}, attention sdpa; preset {args.preset}, "
        f"LoRA rank {args.lora_rank or 'none'}; text scale {args.text_scale}, "
        f"audio scale {args.audio_scale}\n"
    )
    print("| steps | DiT calls per step | CFG step (median) s | whole clip s | peak VRAM GiB |")
    print("|---|---|---|---|---|")
    peak = torch.cuda.max_memory_allocated() / 2**30
    for steps, calls, wall, step in rows:
        print(f"| {steps} | {calls} | {step:.2f} | {wall:.1f} | {peak:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
