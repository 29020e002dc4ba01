"""The trainer: its objective matches the pipeline's sampler; weights round-trip; a quick run."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from wanstudio.errors import CheckpointError
from wanstudio.modes import RuntimeModes
from wanstudio.pipeline import InfiniteTalkPipeline
from wanstudio.pipeline.sampler import EulerSampler
from wanstudio.pipeline.tiny_weights import load_tiny_trained, save_tiny_trained, tiny_weights_available
from wanstudio.train import dataset
from wanstudio.train.train import (
    Budget,
    Log,
    MouthReadout,
    Pool,
    dit_batch,
    mouth_cells,
    pixel_weights,
    sample_sigmas,
    train_decoder,
)


def _pool(n=8, first=None):
    g = torch.Generator().manual_seed(0)
    return Pool(
        x0=torch.randn(n, 16, 5, 8, 8, generator=g),
        y=torch.randn(n, 16, 5, 8, 8, generator=g),
        clip=torch.randn(n, 257, 64, generator=g).half(),
        audio=torch.randn(n, 1, 17, 5, 3, 32, generator=g).half(),
        first=torch.tensor(first if first is not None else [True, False] * (n // 2)),
        mouth=torch.full((n, 2), 4.0),
        round_trip=torch.randn(n, 16, 3, 8, 8, generator=g),
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


def test_round_trip_heads_replace_later_clips_heads_only():
    """With ``round_trip=1`` every later clip is given the pool's decoded-and-encoded head (what
    the pipeline re-encodes from the previous clip), a first clip its exact one; the noisy part
    and the target stay the true clip's, so the model learns to draw the true clip from it."""
    pool = _pool()
    contexts = torch.randn(3, 7, 64)
    idx = torch.arange(8)
    exact, t_exact, _ = dit_batch(pool, contexts, idx, torch.Generator().manual_seed(1), cond_dim=20)
    kw, target, weight = dit_batch(
        pool, contexts, idx, torch.Generator().manual_seed(1), cond_dim=20, round_trip=1.0
    )
    assert torch.equal(target, t_exact)
    for b in range(8):
        head = int((weight[b, 0, :, 0, 0] == 0).sum())
        given = pool.x0[b] if pool.first[b] else pool.round_trip[b]
        assert torch.equal(kw["x"][b, :, :head], given[:, :head])
        assert torch.equal(kw["x"][b, :, head:], exact["x"][b, :, head:])


def test_sigmas_cover_the_pipelines_high_noise_steps():
    s = sample_sigmas(20000, "cpu", torch.Generator().manual_seed(0))
    assert s.min() > 0 and s.max() < 1
    assert (s > 0.9).float().mean() > 0.2  # the shift-7 schedule spends most steps up there
    assert (s < 0.3).float().mean() > 0.1


def test_pixel_weights_peak_at_the_mouth():
    w = pixel_weights(torch.tensor([[10.0, 40.0]]), 64)
    assert w.shape == (1, 1, 1, 64, 64)
    assert w[0, 0, 0, 40, 10] == w.max() and w[0, 0, 0, 5, 60] == pytest.approx(1.0)


def test_mouth_cells_are_the_probes_3x3_cells():
    """The readout trained with the VAE sees the cells `mouth_probe` scores: the 3x3 latent
    cells around the mouth, zero past the grid's edge."""
    z = torch.arange(2 * 4 * 3 * 8 * 8, dtype=torch.float32).view(2, 4, 3, 8, 8)
    mouth_xy = torch.tensor([[37.0, 45.0], [2.0, 63.5]])  # pixels: cells (4, 5) and (0, 7), stride 8
    cells = mouth_cells(z, mouth_xy, stride=8)
    assert cells.shape == (2, 3, 4 * 9)
    padded = torch.nn.functional.pad(z, (1, 1, 1, 1))
    for b, (mx, my) in enumerate([(4, 5), (0, 7)]):
        for f in range(3):
            expect = padded[b, :, f, my : my + 3, mx : mx + 3].flatten()  # as mouth_probe slices
            torch.testing.assert_close(cells[b, f], expect, rtol=0, atol=0)
    assert (cells[1].view(3, 4, 3, 3)[:, :, :, 0] == 0).all()  # left of column 0: padding


