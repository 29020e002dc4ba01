"""Train the tiny preset: ``python -m wanstudio.train data``, ``fit``, then ``decoder``.

``fit`` trains, with the project's own classes at the 'tiny-infinitetalk' shapes:

1. the VAE (``VAE.tiny()``: diffusers' AutoencoderKLWan, base width 8, z 16) as an
   autoencoder on pictures, then 5- and 17-frame face clips (L1 + L2, the mouth weighted, a
   little latent noise so the decoder tolerates the DiT's errors; on clips a linear readout of
   every video frame's mouth from the latents (:class:`MouthReadout`) and the error of the
   mouth's frame-to-frame change); then its latents' per-channel mean / std replace the real
   Wan VAE's constants;
2. the DiT by flow matching exactly as the pipeline samples (WAN_SPEC.md §6, pipeline/sampler.py):
   ``x_s = (1 - s) x0 + s noise``, target ``noise - x0``, ``t = 1000 s`` with ``s`` drawn half
   uniform, half with the pipeline's shift 7; the clip's head latents (1: the reference frame of
   a first clip; 2-3: motion frames of a later clip) are clean, as the pipeline overwrites them,
   and carry no loss; ``y`` = 4-channel mask on latent frame 0 + VAE latents of [reference,
   zeros]; CLIP features of the reference; the pipeline's audio windows; audio dropped 10% of
   the time (the ¬A of audio guidance) and the prompt drawn from PROMPTS (incl. the default
   negative prompt), so the model learns to ignore the random umT5.
3. (``python -m wanstudio.train decoder FOLDER``) the decoder alone, the mouth weighted
   heavily (:func:`train_decoder`): the latents, so the DiT, stay valid.

The tiny umT5 / CLIP / wav2vec2 stay as seeded (random) and are copied to the output. Then
the trained parts run through ``InfiniteTalkPipeline`` itself on the held-out speech with the
shipped portrait and a second drawn one, and the scores of :mod:`wanstudio.eval` are written.

Output folder (at most 7 files): dit / vae / encoders .safetensors, loss.csv, metrics.json,
PROVENANCE.md, preview.png.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from . import dataset

TIME_SHIFT = 7.0  # the pipeline's default shift (480 class, the tiny preset's size class)


@dataclass
class Budget:
    """Steps and seconds of one stage; the stage ends at whichever comes first."""

    steps: int
    seconds: float
    batch: int
    lr: float

    def progress(self, step: int, elapsed: float) -> float:
        """How far the stage is, as the larger of its step and time fractions (1 or more: over)."""
        if self.steps <= 0 or self.seconds <= 0:
            return 1.0
        return max(step / self.steps, elapsed / self.seconds)


def lr_at(budget: Budget, step: int, elapsed: float, warmup: int) -> float:
    """Linear warm-up, then cosine from lr to lr / 10 over the budget."""
    p = min(1.0, budget.progress(step, elapsed))
    warm = min(1.0, (step + 1) / warmup)
    return budget.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


class Log:
    """Loss rows for loss.csv and a printed line now and then."""

    def __init__(self, every_s: float = 10.0):
        self.rows: list[tuple] = []
        self.every_s = every_s
        self.t0 = time.perf_counter()
        self._last = -1e9

    def add(self, stage: str, step: int, loss: float, lr: float, **extra) -> None:
        """Record one row; print it (with ``extra`` values) when ``every_s`` seconds have passed."""
        now = time.perf_counter() - self.t0
        self.rows.append((stage, step, round(now, 2), loss, lr))
        if now - self._last >= self.every_s:
            self._last = now
            more = "".join(f" {k} {v:.4f}" for k, v in extra.items())
            print(f"[{now:7.1f}s] {stage} step {step:5d} loss {loss:.5f} lr {lr:.2e}{more}", flush=True)

    def csv(self) -> str:
        """The rows as loss.csv text (stage, step, seconds, loss, lr)."""
        lines = ["stage,step,seconds,loss,lr"]
        lines += [f"{s},{i},{t},{loss:.6f},{lr:.3e}" for s, i, t, loss, lr in self.rows]
        return "\n".join(lines) + "\n"


# --- the VAE --------------------------------------------------------------------------------------
def pixel_weights(mouth_xy: torch.Tensor, size: int, boost: float = 4.0, sigma: float = 6.0) -> torch.Tensor:
    """[B, 1, 1, size, size]: 1 + boost * a Gaussian around each clip's mouth."""
    ax = torch.arange(size, device=mouth_xy.device, dtype=torch.float32) + 0.5
    dx = (ax[None, :] - mouth_xy[:, :1]) ** 2  # (B, W)
    dy = (ax[None, :] - mouth_xy[:, 1:]) ** 2  # (B, H)
    g = torch.exp(-(dy[:, :, None] + dx[:, None, :]) / (2 * sigma**2))
    return (1 + boost * g)[:, None, None]


