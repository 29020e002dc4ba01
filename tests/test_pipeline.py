"""InfiniteTalkPipeline: the generation loop against a fake DiT, streaming, resume, errors,
and the tiny preset end to end."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import wanstudio as ws
from wanstudio.pipeline import ClipPlan, InfiniteTalkPipeline, ProgressEvent
from wanstudio.pipeline.infinitetalk import DEFAULT_NEGATIVE_PROMPT
from wanstudio.pipeline.sampler import timestep_schedule


# --- fakes: known functions of their inputs -------------------------------------------------------
def fake_encode(video: torch.Tensor) -> torch.Tensor:
    """Averages each 4-frame group and 8x8 patch; the 16 channels are scaled copies of RGB."""
    B, C, Fr, H, W = video.shape
    assert (Fr - 1) % 4 == 0 and H % 8 == 0 and W % 8 == 0
    rest = video[:, :, 1:].reshape(B, C, (Fr - 1) // 4, 4, H, W).mean(3)
    v = F.avg_pool3d(torch.cat([video[:, :, :1], rest], 2), (1, 8, 8))
    return torch.cat([v * (1 + i / 16) for i in range(6)], 1)[:, :16]


def fake_decode(z: torch.Tensor) -> torch.Tensor:
    rgb = z[:, :3]
    v = torch.cat([rgb[:, :, :1], rgb[:, :, 1:].repeat_interleave(4, dim=2)], 2)
    return torch.tanh(v.repeat_interleave(8, -1).repeat_interleave(8, -2))


class FakeVAE:
    """fake_encode / fake_decode, recording their inputs."""

    z_dim, temporal_stride, spatial_stride = 16, 4, 8
    device = torch.device("cpu")

    def __init__(self):
        self.encoded: list[torch.Tensor] = []
        self.decoded: list[torch.Tensor] = []

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        self.encoded.append(video.clone())
        return fake_encode(video)

    def decode(self, z: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        self.decoded.append(z.clone())
        return fake_decode(z)


class FakeText:
    def __init__(self, text_dim: int = 64):
        self.text_dim = text_dim
        self.calls = 0

    def encode(self, texts):
        self.calls += 1
        out = []
        for s in texts:
            g = torch.Generator().manual_seed(int(hashlib.md5(s.encode()).hexdigest()[:8], 16))
            out.append(torch.randn(len(s) % 7 + 1, self.text_dim, generator=g))
        return out


class FakeImage:
    clip_dim = 64

    def encode(self, images):
        return images.mean(dim=(1, 2, 3))[:, None, None].expand(-1, 5, self.clip_dim).clone()


class FakeAudio:
    """Per video frame: the RMS of its 640 samples; channel 0 of layer 0 holds the frame index."""

    layers, dim = 3, 32

    def __init__(self):
        self.calls = 0

    def encode(self, wave, sample_rate=16000, num_frames=None):
        self.calls += 1
        T = num_frames if num_frames is not None else int(len(wave) / sample_rate * 25)
        per = sample_rate // 25
        feats = torch.zeros(T, self.layers, self.dim)
        for i in range(T):
            chunk = wave[i * per : (i + 1) * per]
            feats[i] = float(np.sqrt(np.mean(chunk**2))) if len(chunk) else 0.0
            feats[i, 0, 0] = i
        return feats


def fake_velocity(x, t, context, audio, y):
    return (
        0.1 * x + t[:, None, None, None, None] / 1e5 + context.mean() + 0.01 * audio.mean() + 0.1 * y.mean()
    )


class FakeDiT(torch.nn.Module):
    """A known function of its inputs; records every call."""

    def __init__(self, fail_at: int | None = None, nan_at: int | None = None, oom_at: int | None = None):
        super().__init__()
        self.config = ws.WanConfig.preset("tiny-infinitetalk")
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.calls: list[dict] = []
        self.fail_at, self.nan_at, self.oom_at = fail_at, nan_at, oom_at

    @property
    def device(self):
        return self.anchor.device

    @property
    def dtype(self):
        return self.anchor.dtype

    def forward(self, x, t, context, *, clip_fea=None, y=None, audio=None, ref_target_masks=None):
        n = len(self.calls)
        self.calls.append(
            dict(x=x.clone(), t=t.clone(), context=context, audio=audio, masks=ref_target_masks)
        )
        if n == self.fail_at:
            raise RuntimeError("injected failure")
        if n == self.oom_at:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        v = fake_velocity(x, t, context, audio, y)
        return v * math.nan if n == self.nan_at else v


def make_pipe(dit=None, **kw):
    dit = dit or FakeDiT()
    vae = FakeVAE()
    pipe = InfiniteTalkPipeline(
        dit, vae, kw.pop("text", FakeText()), FakeImage(), kw.pop("audio", FakeAudio()), frame_num=17, **kw
    )
    return pipe, dit, vae


IMAGE = torch.linspace(-0.8, 0.8, 3 * 32 * 48).reshape(3, 32, 48)  # a [3, H, W] tensor in [-1, 1]


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    rng = np.random.default_rng(seed)
    return (
        0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))
        + 0.01 * rng.standard_normal(t.size)
    ).astype(np.float32)


FAST = dict(steps=3, motion_frame=5, loudness=None, progress=False)


# --- the sampling loop against the fake DiT -------------------------------------------------------
def test_each_clip_calls_the_model_at_the_shifted_schedule_with_three_conditions():
    pipe, dit, _ = make_pipe()
    pipe(IMAGE, speech(0.5), shift=5.0, **FAST)  # 12 frames: one clip
    sched = timestep_schedule(3, 5.0)
    assert len(dit.calls) == 3 * 3
    assert [c["t"].item() for c in dit.calls] == pytest.approx(
        [t for t in sched[:-1].tolist() for _ in range(3)]
    )
    text = FakeText().encode(["", DEFAULT_NEGATIVE_PROMPT])
    for i in range(3):
        cond, drop_text, uncond = dit.calls[3 * i : 3 * i + 3]
        assert torch.equal(cond["context"][0], text[0]) and torch.equal(drop_text["context"][0], text[1])
        assert torch.equal(uncond["context"][0], text[1])
        assert cond["audio"].abs().sum() > 0 and torch.equal(cond["audio"], drop_text["audio"])
        assert uncond["audio"].abs().sum() == 0 and uncond["audio"].shape[1] == 1


def test_text_scale_one_makes_two_calls_per_step():
    pipe, dit, _ = make_pipe()
    pipe(IMAGE, speech(0.5), text_scale=1.0, audio_scale=2.0, **FAST)
    assert len(dit.calls) == 3 * 2
    cond, drop_audio = dit.calls[:2]
    assert torch.equal(cond["context"], drop_audio["context"])
    assert drop_audio["audio"].abs().sum() == 0


@pytest.mark.parametrize(
    "text_scale, audio_scale, calls", [(1.0, 1.0, 1), (1.0, 2.0, 2), (5.0, 4.0, 3), (4.0, 1.0, 3)]
)
def test_guidance_calls_per_step(text_scale, audio_scale, calls):
    pipe, dit, _ = make_pipe()
    pipe(IMAGE, speech(0.5), text_scale=text_scale, audio_scale=audio_scale, **FAST)
    assert len(dit.calls) == 3 * calls
    if calls == 1:  # v = v(T, A): the prompt and the real audio, every step
        assert all(c["audio"].abs().sum() > 0 for c in dit.calls)
        assert all(torch.equal(c["context"], dit.calls[0]["context"]) for c in dit.calls)


def test_guidance_free_distill_sampler_follows_its_timestep_list():
    """The distilled setting end to end: one DiT call per step, at the trained list shifted by 5."""
    pipe, dit, _ = make_pipe()
    kw = {**FAST, "steps": 4}
    pipe(IMAGE, speech(0.5), text_scale=1.0, audio_scale=1.0, scheduler="euler_distill", shift=5.0, **kw)
    want = [5 * u / (1 + 4 * u) * 1000 for u in (1.0, 0.75, 0.5, 0.25)]
    assert [c["t"].item() for c in dit.calls] == pytest.approx(want, abs=1e-3)


def test_an_explicit_distill_timestep_list_is_followed_and_checked_up_front():
    """timesteps= (lightx2v's 999/750/500/250, or any strictly decreasing list): steps follow its
    length, each is shifted; misuse fails before any work."""
    pipe, dit, _ = make_pipe()
    kw = {k: v for k, v in FAST.items() if k != "steps"}
    listed = (999.0, 750.0, 500.0, 250.0)
    out = pipe(
        IMAGE,
        speech(0.5),
        text_scale=1,
        audio_scale=1,
        scheduler="euler_distill",
        shift=5.0,
        timesteps=listed,
        **kw,
    )
    want = [5 * u / (1 + 4 * u) * 1000 for u in (0.999, 0.75, 0.5, 0.25)]
    assert [c["t"].item() for c in dit.calls] == pytest.approx(want, abs=1e-3)
    assert out.clips == 1 and len(dit.calls) == 4
    for bad, message in (
        (dict(scheduler="euler"), "is for scheduler 'euler_distill'"),
        (dict(scheduler="euler_distill", steps=3), "step_list has 4 timesteps but steps=3"),
        (dict(scheduler="euler_distill", timesteps=(250.0, 500.0)), "strictly decreasing"),
    ):
        dit.calls.clear()
        with pytest.raises(ws.PipelineError, match=message):
            pipe(IMAGE, speech(0.5), **{"timesteps": listed, **bad}, **kw)
        assert dit.calls == []


def hand_loop(pipe, vae, noise, head, audio, steps, shift, s_t, s_a, y):
    """WAN_SPEC §6 written out: Euler, 3-call CFG, head overwrite before calls and after updates."""
    text = FakeText().encode(["", DEFAULT_NEGATIVE_PROMPT])
    ctx, ctx_neg = text[0][None], text[1][None]
    sched = timestep_schedule(steps, shift)
    x = noise.clone()
    null = torch.zeros_like(audio[:, :1])
    for i in range(steps):
        x[:, :, : head.shape[2]] = head
        t = sched[i].reshape(1)
        cond = fake_velocity(x, t, ctx, audio, y)
        drop_text = fake_velocity(x, t, ctx_neg, audio, y)
        uncond = fake_velocity(x, t, ctx_neg, null, y)
        v = uncond + s_t * (cond - drop_text) + s_a * (drop_text - uncond)
        x = x - v * (sched[i] - sched[i + 1]) / 1000
        x[:, :, : head.shape[2]] = head
    return x


def test_sampling_matches_the_spec_written_out_and_overwrites_the_head():
    pipe, dit, vae = make_pipe()
    steps, shift, seed = 4, 7.0, 3
    pipe(
        IMAGE,
        speech(1.0),
        steps=steps,
        shift=shift,
        seed=seed,
        text_scale=5.0,
        audio_scale=4.0,
        motion_frame=5,
        loudness=None,
        progress=False,
        color_correction=0.0,
    )  # 25 frames: 2 clips
    assert len(vae.decoded) == 2
    gen = torch.Generator().manual_seed(seed)
    ref_video = torch.zeros(1, 3, 17, 32, 48)
    ref_video[:, :, 0] = IMAGE
    y = torch.cat([torch.zeros(1, 4, 5, 4, 6), fake_encode(ref_video)], 1)
    y[:, :4, 0] = 1
    # clip 1: the head is the reference frame's latent
    head1 = fake_encode(IMAGE[None, :, None])
    noise1 = torch.randn(1, 16, 5, 4, 6, generator=gen)
    audio1 = dit.calls[0]["audio"]
    want1 = hand_loop(pipe, vae, noise1, head1, audio1, steps, shift, 5.0, 4.0, y)
    assert torch.allclose(vae.decoded[0], want1, atol=1e-5)
    # clip 2: the head is the re-encoded last 5 decoded frames -> 1 + (5 - 1) / 4 = 2 latents
    decoded1 = fake_decode(vae.decoded[0])[0]
    head2 = fake_encode(decoded1[None, :, -5:])
    assert head2.shape[2] == 2
    noise2 = torch.randn(1, 16, 5, 4, 6, generator=gen)
    audio2 = dit.calls[3 * steps]["audio"]
    want2 = hand_loop(pipe, vae, noise2, head2, audio2, steps, shift, 5.0, 4.0, y)
    assert torch.allclose(vae.decoded[1], want2, atol=1e-5)
    # before every call the head holds the clean latents
    for k, head in ((0, head1), (1, head2)):
        for call in dit.calls[3 * steps * k : 3 * steps * (k + 1)]:
            assert torch.allclose(call["x"][:, :, : head.shape[2]], head, atol=1e-6)
        assert not torch.allclose(
            dit.calls[3 * steps * k]["x"][:, :, head.shape[2] :], torch.zeros(1), atol=1e-3
        )


def test_every_clip_shares_the_image_condition():
    pipe, dit, vae = make_pipe()
    pipe(IMAGE, speech(1.5), **FAST)
    encoded_ref = [v for v in vae.encoded if v.shape[2] == 17]
    assert len(encoded_ref) == 1  # [reference, zeros] encoded once for all clips
    assert torch.equal(encoded_ref[0][:, :, 0], IMAGE[None]) and encoded_ref[0][:, :, 1:].abs().sum() == 0
    assert all(c["x"].shape[2] == 5 for c in dit.calls)


# --- streaming -------------------------------------------------------------------------------------
def test_streaming_of_two_and_a_half_clips():
    """frame_num 17, motion 5: clips advance by 12. 1.2 s = 30 frames -> clips at 0, 12, 24
    (the last ends at 41 > 30: mirror-padded audio, output trimmed to 30 frames)."""
    events: list[ProgressEvent] = []
    pipe, dit, vae = make_pipe()
    out = pipe(
        IMAGE,
        speech(1.2),
        steps=2,
        motion_frame=5,
        loudness=None,
        progress=events.append,
        color_correction=0.0,
    )
    plan = ClipPlan.make(30, 17, 5, 1000)
    assert plan.clips == out.clips == 3 == len(vae.decoded)
    assert out.frames.shape == (30, 32, 48, 3) and out.frames.dtype == torch.uint8
    assert out.num_frames == 30 == int(1.2 * 25)
    assert [plan.kept(k) for k in range(3)] == [17, 12, 1]  # later clips drop their first 5 frames
    # the audio windows each clip saw: centre entries = its frame indices (mirrored past the end)
    centres = [dit.calls[k * 2 * 3]["audio"][0, 0, :, 2, 0, 0].tolist() for k in range(3)]
    assert centres[0] == list(range(0, 17)) and centres[1] == list(range(12, 29))
    assert centres[2] == [24, 25, 26, 27, 28, 29, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19]
    # the frames that reach the output: clip 2's first kept frame is its 6th decoded frame
    dec = [to_uint8(fake_decode(z)[0]) for z in vae.decoded]
    assert torch.equal(out.frames[:17], dec[0]) and torch.equal(out.frames[17:29], dec[1][5:])
    assert torch.equal(out.frames[29:], dec[2][5:6])
    kinds = [e.kind for e in events]
    assert kinds.count("step") == 3 * 2 and kinds.count("clip") == 3 and kinds[0] == "start"
    assert kinds[-1] == "done"
    last_step = [e for e in events if e.kind == "step"][-1]
    assert (last_step.clip, last_step.clips, last_step.step, last_step.steps) == (3, 3, 2, 2)
    assert all(e.eta is not None and e.elapsed >= 0 for e in events if e.kind == "step")
    assert [e.frames_done for e in events if e.kind == "clip"] == [17, 29, 30]


def to_uint8(video):
    return ((video.permute(1, 2, 3, 0) + 1) / 2 * 255).clamp(0, 255).to(torch.uint8)


def test_motion_frames_are_colour_corrected_before_reuse():
    pipe, dit, vae = make_pipe()
    pipe(IMAGE, speech(1.0), color_correction=1.0, **FAST)
    from wanstudio.pipeline.color import match_colors

    decoded1 = match_colors(fake_decode(vae.decoded[0])[0], IMAGE, 1.0)
    motion_encode = [v for v in vae.encoded if v.shape[2] == 5][0]
    assert torch.allclose(motion_encode[0], decoded1[:, -5:], atol=1e-6)


def test_max_frames_caps_the_output():
    pipe, _, vae = make_pipe()
    out = pipe(IMAGE, speech(2.0), max_frames=20, **FAST)
    assert out.num_frames == 20 and out.frames.shape[0] == 20 and len(vae.decoded) == 2


def test_short_audio_gives_one_trimmed_clip():
    pipe, _, vae = make_pipe()
    out = pipe(IMAGE, speech(0.2), **FAST)
    assert out.frames.shape[0] == 5 and len(vae.decoded) == 1


# --- resume ---------------------------------------------------------------------------------------
def test_resume_after_a_failure_in_clip_2_equals_an_uninterrupted_run(tmp_path):
    steps = 3
    reference = make_pipe()[0](IMAGE, speech(1.3, seed=1), seed=7, **FAST).frames
    failing = FakeDiT(fail_at=3 * steps + 4)  # clip 2, step 2
    pipe, _, _ = make_pipe(failing)
    with pytest.raises(RuntimeError, match="injected"):
        pipe(IMAGE, speech(1.3, seed=1), seed=7, work_dir=tmp_path / "work", **FAST)
    assert (tmp_path / "work" / "clip_0000.pt").exists()
    assert not (tmp_path / "work" / "clip_0001.pt").exists()
    resumed_dit = FakeDiT()
    pipe2, _, vae2 = make_pipe(resumed_dit)
    out = pipe2(IMAGE, speech(1.3, seed=1), seed=7, work_dir=tmp_path / "work", resume=True, **FAST)
    assert out.resumed_clips == 1 and len(vae2.decoded) == out.clips - 1
    assert len(resumed_dit.calls) == (out.clips - 1) * steps * 3
    assert torch.equal(out.frames, reference)


def test_resume_refuses_a_work_folder_of_other_settings(tmp_path):
    pipe, _, _ = make_pipe(FakeDiT(fail_at=12))
    with pytest.raises(RuntimeError):
        pipe(IMAGE, speech(1.3), work_dir=tmp_path, **FAST)
    pipe2, dit2, _ = make_pipe()
    with pytest.raises(ws.PipelineError, match="seed"):
        pipe2(IMAGE, speech(1.3), work_dir=tmp_path, resume=True, seed=1, **FAST)
    assert not dit2.calls


def test_nan_names_clip_and_step_and_finished_clips_stay_resumable(tmp_path):
    steps = 3
    pipe, _, _ = make_pipe(FakeDiT(nan_at=3 * steps + 3))  # clip 2, step 2, first call
    msg = (
        r"clip 2 of 3, step 2 of 3: the latents hold NaN/Inf.*"
        r"1 finished clip\(s\) .*resume=True to continue from clip 2"
    )
    with pytest.raises(ws.PipelineError, match=msg):
        pipe(IMAGE, speech(1.2), work_dir=tmp_path, **FAST)
    reference = make_pipe()[0](IMAGE, speech(1.2), **FAST).frames
    out = make_pipe()[0](IMAGE, speech(1.2), work_dir=tmp_path, resume=True, **FAST)
    assert out.resumed_clips == 1 and torch.equal(out.frames, reference)


def test_resume_refuses_another_torch_thread_count(tmp_path, monkeypatch):
    pipe, _, _ = make_pipe(FakeDiT(fail_at=12))
    with pytest.raises(RuntimeError, match="injected"):
        pipe(IMAGE, speech(1.3), work_dir=tmp_path, **FAST)
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads + 1)  # CPU sums differ
    pipe2, dit2, _ = make_pipe()
    with pytest.raises(ws.PipelineError, match=f"threads: {threads} -> {threads + 1}.*--overwrite"):
        pipe2(IMAGE, speech(1.3), work_dir=tmp_path, resume=True, **FAST)
    assert not dit2.calls


def test_a_run_without_resume_keeps_finished_clips_unless_told_to_overwrite(tmp_path):
    reference = make_pipe()[0](IMAGE, speech(1.3), **FAST).frames
    pipe, _, _ = make_pipe(FakeDiT(fail_at=3 * 3 + 1))  # clip 2
    with pytest.raises(RuntimeError, match="injected"):
        pipe(IMAGE, speech(1.3), work_dir=tmp_path, **FAST)
    pipe2, dit2, _ = make_pipe()
    with pytest.raises(
        ws.PipelineError, match=r"holds 1 finished clip\(s\) of an earlier run: pass resume=True"
    ):
        pipe2(IMAGE, speech(1.3), work_dir=tmp_path, **FAST)
    assert not dit2.calls and (tmp_path / "clip_0000.pt").exists()
    out = pipe2(IMAGE, speech(1.3), work_dir=tmp_path, overwrite=True, **FAST)
    assert out.resumed_clips == 0 and torch.equal(out.frames, reference)


def test_a_second_run_on_the_same_out_is_refused_while_the_first_holds_it(tmp_path):
    from wanstudio.pipeline import WorkFolder

    first = WorkFolder(tmp_path / "talk.mp4.work", {}, 1, temporary=True)  # a run in progress
    pipe, dit, _ = make_pipe()
    with pytest.raises(ws.PipelineError, match=r"talk\.mp4\.work is in use by another run \(pid "):
        pipe(IMAGE, speech(0.5), out=tmp_path / "talk.mp4", **FAST)
    assert not dit.calls and not (tmp_path / "talk.mp4").exists()
    first.finish()
    assert not (tmp_path / "talk.mp4.work").exists()


def test_a_full_disk_mid_run_is_reported_and_the_run_resumes(tmp_path, monkeypatch):
    import errno

    reference = make_pipe()[0](IMAGE, speech(1.3), **FAST).frames
    real_save, saves = torch.save, []

    def save(obj, f):
        saves.append(obj)
        if len(saves) == 2:  # clip 2: torch.save's RuntimeError raised while handling ENOSPC
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:626] unexpected pos") from None
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(ws.PipelineError, match=f"no space left on {tmp_path}: need ~.* MB") as err:
        make_pipe()[0](IMAGE, speech(1.3), work_dir=tmp_path, **FAST)
    assert "continue from clip 2" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip_0000.pt", "manifest.json"]
    monkeypatch.undo()
    out = make_pipe()[0](IMAGE, speech(1.3), work_dir=tmp_path, resume=True, **FAST)
    assert out.resumed_clips == 1 and torch.equal(out.frames, reference)


@pytest.mark.parametrize(
    "name, match",
    [
        ("", "it is a folder"),
        ("talk.txt", r"expected a name ending in \.mp4"),
        ("talk", "found 'no suffix'"),
        ("ro/talk.mp4", "the file system is read-only"),
    ],
)
def test_an_unwritable_out_fails_before_heavy_work(tmp_path, monkeypatch, name, match):
    import errno

    if name.startswith("ro/"):
        real_open = os.open

        def read_only(path, *a, **kw):
            if str(path).startswith(str(tmp_path / "ro")):
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return real_open(path, *a, **kw)

        (tmp_path / "ro").mkdir()
        monkeypatch.setattr(os, "open", read_only)
    text, audio = FakeText(), FakeAudio()
    pipe, dit, vae = make_pipe(text=text, audio=audio)
    with pytest.raises(ws.MediaError, match=match):
        pipe(IMAGE, speech(0.5), out=tmp_path / name, **FAST)
    assert not dit.calls and not vae.encoded and text.calls == 0 and audio.calls == 0


def test_a_run_removes_temp_files_of_killed_runs_beside_its_out(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".talk.mp4.{dead.pid}.0a1b2c3d.video.part"
    live = tmp_path / ".talk.mp4.1.0a1b2c3d.part"  # pid 1 runs: maybe another run's file
    for f in (stale, live):
        f.write_bytes(b"\0" * 1000)
    make_pipe()[0](IMAGE, speech(0.5), out=tmp_path / "talk.mp4", **FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "talk.mp4"])


def test_out_of_memory_is_reraised_with_advice(tmp_path):
    pipe, _, _ = make_pipe(FakeDiT(oom_at=4))
    with pytest.raises(ws.PipelineError) as info:
        pipe(IMAGE, speech(0.5), work_dir=tmp_path, **FAST)
    msg = str(info.value)
    assert "out of memory in clip 1 of 1, step 2 of 3" in msg
    assert "blocks_to_swap=" in msg and ws.QuantMode.FP8_E4M3FN_SCALED.value in msg and "resume=True" in msg
    assert isinstance(info.value.__cause__, torch.cuda.OutOfMemoryError)


# --- bad input fails before any heavy work ---------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(audio=None), "no audio"),
        # two speakers without boxes get the default halves (tests/test_dubbing.py); bad boxes fail
        (dict(audio2="two", bboxes=((0, 0, 24, 32), (16, 0, 48, 32))), "overlap"),
        (dict(audio2="two", bboxes=((0, 0, 24, 40), (24, 0, 48, 32))), "inside the 48x32 frame"),
        (dict(audio2="two", bboxes=((0, 0, 8, 8), (8, 0, 16, 8), (16, 0, 24, 8))), "more speaker boxes"),
        (dict(speaker_strengths=(1.0, 1.0)), "more speakers than speech tracks"),
        (dict(video="clip.mp4"), "not both"),
        (dict(size_class="1080"), "1080"),
        (dict(steps=0), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(shift=-1.0), "shift"),
        (dict(frame_num=18), "frame_num"),
        (dict(motion_frame=6), "motion_frame"),
        (dict(motion_frame=17), "motion_frame"),
        (dict(color_correction=2.0), "color_correction"),
        (dict(scheduler="dpm"), "euler"),
        (dict(speaker_mix="both"), "para"),
        (dict(max_frames=0), "max_frames"),
        (dict(bboxes=((0, 0, 4, 4), (4, 0, 8, 4))), "audio2"),
        (dict(audio="/no/such/file.wav"), "audio file not found"),
        (dict(size=(60, 64)), "multiples of 16"),
        (dict(resume=True), "resume=True needs"),
        (dict(text_scale=math.inf), "text_scale"),
    ],
)
def test_bad_input_fails_before_heavy_work(kwargs, match):
    text, audio = FakeText(), FakeAudio()
    pipe, dit, vae = make_pipe(text=text, audio=audio)
    args = dict(audio=speech(0.5), loudness=None, progress=False, steps=2)
    if kwargs.get("audio2") == "two":
        kwargs = dict(kwargs, audio2=speech(0.5))
    args.update(kwargs)
    audio_arg = args.pop("audio")
    with pytest.raises(ws.WanstudioError, match=match):
        pipe(IMAGE, audio_arg, **args)
    assert not dit.calls and not vae.encoded and text.calls == 0 and audio.calls == 0


@pytest.mark.parametrize(
    "part, match",
    [
        (dict(text=FakeText(text_dim=32)), "text encoder width 32 != DiT text_dim 64"),
        (dict(audio=type("A", (), {"layers": 12, "dim": 768})()), "12 layers x 768"),
    ],
)
def test_mismatched_components_are_refused(part, match):
    with pytest.raises(ws.PipelineError, match=match):
        make_pipe(**part)


def test_two_speakers_route_masks_and_audio():
    pipe, dit, _ = make_pipe()
    bboxes = ((0, 0, 24, 32), (24, 0, 48, 32))
    pipe(IMAGE, speech(0.5), audio2=speech(0.5, seed=3), bboxes=bboxes, **FAST)
    cond, _, uncond = dit.calls[:3]
    assert cond["audio"].shape[:2] == (1, 2) and uncond["audio"].shape[:2] == (1, 1)
    masks = cond["masks"]
    assert masks.shape == (3, 4, 6)  # latent grid of 32x48
    assert masks[0, :, :3].all() and not masks[0, :, 3:].any()
    assert masks[1, :, 3:].all() and not masks[2].any()


def test_masks_must_match_the_image():
    pipe, _, _ = make_pipe()
    with pytest.raises(ws.ShapeError, match="masks are in the source image's pixels"):
        pipe(IMAGE, speech(0.5), audio2=speech(0.5), masks=[np.ones((10, 10))] * 2, **FAST)


@pytest.mark.parametrize("scheduler, apg", [("unipc", False), ("euler", True), ("unipc", True)])
def test_other_samplers_and_apg_run(scheduler, apg):
    pipe, dit, _ = make_pipe()
    out = pipe(IMAGE, speech(0.8), scheduler=scheduler, apg=apg, **FAST)
    assert out.frames.shape[0] == 20 and len(dit.calls) == 2 * 3 * 3


# --- the tiny preset end to end (real model, encoders, VAE, media) ----------------------------------
@pytest.fixture(scope="module")
def tiny_pipe():
    pytest.importorskip("wanstudio.media")
    return InfiniteTalkPipeline.tiny(seed=0)


@pytest.fixture(scope="module")
def speech_file(tmp_path_factory):
    media = pytest.importorskip("wanstudio.media")
    return media.asset_path("speech.wav")


@pytest.mark.slow
def test_tiny_streaming_mp4_has_the_audio_duration(tiny_pipe, tmp_path):
    from wanstudio.media import asset_path, probe_media

    seconds = 2.5 * 12 / 25 + 5 / 25  # ~2.5 clips of 17 frames advancing by 12
    path = tmp_path / "talk.mp4"
    out = tiny_pipe(
        asset_path("portrait.png"), speech(seconds), out=path, steps=2, motion_frame=5, progress=False
    )
    frames = int(seconds * 25)
    assert out.clips == ClipPlan.make(frames, 17, 5, 1000).clips == 3
    assert out.frames.shape == (frames, 64, 64, 3)
    info = probe_media(path)
    assert info["frames"] == frames and info["has_audio"]
    assert info["duration"] == pytest.approx(seconds, abs=0.1)
    assert not (tmp_path / "talk.mp4.work").exists()  # the default work folder is cleaned up


@pytest.mark.slow
def test_tiny_resume_is_bit_identical_and_the_mp4_is_atomic(tiny_pipe, tmp_path):
    from wanstudio.media import asset_path

    wave = speech(1.3)
    args = dict(steps=2, motion_frame=5, progress=False, seed=5)
    reference = tiny_pipe(asset_path("portrait.png"), wave, **args).frames
    path = tmp_path / "talk.mp4"
    calls = {"n": 0}
    original = tiny_pipe.model.forward

    def failing(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2 * 3 + 2:  # clip 2, step 1, second call
            raise KeyboardInterrupt
        return original(*a, **kw)

    tiny_pipe.model.forward = failing
    try:
        with pytest.raises(KeyboardInterrupt):
            tiny_pipe(asset_path("portrait.png"), wave, out=path, **args)
    finally:
        del tiny_pipe.model.forward
    assert not path.exists() and (tmp_path / "talk.mp4.work" / "clip_0000.pt").exists()
    out = tiny_pipe(asset_path("portrait.png"), wave, out=path, resume=True, **args)
    assert out.resumed_clips == 1 and path.exists()
    assert torch.equal(out.frames, reference)


def test_from_files_refuses_a_dit_without_audio_modules_before_loading_anything(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = ws.WanModel(ws.WanConfig.preset("tiny-i2v"))
    path = tmp_path / "i2v.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(ws.PipelineError, match="without InfiniteTalk's audio modules"):
        InfiniteTalkPipeline.from_files(
            dit=path, vae="missing", text_encoder="missing", clip="missing", wav2vec="missing", device="cpu"
        )
    with pytest.raises(ws.UnknownOptionError, match="fp8_e4m3fn"):
        InfiniteTalkPipeline.from_files(
            dit=path,
            vae="missing",
            text_encoder="missing",
            clip="missing",
            wav2vec="missing",
            quantization="fp8",
            device="cpu",
        )


def fake_parts_from_files(monkeypatch) -> list[tuple[str, torch.dtype]]:
    """The encoders' and VAE's from_files return the fakes; records (part, dtype) per load."""
    from wanstudio import encoders

    loads = []
    for cls, fake in (
        (encoders.VAE, FakeVAE),
        (encoders.TextEncoder, FakeText),
        (encoders.ImageEncoder, FakeImage),
        (encoders.AudioEncoder, FakeAudio),
    ):

        def load(cls, *args, _fake=fake, **kwargs):
            loads.append((cls.__name__, kwargs["dtype"]))
            return _fake()

        monkeypatch.setattr(cls, "from_files", classmethod(load))
    return loads


@pytest.mark.slow
def test_from_files_takes_modes_or_the_old_keywords(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from wanstudio.pipeline.resume import environment_fingerprint

    loads = fake_parts_from_files(monkeypatch)
    torch.manual_seed(0)
    model = ws.WanModel(ws.WanConfig.preset("tiny-infinitetalk"))
    path = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    files = dict(dit=path, vae="v", text_encoder="t", clip="c", wav2vec="w", device="cpu")
    modes = ws.RuntimeModes(quantization="fp8_e4m3fn_scaled", precision="fp32", strict_layout=True)
    by_modes = InfiniteTalkPipeline.from_files(**files, modes=modes)
    by_keywords = InfiniteTalkPipeline.from_files(
        **files, quantization="fp8_e4m3fn_scaled", dtype=torch.float32, strict_layout=True
    )
    assert by_modes.modes == by_keywords.modes == by_modes.model.modes == modes
    assert ws.is_strict_layout(by_modes.model)
    assert any(isinstance(m, ws.QuantizedLinear) for m in by_modes.model.modules())
    # the text encoder and CLIP run at the modes' precision (the VAE at vae_dtype, wav2vec2 fp32)
    assert loads[:4] == [
        ("AudioEncoder", torch.float32),
        ("ImageEncoder", torch.float32),
        ("VAE", torch.float32),
        ("TextEncoder", torch.float32),
    ]
    assert loads[:4] == loads[4:]
    # the run's fingerprint reads the pipeline's modes; both loads make the same frames
    assert environment_fingerprint(by_modes)["modes"] == {
        "quantization": "fp8_e4m3fn_scaled",
        "attention": "sdpa",
        "compiled": False,
    }
    assert torch.equal(
        by_modes(IMAGE, speech(0.2), **FAST).frames, by_keywords(IMAGE, speech(0.2), **FAST).frames
    )
    # a keyword given wins over the same field of modes; the rest of modes stays
    mixed = InfiniteTalkPipeline.from_files(**files, modes=modes, quantization="disabled")
    assert mixed.modes == modes.replace(quantization="disabled")
    assert not any(isinstance(m, ws.QuantizedLinear) for m in mixed.model.modules())
    with pytest.raises(ws.WanstudioError, match="blocks_to_swap must be"):  # checked once, by RuntimeModes
        InfiniteTalkPipeline.from_files(**files, blocks_to_swap=True)
    # a LoRA as a keyword: merged at load (W + strength B A on the layer it names, nothing else)
    from test_lora import expected, factors, write_lora

    fac = factors(model, ["blocks.0.self_attn.q"], rank=2, alpha=None)
    lora = write_lora(tmp_path / "l.safetensors", fac, "kijai")
    merged = InfiniteTalkPipeline.from_files(**files, dtype=torch.float32, loras=[(lora, 0.5)])
    assert merged.modes.loras == (ws.LoRA(lora, 0.5),)
    want = expected({k: v.float() for k, v in model.state_dict().items()}, fac, 0.5)
    got = merged.model.state_dict()
    assert torch.allclose(got["blocks.0.self_attn.q.weight"], want["blocks.0.self_attn.q.weight"], atol=1e-6)
    assert torch.equal(got["blocks.0.self_attn.k.weight"], model.state_dict()["blocks.0.self_attn.k.weight"])


def test_tiny_takes_modes_and_quantizes_its_base_precision_weights(tiny_pipe):
    import copy

    from wanstudio.quant import quantize

    pipe = InfiniteTalkPipeline.tiny(seed=0, modes=ws.RuntimeModes(quantization="fp8_e4m3fn_scaled"))
    assert pipe.modes == pipe.model.modes == ws.RuntimeModes(quantization="fp8_e4m3fn_scaled")
    assert "bfloat16" in pipe.identity  # the modes' precision (bf16), not tiny's fp32 default
    # reference: the fp32 tiny model of the same seed, cast to bf16, then quantized
    reference = quantize(copy.deepcopy(tiny_pipe.model).to(torch.bfloat16), "fp8_e4m3fn_scaled")
    got, want = pipe.model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys() and any(v.dtype == torch.float8_e4m3fn for v in got.values())
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert tiny_pipe.modes == ws.RuntimeModes(precision="fp32")  # tiny() without modes: fp32


def test_the_pipeline_reads_modes_applied_after_it_was_built(tmp_path):
    """A studio / CLI applies modes to pipe.model after building the pipeline: the OOM advice
    and the run fingerprint see them."""
    from wanstudio.pipeline.resume import environment_fingerprint

    pipe, dit, _ = make_pipe(FakeDiT(oom_at=0))
    assert pipe.modes == ws.RuntimeModes(precision="fp32")  # nothing recorded: FakeDiT's dtype
    dit.modes = ws.RuntimeModes(quantization="fp8_e4m3fn_scaled", blocks_to_swap=1)  # as apply_modes records
    assert pipe.modes is dit.modes
    assert environment_fingerprint(pipe)["modes"]["quantization"] == "fp8_e4m3fn_scaled"
    with pytest.raises(ws.PipelineError) as info:
        pipe(IMAGE, speech(0.5), work_dir=tmp_path, **FAST)
    msg = str(info.value)
    assert "(now 1)" in msg and "halves the DiT weights" not in msg  # already quantized


@pytest.mark.slow
def test_size_comes_from_size_then_size_class_then_the_pipelines_default():
    from PIL import Image

    from wanstudio.media import choose_bucket

    pipe, _, _ = make_pipe(size=(64, 48))
    img = Image.new("RGB", (300, 200), (120, 80, 40))
    assert pipe(img, speech(0.2), **FAST).size == (64, 48)
    assert pipe(img, speech(0.2), size=(32, 32), **FAST).size == (32, 32)
    assert pipe(img, speech(0.2), size_class="480", **FAST).size == choose_bucket(300, 200, "480")