def test_mouth_readout_targets_each_video_frame_of_a_latent_frame():
    """Latent frame 0 predicts video frame 0; latent frame k >= 1 predicts frames 4k-3 .. 4k
    (frame-major, 3 values each): a readout wired to copy those frames scores 0, one frame off
    does not."""
    B, F = 2, 9
    mouth = torch.rand(B, F, 3, generator=torch.Generator().manual_seed(0))
    readout = MouthReadout(z_dim=2, frames_per_latent=4, mean=torch.zeros(3), std=torch.ones(3))
    cells = torch.zeros(B, 3, 18)  # 3 latent frames, z 2 x 9 cells
    cells[:, 0, :3] = mouth[:, 0]
    cells[:, 1, :12] = mouth[:, 1:5].flatten(1)
    cells[:, 2, :12] = mouth[:, 5:9].flatten(1)
    with torch.no_grad():
        for head in (readout.first, readout.later):
            head.weight.zero_()
            head.bias.zero_()
            head.weight[:, : head.out_features] = torch.eye(head.out_features)
    assert readout.loss(cells, mouth).item() == 0
    assert readout.loss(cells, mouth.roll(1, dims=1)).item() > 0.01
    assert readout.loss(cells[:, :1], mouth[:, :1]).item() == 0  # a picture: frame 0 alone


def test_weights_round_trip_into_a_fresh_tiny_pipeline(tmp_path):
    src = InfiniteTalkPipeline.tiny(seed=3, trained=False)
    with torch.no_grad():
        src.vae.latents_mean.fill_(0.25)
        src.vae.latents_std.fill_(2.0)
    parts = (src.model, src.vae, src.text_encoder, src.image_encoder, src.audio_encoder)
    save_tiny_trained(tmp_path, *parts)
    assert tiny_weights_available(tmp_path)
    dst = InfiniteTalkPipeline.tiny(seed=0, trained=False)
    load_tiny_trained(dst.model, dst.vae, dst.text_encoder, dst.image_encoder, dst.audio_encoder, tmp_path)
    for a, b in zip(parts, (dst.model, dst.vae, dst.text_encoder, dst.image_encoder, dst.audio_encoder)):
        ma, mb = getattr(a, "model", a), getattr(b, "model", b)
        for (k, va), (_, vb) in zip(ma.state_dict().items(), mb.state_dict().items()):
            assert torch.equal(va, vb), k
    assert torch.equal(dst.vae.latents_std, torch.full((1, 16, 1, 1, 1), 2.0))
    assert dst.vae.model.config.latents_mean == [0.25] * 16