def reconstruction_loss(err: torch.Tensor, mouth_xy: torch.Tensor) -> torch.Tensor:
    """L1 + L2 of ``err`` (reconstruction - video, [B, 3, F, H, W]), the mouth weighted x5."""
    w = pixel_weights(mouth_xy, err.shape[-1])
    return (w * err.abs()).mean() + (w * err**2).mean()


def change_error(err: torch.Tensor) -> torch.Tensor:
    """|error of the frame-to-frame change| = |err[t] - err[t-1]|: [B, 3, F - 1, H, W]."""
    return (err[:, :, 1:] - err[:, :, :-1]).abs()


def mouth_cells(z: torch.Tensor, mouth_xy: torch.Tensor, stride: int) -> torch.Tensor:
    """The latents of the 3x3 cells around each clip's mouth (zero past an edge), the cells
    :func:`~wanstudio.train.evaluate.mouth_probe` reads: [B, z, F_lat, h, w] -> [B, F_lat, z * 9]."""
    B, _, _, h, w = z.shape
    zp = torch.nn.functional.pad(z, (1, 1, 1, 1))
    m = torch.div(mouth_xy, stride, rounding_mode="floor").long()
    xs = m[:, 0].clamp(0, w - 1)[:, None] + torch.arange(3, device=z.device)  # (B, 3), padded: m-1..m+1
    ys = m[:, 1].clamp(0, h - 1)[:, None] + torch.arange(3, device=z.device)
    b = torch.arange(B, device=z.device)[:, None, None]
    cells = zp.permute(0, 3, 4, 1, 2)[b, ys[:, :, None], xs[:, None, :]]  # (B, 3, 3, z, F_lat)
    return cells.permute(0, 4, 3, 1, 2).flatten(2)


class MouthReadout(torch.nn.Module):
    """Linear readouts of the drawn mouth from :func:`mouth_cells`, trained with the VAE.

    Reconstruction alone lets the VAE smear the lips: they are ~1% of the pixels, and a later
    latent frame packs 4 video frames (a ridge probe of run 2's 17-frame latents: r 0.15, of its
    single pictures 0.54; benchmarks/results/h200_tiny_training.md). This auxiliary loss asks
    the encoder to keep each of a latent frame's video frames' mouth (open, wide, round) readable,
    from the noised latents the decoder sees, so it must stand above the training noise (H200,
    440 s: per-frame probe 0.74 at weight 0.3, 0.89 at 1.0). The readout is discarded after
    training; the VAE's architecture is untouched.
    """

    def __init__(self, z_dim: int, frames_per_latent: int, mean, std):
        super().__init__()
        self.first = torch.nn.Linear(z_dim * 9, 3)
        self.later = torch.nn.Linear(z_dim * 9, 3 * frames_per_latent)
        self.per = frames_per_latent
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))

    def loss(self, cells: torch.Tensor, mouth: torch.Tensor) -> torch.Tensor:
        """Mean squared error on standardised tracks. cells [B, F_lat, z*9]; mouth [B, F, 3]."""
        target = (mouth - self.mean) / self.std
        err = (self.first(cells[:, 0]) - target[:, 0]) ** 2
        if cells.shape[1] == 1:
            return err.mean()
        B, n = cells.shape[:2]
        later = target[:, 1:].reshape(B, n - 1, 3 * self.per)  # (B, F_lat - 1, per * 3): frame-major
        return torch.cat([err.flatten(), ((self.later(cells[:, 1:]) - later) ** 2).flatten()]).mean()


