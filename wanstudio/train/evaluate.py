"""Run trained tiny parts through ``InfiniteTalkPipeline`` and score the videos.

The same check as tests/test_tiny_trained.py: held-out speech (a voice and sentences never
trained on, with a one-second pause), the shipped portrait and a second, differently drawn
one; lip sync, pause stillness and identity from :mod:`wanstudio.eval`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .. import eval as scores
from .faces import FaceStyle, draw_portrait

# what the tests hold the shipped weights to (see tests/test_tiny_trained.py)
BARS = dict(sync=0.5, pause=0.3, identity_db=20.0)
GUIDANCE = {"default": (5.0, 4.0), "audio_only": (1.0, 4.0)}  # (text_scale, audio_scale)


def heldout_speech(pause_s: float = 1.0) -> tuple[np.ndarray, tuple[float, float]]:
    """The shipped ``speech.wav`` (en-us, a voice and sentence training never uses) with a
    ``pause_s`` silence inserted at its quietest point in the middle third (the comma after
    "picture"). -> (16 kHz float32 wave, (pause start, pause end) in seconds)."""
    import wave as wavefile

    from ..media import asset_path

    with wavefile.open(str(asset_path("speech.wav"))) as w:
        if w.getframerate() != scores.SAMPLE_RATE or w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise ValueError("assets/speech.wav is expected to be 16 kHz mono 16-bit PCM")
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768
    hop = scores.SAMPLE_RATE // scores.FPS
    frames = len(x) // hop
    energy = (x[: frames * hop].reshape(frames, hop) ** 2).mean(1)
    a, b = frames // 3, 2 * frames // 3
    cut = (a + int(np.argmin(energy[a:b]))) * hop + hop // 2
    gap = np.zeros(int(pause_s * scores.SAMPLE_RATE), np.float32)
    wave = np.concatenate([x[:cut], gap, x[cut:]])
    return wave, (cut / scores.SAMPLE_RATE, cut / scores.SAMPLE_RATE + pause_s)


def eval_portraits() -> dict[str, Image.Image]:
    """The shipped portrait and the held-out drawn one (384 x 448, like the shipped file)."""
    from ..media import asset_path

    return {
        "shipped": Image.open(asset_path("portrait.png")).convert("RGB"),
        "drawn": Image.fromarray(draw_portrait(FaceStyle.held_out())),
    }


def score_video(frames, wave, portrait, pause) -> dict[str, float]:
    """sync, pause ratio and identity PSNR of one generated video, and the identity PSNR of its
    last second (``last_identity_db``: does the face fade clip after clip?)."""
    return dict(
        sync=round(scores.sync_score(frames, wave, reference=portrait), 4),
        pause=round(scores.pause_ratio(frames, wave, pause, reference=portrait), 4),
        identity_db=round(scores.identity_psnr(frames, portrait), 2),
        last_identity_db=round(scores.identity_psnr(frames[-scores.FPS :], portrait, first=scores.FPS), 2),
    )


def evaluate(
    pipe, wave: np.ndarray, pause: tuple[float, float], *, steps: int = 8, guidance=None, loudness=-23.0
):
    """Generate and score a video per (portrait, guidance). Returns (metrics, frames of the
    shipped portrait at the default guidance)."""
    metrics, keep = {}, None
    for name, portrait in eval_portraits().items():
        for label, (text_scale, audio_scale) in (guidance or GUIDANCE).items():
            result = pipe(
                portrait,
                wave,
                steps=steps,
                text_scale=text_scale,
                audio_scale=audio_scale,
                seed=42,
                progress=False,
                loudness=loudness,
            )
            frames = result.frames.numpy()
            metrics[f"{name}/{label}"] = score_video(frames, wave, portrait, pause)
            if keep is None:
                keep = frames
    return metrics, keep


def quant_mode_scores(trained=True, modes=None, steps: int = 8, precision: str = "bf16") -> dict[str, dict]:
    """Scores of the trained tiny model under each quantization mode, on the held-out speech
    with the shipped portrait (the demo's settings): {mode: {sync, pause, identity_db}}.

    ``trained``: True (the shipped weights) or a ``fit`` output folder; ``modes``: QuantMode
    values (default: every one); each runs at base ``precision`` on the CPU. What the README's
    quantization table shows, and what tests/test_tiny_trained.py holds within 0.05 of bf16.
    """
    from ..modes import RuntimeModes
    from ..options import QuantMode
    from ..pipeline import InfiniteTalkPipeline

    wave, pause = heldout_speech()
    portrait = eval_portraits()["shipped"]
    out = {}
    for mode in modes or [m.value for m in QuantMode]:
        pipe = InfiniteTalkPipeline.tiny(
            trained=trained, modes=RuntimeModes(quantization=mode, precision=precision)
        )
        video = pipe(portrait, wave, steps=steps, seed=42, progress=False)
        out[mode] = score_video(video.frames.numpy(), wave, portrait, pause)
    return out


def preview(frames: np.ndarray, wave: np.ndarray, path, columns: int = 16) -> None:
    """A PNG contact sheet: every second frame, rows of ``columns``, a loudness bar under each."""
    env = scores.loudness_envelope(wave, frames=len(frames))
    picked = list(range(0, len(frames), 2))
    rows = []
    for a in range(0, len(picked), columns):
        tiles = []
        for i in picked[a : a + columns]:
            tile = np.concatenate([frames[i], np.zeros((6, frames.shape[2], 3), np.uint8)], 0)
            tile[-5:, : int(round(env[i] * frames.shape[2]))] = (240, 190, 40)
            tiles.append(tile)
        while len(tiles) < columns:
            tiles.append(np.zeros_like(tiles[0]))
        rows.append(np.concatenate(tiles, 1))
    Image.fromarray(np.concatenate(rows, 0)).save(path)


def mouth_probe(encode, sampler, rng, mouth_open: np.ndarray, batches: int = 16, batch: int = 16) -> float:
    """Does the VAE's latent hold the mouth, frame by frame? Held-out Pearson r of a ridge
    readout of every video frame's mouth opening from the latents of the 3x3 latent cells around
    the mouth in its latent frame (a later latent frame packs ``stride`` video frames: one
    readout per position in it; with a 1-frame sampler, each picture's own latent frame).

    Per frame, not the latent frame's mean: the lip-sync score measures frame-to-frame motion,
    and the mean mouth alone, drawn perfectly, scores 0.17 on the held-out speech (the per-frame
    mouth 0.72). ~0: the DiT cannot learn lips from these latents, whatever its training (the
    data's audio features predict the opening at r ~0.9: benchmarks/results/h200_tiny_training.md).

    ``encode``: video [B, 3, F, H, W] -> latents [B, z, F_lat, h, w]; ``sampler`` a
    :class:`~wanstudio.train.dataset.ClipSampler`; ``mouth_open``: the data's per-frame track.
    """
    import torch

    feats, target = [], []
    with torch.no_grad():
        for _ in range(batches):
            clip = sampler.sample(rng, batch)
            z = encode(clip.video).float().cpu()  # (B, z, F_lat, h, w)
            n_lat, h, w = z.shape[2:]
            stride = clip.video.shape[-1] // w
            per_latent = (clip.video.shape[2] - 1) // max(1, n_lat - 1)  # video frames per later latent
            z = torch.nn.functional.pad(z, (1, 1, 1, 1))  # cells around an edge mouth exist
            for b in range(len(z)):
                mx, my = (clip.mouth_xy[b].cpu() / stride).long().tolist()
                mx, my = min(max(mx, 0), w - 1), min(max(my, 0), h - 1)  # padded: [m, m + 3) = m-1..m+1
                a = sampler.offsets[int(clip.utterance[b])] + int(clip.start[b])
                for f in range(1, n_lat) if n_lat > 1 else [0]:
                    feats.append(z[b, :, f, my : my + 3, mx : mx + 3].flatten().numpy())
                    first = a + 1 + per_latent * (f - 1) if f else a
                    target.append(mouth_open[first : first + (per_latent if f else 1)])
    x, y = np.stack(feats).astype(np.float64), np.stack(target).astype(np.float64)  # (N, 9z), (N, per)
    n = len(x) * 3 // 4  # fit on the first clips, score on the rest
    mean, std = x[:n].mean(0), x[:n].std(0) + 1e-8
    x = np.c_[(x - mean) / std, np.ones(len(x))]
    w = np.linalg.solve(x[:n].T @ x[:n] + 1e-2 * n * np.eye(x.shape[1]), x[:n].T @ y[:n])  # one per position
    r = np.corrcoef((x[n:] @ w).ravel(), y[n:].ravel())[0, 1]
    return round(float(np.nan_to_num(r)), 4)


def motion_fidelity(vae, sampler, rng, batches: int = 4, batch: int = 16) -> float:
    """Does the decoder draw the mouth moving as it moved? Pearson r, over fresh clips, between
    the per-frame mouth motion (mean absolute change of a 12 x 8 px box at the mouth, as the
    lip-sync score measures it) of the VAE's reconstruction and of the drawn clip. Round 3's VAE,
    whose latents hold the mouth (``mouth_probe`` 0.89) but whose decoder drew a smudge: 0.23;
    after 363 steps of the decoder stage: 0.51."""
    import torch

    got, want = [], []
    with torch.no_grad():
        for _ in range(batches):
            clip = sampler.sample(rng, batch)
            rec = vae.model.decode(vae.model.encode(clip.video).latent_dist.mean).sample.clamp(-1, 1)
            for b in range(batch):
                mx, my = clip.mouth_xy[b].round().long().tolist()
                x0, y0 = max(mx - 6, 0), max(my - 4, 0)
                for video, out in ((rec, got), (clip.video, want)):
                    box = video[b, :, :, y0 : my + 4, x0 : mx + 6]  # (3, F, 8, 12) away from the edges
                    out.append((box[:, 1:] - box[:, :-1]).abs().mean((0, 2, 3)).cpu().numpy())
    return round(scores.correlation(np.concatenate(got), np.concatenate(want)), 4)


def round_trip_fade(vae, sampler, rng, rounds: int = 4, batch: int = 16, frames: int = 5) -> list[float]:
    """What the pipeline's clip-to-clip hand-over does to a face: PSNR (dB) against the true
    clip of ``frames`` frames after 1 .. ``rounds`` encode + decode round trips (the pipeline
    encodes a clip's decoded last frames to seed the next clip). A VAE whose round trip is
    stable keeps the first value; run E4's (round 4) lost ~1.4 dB a round (23.6 -> 19.4 after 4)."""
    import torch

    clip = sampler.sample(rng, batch)
    truth = clip.video[:, :, :frames]
    out, video = [], truth
    with torch.no_grad():
        for _ in range(rounds):
            video = vae.model.decode(vae.model.encode(video).latent_dist.mean).sample.clamp(-1, 1)
            mse = ((video - truth) ** 2).mean().item()
            out.append(round(10 * float(np.log10(4 / max(mse, 1e-12))), 2))  # peak-to-peak 2
    return out