def test_tiny_uses_the_shipped_weights_when_there_are_any(tmp_path, monkeypatch):
    """`InfiniteTalkPipeline.tiny()` (so `wanstudio demo` and the notebooks) takes the weights in
    wanstudio/assets/tiny when they are there, before quantizing; trained=False keeps the seeded
    random preset; trained=True without files is a CheckpointError naming the folder."""
    import wanstudio.pipeline.tiny_weights as tw

    monkeypatch.setattr(tw, "TINY_WEIGHTS", tmp_path / "absent")
    assert "seed=0" in repr(InfiniteTalkPipeline.tiny(seed=0))
    with pytest.raises(CheckpointError, match="absent"):
        InfiniteTalkPipeline.tiny(trained=True)
    src = InfiniteTalkPipeline.tiny(seed=3, trained=False)
    save_tiny_trained(tmp_path, src.model, src.vae, src.text_encoder, src.image_encoder, src.audio_encoder)
    monkeypatch.setattr(tw, "TINY_WEIGHTS", tmp_path)
    pipe = InfiniteTalkPipeline.tiny(seed=0)
    assert "trained" in repr(pipe)
    # the trained preset's own defaults: 5 motion frames, no colour match; random keeps the match
    assert (pipe.default_motion_frame, pipe.default_color_correction) == (5, 0.0)
    assert InfiniteTalkPipeline.tiny(trained=False).default_color_correction == 1.0
    for name, value in src.model.state_dict().items():
        assert torch.equal(pipe.model.state_dict()[name], value), name
    assert not torch.equal(InfiniteTalkPipeline.tiny(seed=0, trained=False).model.head.head.weight, value)
    fp8 = InfiniteTalkPipeline.tiny(modes=RuntimeModes(quantization="fp8_e4m3fn_scaled", precision="fp32"))
    layer = fp8.model.blocks[0].ffn[0]  # quantized from the trained weight, not the seeded one
    weight = src.model.blocks[0].ffn[0].weight
    torch.testing.assert_close(layer.dequantized_weight(torch.float32), weight, rtol=0.07, atol=1e-3)


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
    assert metrics["decoder"]["steps"] == 3  # the quick plan's decoder stage
    # `decoder`: the decoder alone moves on; the DiT, the VAE's encoder and the encoders stay
    tuned = tmp_path / "tuned"
    cmd = [
        sys.executable,
        "-m",
        "wanstudio.train",
        "decoder",
        str(out),
        "--data",
        str(data),
        "--out",
        str(tuned),
    ]
    more = ["--steps", "2", "--batch", "1", "--checks", "1", "--threads", "1", "--no-eval"]
    done = subprocess.run(cmd + more, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("dit.safetensors", "encoders.safetensors", "vae.safetensors"):
        was, now = load_file(str(out / name)), load_file(str(tuned / name))
        assert sorted(was) == sorted(now), name
        changed = {k for k in was if not torch.equal(was[k], now[k])}
        if name == "vae.safetensors":
            assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)
        else:
            assert not changed, (name, sorted(changed)[:3])
    provenance = (tuned / "PROVENANCE.md").read_text()
    assert provenance.startswith((out / "PROVENANCE.md").read_text().rstrip())
    assert "## Then: the decoder fine-tuned" in provenance and '"steps": 2' in provenance
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

    def per_frame(video):  # each of a group's 4 frames kept as channels: [B, 12, 5, 8, 8]
        pooled_frames = torch.nn.functional.avg_pool3d(video, (1, 8, 8))  # (B, 3, 17, 8, 8)
        first = pooled_frames[:, :, :1].repeat(1, 4, 1, 1, 1)
        B, C, _, h, w = pooled_frames.shape
        rest = pooled_frames[:, :, 1:].reshape(B, C, 4, 4, h, w).transpose(2, 3).reshape(B, C * 4, 4, h, w)
        return torch.cat([first, rest], 2)

    r_frames = mouth_probe(per_frame, sampler, np.random.default_rng(0), opening, batches=8)
    # a cell's mean holds lips, chin and skin, and heads move: the pixels' readout is partial;
    # the probe scores each video frame, so latents that keep every frame score higher
    assert r_pixels > 0.45, r_pixels
    assert r_frames > r_pixels + 0.1, (r_frames, r_pixels)
    assert abs(r_noise) < 0.2, r_noise