def train_vae(
    vae,
    curriculum: list[tuple[dataset.ClipSampler, int, float]],
    rng,
    budget: Budget,
    log: Log,
    latent_noise: float = 0.1,
    readout_weight: float = 1.0,
    motion_weight: float = 1.0,
) -> int:
    """Autoencoder training of ``vae.model``; returns the steps taken.

    ``curriculum``: (sampler, clips per step, until) in order; a stage draws from its sampler
    until ``until`` of the budget is spent (the last stage runs to the end). Pictures first: a
    step of 288 different faces teaches the spatial path (faces, colours) faster than 48 clips
    of one face each (H200: identity 21.9 -> 25.3 dB); then short clips, then the pipeline's
    17 frames (a VAE trained on short clips alone decodes latent frames 3..5 of a clip as grey
    mush: its causal caches differ there).

    Loss: L1 + L2, the mouth weighted (x5 broadly; on clips also x13 tightly), plus
    ``readout_weight`` x the :class:`MouthReadout` error and, on clips, ``motion_weight`` x
    the L1 error of the mouth's frame-to-frame change, which is what the lip-sync score
    measures: drawing each latent frame's mean mouth scores sync 0.17 where the per-frame
    mouth scores 0.72 (the held-out speech, drawn without any model). Gradients are clipped on
    the VAE's parameters only.
    """
    model = vae.model
    model.train().requires_grad_(True)
    data = curriculum[0][0].data
    track = data.mouth.astype("float32")
    readout = MouthReadout(model.config.z_dim, vae.temporal_stride, track.mean(0), track.std(0) + 1e-3)
    readout.to(next(model.parameters()).device)
    params = list(model.parameters()) + list(readout.parameters())
    opt = torch.optim.AdamW(params, lr=budget.lr, betas=(0.9, 0.99), weight_decay=0.0)
    t0, step = time.perf_counter(), 0
    while (done := budget.progress(step, time.perf_counter() - t0)) < 1:
        lr = lr_at(budget, step, time.perf_counter() - t0, warmup=50)
        for group in opt.param_groups:
            group["lr"] = lr
        sampler, batch, _ = next((c for c in curriculum if done < c[2]), curriculum[-1])
        clip = sampler.sample(rng, batch)
        x = clip.video
        mu = model.encode(x).latent_dist.mean
        noise = latent_noise * mu.detach().std() * torch.randn_like(mu)  # relative to the latents' scale
        z = mu + noise
        rec = model.decode(z).sample
        size = x.shape[-1]
        err = rec - x
        clips = x.shape[2] > 1
        cells = mouth_cells(z, clip.mouth_xy, vae.spatial_stride)
        # pictures already keep the mouth (probe 0.54): there the readout only learns, on clips
        # it also pulls the encoder
        read = readout.loss(cells if clips else cells.detach(), clip.mouth)
        loss = reconstruction_loss(err, clip.mouth_xy) + readout_weight * read
        if clips:
            tight = pixel_weights(clip.mouth_xy, size, boost=12.0, sigma=2.5) - 1
            loss = loss + (tight * err.abs()).mean() + motion_weight * (tight * change_error(err)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        l1 = err.detach().abs().mean().item()
        log.add("vae", step, loss.item(), lr, l1=l1, read=read.item(), frames=float(x.shape[2]))
        step += 1
    model.eval().requires_grad_(False)
    return step


def train_decoder(
    vae,
    sampler: dataset.ClipSampler,
    rng,
    budget: Budget,
    log: Log,
    mouth_weight: float = 10.0,
    latent_noise: float = 0.1,
    cycle_weight: float = 0.0,
) -> int:
    """Fine-tune the VAE's decoder alone on clips, the mouth first; returns the steps taken.

    The encoder (so every latent, the latent statistics and a DiT trained on them) stays as it
    is. Why: after ``train_vae`` the latents hold each frame's mouth (``mouth_probe`` 0.89) and
    the DiT draws it from the audio (the same readout on its samples: 0.91, shuffled audio
    0.33), yet the decoder renders a faint smudge whose motion does not follow the drawn one.
    Loss: the L1 + L2 of ``train_vae`` plus ``mouth_weight`` x the mean, over a Gaussian window
    around the mouth (sigma 3 px, normalised to sum 1 per frame), of the L1 error and of the
    error of the frame-to-frame change: a per-pixel mean over the picture gives the ~30 mouth
    pixels of 4096 no say.

    ``cycle_weight``: x the mean square, in the DiT's normalised units, of the difference between
    the (frozen) encoder's latents of the decoded clip's last 5 or 9 frames and of the true
    ones. The pipeline seeds every later clip with exactly that encoding of the previous clip's
    tail; a decoder trained on pictures alone drew frames that the encoder maps elsewhere
    (relative latent error 0.54, run E4 of round 4), and the face faded clip after clip (4
    round trips: 23.6 -> 19.4 dB PSNR, :func:`~wanstudio.train.evaluate.round_trip_fade`).
    """
    model = vae.model
    model.eval().requires_grad_(False)
    decoder = [model.post_quant_conv, model.decoder]
    params = [p for part in decoder for p in part.parameters()]
    for part in decoder:
        part.train().requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=budget.lr, betas=(0.9, 0.99), weight_decay=0.0)
    t0, step = time.perf_counter(), 0
    while budget.progress(step, time.perf_counter() - t0) < 1:
        lr = lr_at(budget, step, time.perf_counter() - t0, warmup=20)
        for group in opt.param_groups:
            group["lr"] = lr
        clip = sampler.sample(rng, budget.batch)
        x = clip.video
        with torch.no_grad():
            mu = model.encode(x).latent_dist.mean
        rec = model.decode(mu + latent_noise * mu.std() * torch.randn_like(mu)).sample
        err = rec - x
        window = pixel_weights(clip.mouth_xy, x.shape[-1], boost=1.0, sigma=3.0) - 1
        window = window / window.sum(dim=(-2, -1), keepdim=True)  # (B, 1, 1, H, W), sums to 1
        mouth = (window * err.abs()).sum((-2, -1)).mean() + (window * change_error(err)).sum((-2, -1)).mean()
        loss = reconstruction_loss(err, clip.mouth_xy) + mouth_weight * mouth
        cycle = torch.zeros(())
        if cycle_weight > 0:
            tail = 1 + model.config.scale_factor_temporal * (1 + step % 2)  # 5 or 9: motion_frame
            with torch.no_grad():
                want = model.encode(x[:, :, -tail:]).latent_dist.mean
            got = model.encode(rec[:, :, -tail:]).latent_dist.mean
            std = vae.latents_std.to(got.device).view(1, -1, 1, 1, 1)
            cycle = (((got - want) / std) ** 2).mean()
            loss = loss + cycle_weight * cycle
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        log.add("decoder", step, loss.item(), lr, mouth=mouth.item(), cycle=cycle.item())
        step += 1
    model.eval().requires_grad_(False)
    return step


