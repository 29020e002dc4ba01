"""The trainer: its objective matches the pipeline's sampler; weights round-trip; a quick run."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from wanstudio.errors import CheckpointError
from wanstudio.pipeline import InfiniteTalkPipeline
from wanstudio.pipeline.sampler import EulerSampler
from wanstudio.pipeline.tiny_weights import load_tiny_trained, save_tiny_trained, tiny_weights_available
from wanstudio.train import dataset
from wanstudio.train.train import Pool, dit_batch, pixel_weights, sample_sigmas


def _pool(n=8, first=None):
    g = torch.Generator().manual_seed(0)
    return Pool(
        x0=torch.randn(n, 16, 5, 8, 8, generator=g),
        y=torch.randn(n, 16, 5, 8, 8, generator=g),
        clip=torch.randn(n, 257, 64, generator=g).half(),
        audio=torch.randn(n, 1, 17, 5, 3, 32, generator=g).half(),
        first=torch.tensor(first if first is not None else [True, False] * (n // 2)),
        mouth=torch.full((n, 2), 4.0),
    )


def test_dit_batch_is_what_the_pipeline_samples():
    """Noisy latents on the path the Euler sampler walks, clean head latents as the pipeline
    overwrites them, and a target velocity that one exact Euler step turns back into x0."""
    pool = _pool()
    contexts = torch.randn(3, 7, 64)
    idx = torch.arange(8)
    kw, target, weight = dit_batch(pool, contexts, idx, torch.Generator().manual_seed(1), cond_dim=20)
    x0 = pool.x0
    sigma = kw["t"] / 1000
    assert kw["y"].shape == (8, 20, 5, 8, 8)
    assert torch.equal(kw["y"][:, :4, 0], torch.ones(8, 4, 8, 8)) and kw["y"][:, :4, 1:].abs().sum() == 0
    assert torch.equal(kw["y"][:, 4:], pool.y)
    for b in range(8):
        head = int((weight[b, 0, :, 0, 0] == 0).sum())
        assert head in ((1, 2) if pool.first[b] else (2, 3))
        assert torch.equal(kw["x"][b, :, :head], x0[b, :, :head])  # clean head, no loss on it
        # Euler from sigma to 0 with the target velocity lands on x0 (sampler.py's update)
        sampler = EulerSampler(1, 1.0)
        sampler.schedule = torch.tensor([float(kw["t"][b]), 0.0])
        back = sampler.step(target[b : b + 1], 0, kw["x"][b : b + 1])
        assert torch.allclose(back[0, :, head:], x0[b, :, head:], atol=1e-5)
        assert 0 < sigma[b] < 1
    dropped = (kw["audio"].flatten(1).abs().sum(1) == 0).float().mean()
    assert dropped < 0.5


def test_sigmas_cover_the_pipelines_high_noise_steps():
    s = sample_sigmas(20000, "cpu", torch.Generator().manual_seed(0))
    assert s.min() > 0 and s.max() < 1
    assert (s > 0.9).float().mean() > 0.2  # the shift-7 schedule spends most steps up there
    assert (s < 0.3).float().mean() > 0.1


def test_pixel_weights_peak_at_the_mouth():
    w = pixel_weights(torch.tensor([[10.0, 40.0]]), 64)
    assert w.shape == (1, 1, 1, 64, 64)
    assert w[0, 0, 0, 40, 10] == w.max() and w[0, 0, 0, 5, 60] == pytest.approx(1.0)


def test_weights_round_trip_into_a_fresh_tiny_pipeline(tmp_path):
    src = InfiniteTalkPipeline.tiny(seed=3)
    with torch.no_grad():
        src.vae.latents_mean.fill_(0.25)
        src.vae.latents_std.fill_(2.0)
    parts = (src.model, src.vae, src.text_encoder, src.image_encoder, src.audio_encoder)
    save_tiny_trained(tmp_path, *parts)
    assert tiny_weights_available(tmp_path)
    dst = InfiniteTalkPipeline.tiny(seed=0)
    load_tiny_trained(dst.model, dst.vae, dst.text_encoder, dst.image_encoder, dst.audio_encoder, tmp_path)
    for a, b in zip(parts, (dst.model, dst.vae, dst.text_encoder, dst.image_encoder, dst.audio_encoder)):
        ma, mb = getattr(a, "model", a), getattr(b, "model", b)
        for (k, va), (_, vb) in zip(ma.state_dict().items(), mb.state_dict().items()):
            assert torch.equal(va, vb), k
    assert torch.equal(dst.vae.latents_std, torch.full((1, 16, 1, 1, 1), 2.0))
    assert dst.vae.model.config.latents_mean == [0.25] * 16


def test_loading_refuses_missing_or_foreign_files(tmp_path):
    pipe = InfiniteTalkPipeline.tiny()
    parts = (pipe.model, pipe.vae, pipe.text_encoder, pipe.image_encoder, pipe.audio_encoder)
    with pytest.raises(CheckpointError, match="no trained tiny weights"):
        load_tiny_trained(*parts, folder=tmp_path)
    save_tiny_trained(tmp_path, *parts)
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "dit.safetensors"))
    state["head.head.weight"] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / "dit.safetensors"))
    with pytest.raises(CheckpointError, match="other shape: head.head.weight"):
        load_tiny_trained(*parts, folder=tmp_path)


@pytest.mark.slow
def test_quick_fit_runs_end_to_end(tmp_path):
    """`python -m wanstudio.train fit --quick` on a 3-utterance babble set: every output file,
    a falling DiT loss, weights that load into InfiniteTalkPipeline.tiny's parts."""
    data = tmp_path / "data"
    dataset.build_dataset(data, seed=1, utterances=3, use_espeak=False, log=None)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "wanstudio.train", "fit", "--data", str(data), "--out", str(out)]
    done = subprocess.run(cmd + ["--quick", "--threads", "1"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [
            "dit.safetensors",
            "vae.safetensors",
            "encoders.safetensors",
            "loss.csv",
            "metrics.json",
            "PROVENANCE.md",
            "preview.png",
        ]
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dit"]["final_loss"] < metrics["dit"]["first_loss"]
    assert -1 <= metrics["vae"]["mouth_probe"] <= 1
    assert set(metrics["pipeline"]) >= {"speech_wav/shipped/default", "speech_wav/drawn/default"}
    rows = (out / "loss.csv").read_text().splitlines()
    assert rows[0] == "stage,step,seconds,loss,lr" and len(rows) > 40
    assert "seed: 0" in (out / "PROVENANCE.md").read_text()
    pipe = InfiniteTalkPipeline.tiny()
    load_tiny_trained(pipe.model, pipe.vae, pipe.text_encoder, pipe.image_encoder, pipe.audio_encoder, out)
    wave = np.full(8000, 0.01, np.float32)  # 0.5 s: 12 frames
    video = pipe(torch.zeros(3, 64, 64), wave, steps=1, progress=False, loudness=None)
    assert video.frames.shape == (12, 64, 64, 3)


def test_mouth_probe_reads_the_mouth_from_pixels_but_not_from_noise(tmp_path):
    """The VAE gate of `fit`: an 'encoder' that only averages pixels over the VAE's 8x8x4 cells
    keeps the mouth's darkness, so its readout follows the opening; noise latents do not."""
    from wanstudio.train.evaluate import mouth_probe

    dataset.build_dataset(tmp_path, seed=2, utterances=4, use_espeak=False, log=None)
    data = dataset.SpeechData.load(tmp_path)
    sampler = dataset.ClipSampler(data, frame_num=17, p_first=0.0)

    def pooled(video):  # [B, 3, 17, 64, 64] -> [B, 3, 5, 8, 8]: frame 0, then groups of 4
        first = torch.nn.functional.avg_pool3d(video[:, :, :1], (1, 8, 8))
        return torch.cat([first, torch.nn.functional.avg_pool3d(video[:, :, 1:], (4, 8, 8))], 2)

    opening = data.mouth[:, 0].astype(np.float32)
    r_pixels = mouth_probe(pooled, sampler, np.random.default_rng(0), opening, batches=8)
    noise = torch.Generator().manual_seed(0)
    r_noise = mouth_probe(
        lambda v: torch.randn(pooled(v).shape, generator=noise),
        sampler,
        np.random.default_rng(0),
        opening,
        batches=8,
    )
    # a cell's mean holds lips, chin and skin, and heads move: the pixels' readout is partial
    assert r_pixels > 0.45, r_pixels
    assert abs(r_noise) < 0.2, r_noise