@pytest.fixture(scope="module")
def clip_sampler(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    dataset.build_dataset(folder, seed=3, utterances=3, use_espeak=False, log=None)
    return dataset.ClipSampler(dataset.SpeechData.load(folder), frame_num=17, p_first=0.0)


def test_decoder_stage_leaves_the_encoder_and_its_latents_alone(clip_sampler):
    """`python -m wanstudio.train decoder` keeps a DiT's training valid: the encoder's weights and
    latents are bit-identical afterwards; only the decoder learned (the round-trip term, which
    runs the frozen encoder on the decoded frames, included)."""
    from wanstudio.encoders import VAE

    vae = VAE.tiny(seed=0)
    before = {k: v.clone() for k, v in vae.model.state_dict().items()}
    video = clip_sampler.sample(np.random.default_rng(0), 1).video
    z0 = vae.encode(video)
    log = Log(every_s=1e9)
    steps = train_decoder(
        vae, clip_sampler, np.random.default_rng(1), Budget(3, 120.0, 1, 1e-3), log, cycle_weight=1.0
    )
    assert steps == 3 and [r[0] for r in log.rows] == ["decoder"] * 3
    after = vae.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed), sorted(changed)[
        :5
    ]
    assert any(k.startswith("decoder.") for k in changed)
    torch.testing.assert_close(vae.encode(video), z0, rtol=0, atol=0)
    assert not vae.model.training and not any(p.requires_grad for p in vae.model.parameters())


def test_motion_fidelity_is_one_for_a_perfect_decoder_and_zero_for_a_frozen_mouth(clip_sampler):
    """The decoder's gate: a VAE that returns its input moves the mouth exactly as drawn (r 1);
    one that repeats frame 0 draws no motion at all (r 0)."""
    from types import SimpleNamespace

    from wanstudio.train.evaluate import motion_fidelity

    def fake(decode):
        encode = lambda x: SimpleNamespace(latent_dist=SimpleNamespace(mean=x))  # noqa: E731
        return SimpleNamespace(
            model=SimpleNamespace(encode=encode, decode=lambda z: SimpleNamespace(sample=decode(z)))
        )

    perfect = motion_fidelity(fake(lambda z: z), clip_sampler, np.random.default_rng(0), batches=1, batch=4)
    frozen = motion_fidelity(
        fake(lambda z: z[:, :, :1].expand_as(z)), clip_sampler, np.random.default_rng(0), batches=1, batch=4
    )
    assert perfect == 1.0
    assert frozen == 0.0


def test_round_trip_fade_is_flat_for_a_lossless_vae_and_falls_for_a_blurring_one(clip_sampler):
    """The hand-over check: a VAE that returns its input keeps the clip exactly every round; one
    that blurs a little each round loses more every round, as the pipeline's clips would."""
    from types import SimpleNamespace

    from wanstudio.train.evaluate import round_trip_fade

    def fake(decode):
        encode = lambda x: SimpleNamespace(latent_dist=SimpleNamespace(mean=x))  # noqa: E731
        return SimpleNamespace(
            model=SimpleNamespace(encode=encode, decode=lambda z: SimpleNamespace(sample=decode(z)))
        )

    def blur(z):  # a 3-tap box over the width
        return (z + z.roll(1, -1) + z.roll(-1, -1)) / 3

    rng = lambda: np.random.default_rng(0)  # noqa: E731
    lossless = round_trip_fade(fake(lambda z: z), clip_sampler, rng(), rounds=3, batch=2)
    fading = round_trip_fade(fake(blur), clip_sampler, rng(), rounds=3, batch=2)
    assert lossless[0] == lossless[1] == lossless[2] > 100  # the MSE floor: nothing lost
    assert 10 < fading[2] < fading[1] < fading[0] < 60, fading


def test_wrong_inputs_are_one_line_errors_and_leave_no_folder(tmp_path, capsys):
    """A missing data folder or weights folder: exit status 2, one line naming what to do, and no
    empty output folder left behind."""
    from wanstudio.train.run import main

    out = tmp_path / "out"
    assert (
        main(["decoder", str(tmp_path / "none"), "--out", str(out), "--data", str(tmp_path / "nodata")]) == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "python -m wanstudio.train decoder: error: no training data" in err
    assert "python -m wanstudio.train data" in err and not out.exists()
    data = tmp_path / "data"
    dataset.build_dataset(data, seed=1, utterances=2, use_espeak=False, log=None)
    assert (
        main(["decoder", str(tmp_path / "none"), "--out", str(out), "--data", str(data), "--device", "cpu"])
        == 2
    )
    assert "no trained tiny weights in" in capsys.readouterr().err and not out.exists()