def vae_curriculum(data, plan: dict, device) -> list[tuple[dataset.ClipSampler, int, float]]:
    """The plan's ``vae_stages`` [(frames, batch multiplier, until), ...] as samplers."""
    batch = plan["vae"][2]
    return [
        (dataset.ClipSampler(data, frame_num=frames, device=device), max(1, int(mult * batch)), until)
        for frames, mult, until in plan["vae_stages"]
    ]


@torch.no_grad()
def latent_stats(vae, sampler, rng, batches: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean / std of the VAE's raw latents (posterior means) over sampled clips."""
    zs = []
    for _ in range(batches):
        zs.append(vae.model.encode(sampler.sample(rng, batch).video).latent_dist.mean.float())
    z = torch.cat(zs).transpose(0, 1).flatten(1)  # (C, everything else)
    return z.mean(1), z.std(1).clamp_min(1e-3)


# --- the DiT --------------------------------------------------------------------------------------
@dataclass
class Pool:
    """Encoded training clips, on the training device."""

    x0: torch.Tensor  # (N, z, F_lat, h, w) normalised latents
    y: torch.Tensor  # (N, z, F_lat, h, w) latents of [reference, zeros]
    clip: torch.Tensor  # (N, tokens, clip_dim) float16
    audio: torch.Tensor  # (N, 1, F, window, layers, dim) float16
    first: torch.Tensor  # (N,) bool: the clip starts at the utterance's frame 0
    mouth: torch.Tensor  # (N, 2) mouth centre on the latent grid (x, y)
    round_trip: torch.Tensor  # (N, z, HEAD_LATENTS, h, w) the head latents after decode + encode

    def __len__(self) -> int:
        return len(self.x0)


HEAD_LATENTS = 3  # a later clip's clean head: 2 latents (5 motion frames) or 3 (9)


@torch.no_grad()
def build_pool(vae, image_encoder, sampler: dataset.ClipSampler, rng, size: int, batch: int) -> Pool:
    """Draw and encode ``size`` clips: latents, reference latents, CLIP features, audio, and
    the head latents as the pipeline makes them for a later clip: the previous clip's decoded
    last frames, encoded again (see :func:`dit_batch`)."""
    parts: dict[str, list] = {k: [] for k in ("x0", "y", "clip", "audio", "first", "mouth", "round_trip")}
    stride = vae.spatial_stride
    head_frames = 1 + (HEAD_LATENTS - 1) * vae.temporal_stride
    while sum(len(p) for p in parts["x0"]) < size:
        c = sampler.sample(rng, batch)
        x0 = vae.encode(c.video)
        parts["x0"].append(x0.clone())
        decoded = vae.decode(x0[:, :, :HEAD_LATENTS]).clamp(-1, 1)  # causal: the head's frames alone
        parts["round_trip"].append(vae.encode(decoded[:, :, :head_frames]).clone())
        video0 = torch.zeros_like(c.video)
        video0[:, :, 0] = c.reference
        parts["y"].append(vae.encode(video0).clone())
        parts["clip"].append(image_encoder.encode(c.reference).half().clone())
        parts["audio"].append(c.audio.half())
        parts["first"].append(c.start == 0)
        parts["mouth"].append(c.mouth_xy / stride)
    return Pool(**{k: torch.cat(v)[:size] for k, v in parts.items()})


def sample_sigmas(n: int, device, generator: torch.Generator) -> torch.Tensor:
    """Half uniform in (0, 1), half uniform pushed through the pipeline's shift (high noise)."""
    u = torch.rand(n, generator=generator).clamp(1e-3, 1 - 1e-3)
    shifted = TIME_SHIFT * u / (1 + (TIME_SHIFT - 1) * u)
    pick = torch.rand(n, generator=generator) < 0.5
    return torch.where(pick, shifted, u).to(device)


def dit_batch(
    pool: Pool,
    contexts: torch.Tensor,
    idx: torch.Tensor,
    g: torch.Generator,
    cond_dim: int,
    round_trip: float = 0.0,
):
    """One flow-matching batch: (model kwargs, target, loss weights [B, 1, F_lat, h, w]).

    ``round_trip``: the share of later clips whose clean head is the pool's decoded and
    re-encoded one, as the pipeline gives it (the previous clip's decoded tail, encoded again),
    while the target stays the true clip. Trained on exact heads only, the model continues
    whatever the head shows, and the tiny VAE's lossy round trip compounds clip after clip (the
    face fades ~0.6 dB PSNR per clip, h200_tiny_training.md round 4); so it learns the true clip
    from a blurred head. Measured: the shipped DiT was trained on at 0.5; alone it did not lift
    the held-out scores, the decoder's round-trip term (:func:`train_decoder`) did.
    """
    dev = pool.x0.device
    B = len(idx)
    x0 = pool.x0[idx].float()
    _, z, n_lat, h, w = x0.shape
    # clean head latents: a first clip has the reference (1) or 2 frames; a later clip 2-3
    r = torch.rand(B, generator=g).to(dev)
    first = pool.first[idx]
    n_head = torch.where(first, 1 + (r > 0.75).long(), 2 + (r > 0.75).long())
    head = (torch.arange(n_lat, device=dev)[None, :] < n_head[:, None]).view(B, 1, n_lat, 1, 1)
    swap = (~first & (torch.rand(B, generator=g).to(dev) < round_trip)).view(B, 1, 1, 1, 1)
    given = x0.clone()
    given[:, :, :HEAD_LATENTS] = torch.where(swap, pool.round_trip[idx].float(), x0[:, :, :HEAD_LATENTS])
    sigma = sample_sigmas(B, dev, g).view(B, 1, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=g).to(dev)
    xt = torch.where(head, given, (1 - sigma) * x0 + sigma * noise)
    mask = torch.zeros(B, cond_dim - z, n_lat, h, w, device=dev)
    mask[:, :, 0] = 1
    keep_audio = (torch.rand(B, generator=g) > 0.1).to(dev).view(B, 1, 1, 1, 1, 1)
    prompt = torch.randint(0, len(contexts), (B,), generator=g).to(dev)
    kwargs = dict(
        x=xt,
        t=sigma.flatten() * 1000,
        context=contexts[prompt],
        clip_fea=pool.clip[idx].float(),
        y=torch.cat([mask, pool.y[idx].float()], dim=1),
        audio=pool.audio[idx].float() * keep_audio,
    )
    ys = torch.arange(h, device=dev, dtype=torch.float32) + 0.5
    xs = torch.arange(w, device=dev, dtype=torch.float32) + 0.5
    m = pool.mouth[idx]
    bump = torch.exp(
        -((ys[None, :, None] - m[:, 1, None, None]) ** 2 + (xs[None, None, :] - m[:, 0, None, None]) ** 2) / 2
    )
    weight = (1 + 6 * bump)[:, None, None] * (~head).float()  # (B, 1, F_lat, h, w)
    return kwargs, noise - x0, weight


def train_dit(
    model, pool: Pool, contexts: torch.Tensor, budget: Budget, log: Log, seed: int, round_trip: float = 0.0
) -> int:
    """Flow-matching training of the DiT on the pool (``round_trip``: :func:`dit_batch`);
    returns the steps taken."""
    model.train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=budget.lr, betas=(0.9, 0.99), weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    cond_dim = model.config.cond_dim
    t0, step = time.perf_counter(), 0
    while budget.progress(step, time.perf_counter() - t0) < 1:
        lr = lr_at(budget, step, time.perf_counter() - t0, warmup=200)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(pool), (budget.batch,), generator=g).to(pool.x0.device)
        kwargs, target, weight = dit_batch(pool, contexts, idx, g, cond_dim, round_trip)
        v = model(**kwargs)
        loss = (weight * (v - target) ** 2).sum() / (weight.sum() * v.shape[1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log.add("dit", step, loss.item(), lr)
        step += 1
    model.eval().requires_grad_(False)
    return step


# (steps, seconds, batch, lr) per stage; the pool size; the VAE's curriculum (frames, batch
# multiplier, until this fraction of its budget): pictures, then short clips, then the
# pipeline's 17 frames; the smoke run stops at 5. The GPU plan fits one 10-minute device call
# with `--deadline 590`; longer stages train better (h200_tiny_training.md, round 3)
PLANS = {
    "gpu": dict(
        vae=(100000, 200.0, 48, 2e-3),
        vae_stages=((1, 6, 0.3), (5, 2, 0.5), (17, 1, 1.0)),
        decoder=(100000, 120.0, 48, 2e-3),
        dit=(100000, 150.0, 256, 1e-3),
        pool=8192,
        pool_batch=256,
    ),
    "cpu": dict(
        vae=(2000, 900.0, 2, 2e-3),
        vae_stages=((1, 8, 0.45), (5, 2, 0.65), (17, 1, 1.0)),
        decoder=(1000, 600.0, 4, 1e-3),
        dit=(4000, 900.0, 16, 5e-4),
        pool=1024,
        pool_batch=32,
    ),
    "quick": dict(
        vae=(6, 60.0, 2, 2e-3),
        vae_stages=((1, 2, 0.5), (5, 1, 1.0)),
        decoder=(3, 30.0, 1, 1e-3),
        dit=(40, 40.0, 4, 5e-4),
        pool=16,
        pool_batch=8,
    ),
}
