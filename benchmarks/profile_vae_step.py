"""Where one training step of the tiny VAE spends its time (GPU; issue 21).

The H200 ran ``train_vae`` at 3-4 steps/s whatever the clip length (~1.7 TFLOP/s for the tiny
Wan VAE's ~1.5 GFLOP per frame, forward + backward): see
``benchmarks/results/h200_tiny_training.md``. This times, in one run, for pictures x288 and
17-frame clips x48 (the GPU plan's batches):

* ``sample`` — ``ClipSampler.sample`` alone (per-clip Python + drawing on the GPU);
* ``fp32`` — the step as ``train_vae`` runs it (TF32 allowed, as ``fit`` sets);
* ``bf16`` — the same under ``torch.autocast(bfloat16)``;
* ``bf16 + channels_last_3d`` — and the model and input in channels-last memory format;

then prints the top kernels of one fp32 step (``torch.profiler``).

    python benchmarks/profile_vae_step.py [--data .traindata] [--reps 10]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np
import torch

from wanstudio.encoders import VAE
from wanstudio.train import dataset
from wanstudio.train.train import reconstruction_loss


def step(model, opt, clip, autocast: bool) -> None:
    """One ``train_vae`` step (its loss, without the latent noise)."""
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        rec = model.decode(model.encode(clip.video).latent_dist.mean).sample
    err = rec.float() - clip.video
    loss = reconstruction_loss(err, clip.mouth_xy)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def seconds(fn, reps: int) -> float:
    """Median wall seconds of ``fn`` (synchronised) over ``reps`` calls after two untimed ones."""
    times = []
    for i in range(reps + 2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=".traindata")
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    data = dataset.SpeechData.load(Path(args.data))
    rng = np.random.default_rng(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for frames, batch in ((1, 288), (17, 48)):
        sampler = dataset.ClipSampler(data, frame_num=frames, device="cuda")
        clip = sampler.sample(rng, batch)
        row = {"sample": seconds(lambda s=sampler, b=batch: s.sample(rng, b), args.reps)}
        for name, autocast, channels_last in (
            ("fp32", False, False),
            ("bf16", True, False),
            ("bf16 + channels_last_3d", True, True),
        ):
            model = VAE.tiny(seed=0).model.cuda().train().requires_grad_(True)
            c = clip
            if channels_last:  # the Conv3d weights (the only 5-D parameters)
                for conv in (m for m in model.modules() if isinstance(m, torch.nn.Conv3d)):
                    conv.to(memory_format=torch.channels_last_3d)
                c = dataset.Clip(
                    **{**vars(clip), "video": clip.video.to(memory_format=torch.channels_last_3d)}
                )
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            row[name] = seconds(lambda m=model, o=opt, c=c, a=autocast: step(m, o, c, a), args.reps)
        per_frame = {
            k: f"{v * 1e3:.1f} ms ({v * 1e3 / (frames * batch):.3f} ms/frame)" for k, v in row.items()
        }
        print(
            f"{frames:>2} frames x {batch}: " + "; ".join(f"{k} {v}" for k, v in per_frame.items()),
            flush=True,
        )
    model = VAE.tiny(seed=0).model.cuda().train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step(model, opt, clip, False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step(model, opt, clip, False)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
