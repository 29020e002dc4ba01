"""Sampler schedule, shift, update rule, CFG / APG formulas, Lab colour match, clip plan."""

from __future__ import annotations

import math

import pytest
import torch

import wanstudio as ws
from wanstudio.options import GenerationPreset, Scheduler
from wanstudio.pipeline.color import lab_to_rgb, match_colors, rgb_to_lab
from wanstudio.pipeline.guidance import (
    Condition,
    Guidance,
    GuidanceConfig,
    MomentumBuffer,
    projected_guidance,
)
from wanstudio.pipeline.infinitetalk import (
    ClipPlan,
    audio_windows_for_clip,
    mirror_pad,
    overwrite_head,
)
from wanstudio.pipeline.sampler import (
    DistillSampler,
    EulerSampler,
    UniPCSampler,
    distill_step_list,
    make_sampler,
    shift_timesteps,
    timestep_schedule,
)


# --- schedule and shift ------------------------------------------------------------------------
def reference_schedule(steps: int, shift: float) -> list[float]:
    """WAN_SPEC §6 in plain fp64 Python: linspace(1000, 1, steps), then 0, shifted on t/1000."""
    base = [1000.0] if steps == 1 else [1000 - i * 999 / (steps - 1) for i in range(steps)]
    out = []
    for t in base + [0.0]:
        u = t / 1000
        out.append(shift * u / (1 + (shift - 1) * u) * 1000)
    return out


@pytest.mark.parametrize("steps, shift", [(1, 7.0), (4, 7.0), (40, 7.0), (8, 11.0), (5, 1.0), (3, 0.5)])
def test_schedule_is_shifted_linspace_then_zero(steps, shift):
    got = timestep_schedule(steps, shift)
    assert got.dtype == torch.float32 and got.shape == (steps + 1,)
    assert torch.allclose(
        got.double(),
        torch.tensor(reference_schedule(steps, shift), dtype=torch.float64),
        rtol=1e-6,
        atol=1e-3,
    )
    assert got[0] == 1000 and got[-1] == 0
    assert (got[1:] < got[:-1]).all()


def test_shift_formula_values():
    t = torch.tensor([0.0, 250.0, 500.0, 1000.0], dtype=torch.float64)
    assert torch.allclose(shift_timesteps(t, 1.0), t)
    # s t / (1 + (s - 1) t) at t = 0.5, s = 7: 3.5 / 4
    assert shift_timesteps(t, 7.0)[2].item() == pytest.approx(875.0)
    assert shift_timesteps(t, 11.0)[1].item() == pytest.approx(11 * 0.25 / (1 + 10 * 0.25) * 1000)


@pytest.mark.parametrize(
    "steps, shift", [(0, 7.0), (-1, 7.0), (2.5, 7.0), (True, 7.0), (4, 0.0), (4, -1.0), (4, math.nan)]
)
def test_bad_schedule_arguments_raise(steps, shift):
    with pytest.raises(ws.PipelineError):
        make_sampler("euler", steps, shift)


def test_unknown_scheduler_names_the_valid_ones():
    with pytest.raises(ws.UnknownOptionError, match="euler, unipc"):
        make_sampler("eulr", 4, 7.0)


# --- update rule -----------------------------------------------------------------------------------
def test_euler_step_is_x_minus_v_dt():
    s = EulerSampler(4, 7.0)
    x, v = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 16, 2, 4, 4)
    x_copy = x.clone()
    for i in range(4):
        dt = (s.schedule[i] - s.schedule[i + 1]) / 1000
        assert torch.allclose(s.step(v, i, x), x - v * dt)
    assert torch.equal(x, x_copy)  # the caller's tensor is not mutated


@pytest.mark.parametrize("kind", ["euler", "unipc", "euler_distill"])
@pytest.mark.parametrize("steps", [1, 3, 12])
def test_exact_velocity_lands_on_the_data(kind, steps):
    """On the straight path x = (1 - s) x0 + s n the velocity is n - x0 = (x - x0) / s; a
    correct sampler with Wan's sign convention ends exactly at x0."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 16, 2, 4, 4, generator=g, dtype=torch.float64)
    x = torch.randn(1, 16, 2, 4, 4, generator=g, dtype=torch.float64)
    sampler = make_sampler(kind, steps, 5.0)
    assert torch.allclose(sampler.timesteps, sampler.schedule[:-1])
    for i, t in enumerate(sampler.timesteps):
        sigma = (t / 1000).double().clamp_min(1e-6)
        x = sampler.step((x - x0) / sigma, i, x)
    assert torch.allclose(x, x0, atol=1e-4)


# --- the distilled sampler ---------------------------------------------------------------------------
def test_distill_schedule_is_the_trained_list_warped_by_the_shift():
    """lightx2v's 4-step distill LoRAs: denoising steps 1000, 750, 500, 250, each shifted by 5."""
    assert distill_step_list(4) == (1000.0, 750.0, 500.0, 250.0)
    s = make_sampler("euler_distill", 4, 5.0)
    assert isinstance(s, DistillSampler) and s.name is Scheduler.DISTILL
    want = [5 * u / (1 + 4 * u) * 1000 for u in (1.0, 0.75, 0.5, 0.25)] + [0.0]  # 1000, 937.5, 833.3, 625
    assert s.schedule.tolist() == pytest.approx(want, abs=1e-3)
    assert s.timesteps.tolist() == pytest.approx(want[:-1], abs=1e-3)
    custom = DistillSampler(3, 1.0, step_list=(999, 500, 100))
    assert custom.schedule.tolist() == pytest.approx([999.0, 500.0, 100.0, 0.0])


def test_distill_step_is_euler_between_the_list_entries():
    s = DistillSampler(4, 5.0)
    x, v = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 16, 2, 4, 4)
    for i in range(4):
        dt = (s.schedule[i] - s.schedule[i + 1]) / 1000
        assert torch.allclose(s.step(v, i, x), x - v * dt)
    assert s.schedule[-1] == 0  # the last step lands on the data: x - v * sigma


@pytest.mark.parametrize(
    "steps, step_list", [(3, (1000, 750, 500, 250)), (2, (500, 750)), (2, (1000, 0)), (2, (1200, 500))]
)
def test_bad_distill_step_lists_raise(steps, step_list):
    with pytest.raises(ws.PipelineError, match="step_list"):
        DistillSampler(steps, 5.0, step_list=step_list)


def test_distill_preset_is_one_place_and_consistent():
    settings = GenerationPreset.DISTILL_4STEP.settings
    assert (settings.steps, settings.shift, settings.text_scale, settings.audio_scale) == (4, 5.0, 1.0, 2.0)
    assert settings.scheduler is Scheduler.DISTILL
    sampler = make_sampler(settings.scheduler, settings.steps, settings.shift)
    assert sampler.timesteps[0] == 1000 and len(sampler.timesteps) == 4
    assert GuidanceConfig(text_scale=settings.text_scale, audio_scale=settings.audio_scale).conditions == (
        Condition.COND,
        Condition.DROP_AUDIO,
    )
    assert GenerationPreset.STANDARD.settings.as_kwargs() == dict(
        steps=40, text_scale=5.0, audio_scale=4.0, scheduler="euler"
    )
    assert ws.parse_option(GenerationPreset, "distill_4step") is GenerationPreset.DISTILL_4STEP


def test_unipc_uses_the_shared_schedule():
    u, e = UniPCSampler(10, 7.0), EulerSampler(10, 7.0)
    assert torch.allclose(u.scheduler.sigmas.double() * 1000, e.schedule.double(), atol=2e-3)


# --- guidance ----------------------------------------------------------------------------------
def fake_predictions(shape=(1, 16, 2, 4, 4)) -> dict[Condition, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {c: torch.randn(shape, generator=g) for c in Condition}


def test_three_call_cfg_formula_and_call_order():
    v = fake_predictions()
    calls = []
    guidance = Guidance(GuidanceConfig(text_scale=5.0, audio_scale=4.0))
    out = guidance(lambda c: calls.append(c) or v[c])
    assert calls == [Condition.COND, Condition.DROP_TEXT, Condition.UNCOND]
    want = (
        v[Condition.UNCOND]
        + 5.0 * (v[Condition.COND] - v[Condition.DROP_TEXT])
        + 4.0 * (v[Condition.DROP_TEXT] - v[Condition.UNCOND])
    )
    assert torch.allclose(out, want)


def test_two_call_cfg_when_text_scale_is_one():
    v = fake_predictions()
    calls = []
    out = Guidance(GuidanceConfig(text_scale=1.0, audio_scale=2.0))(lambda c: calls.append(c) or v[c])
    assert calls == [Condition.COND, Condition.DROP_AUDIO]
    want = v[Condition.DROP_AUDIO] + 2.0 * (v[Condition.COND] - v[Condition.DROP_AUDIO])
    assert torch.allclose(out, want)


@pytest.mark.parametrize("apg", [False, True])
def test_one_call_when_both_scales_are_one(apg):
    v = fake_predictions()
    calls = []
    out = Guidance(GuidanceConfig(text_scale=1.0, audio_scale=1.0, apg=apg))(
        lambda c: calls.append(c) or v[c]
    )
    assert calls == [Condition.COND]
    assert torch.equal(out, v[Condition.COND])


@pytest.mark.parametrize(
    "text_scale, audio_scale, calls",
    [(1.0, 1.0, 1), (1.0, 2.0, 2), (1.0, 0.5, 2), (5.0, 1.0, 3), (5.0, 4.0, 3)],
)
def test_calls_per_step_follow_the_scales(text_scale, audio_scale, calls):
    assert len(GuidanceConfig(text_scale=text_scale, audio_scale=audio_scale).conditions) == calls


def test_condition_flags():
    assert (Condition.COND.text, Condition.COND.audio) == (True, True)
    assert (Condition.DROP_TEXT.text, Condition.DROP_TEXT.audio) == (False, True)
    assert (Condition.UNCOND.text, Condition.UNCOND.audio) == (False, False)
    assert (Condition.DROP_AUDIO.text, Condition.DROP_AUDIO.audio) == (True, False)


def test_apg_without_momentum_or_clip_is_cfg_minus_the_parallel_part():
    v = fake_predictions((1, 4, 1, 3, 3))
    cond = v[Condition.COND]
    cfg = GuidanceConfig(text_scale=1.0, audio_scale=3.0, apg=True, apg_momentum=0.0, apg_norm_threshold=0.0)
    out = Guidance(cfg)(lambda c: v[c])
    diff = cond - v[Condition.DROP_AUDIO]
    unit = cond.double() / cond.double().norm()
    orth = diff.double() - (diff.double() * unit).sum() * unit
    assert torch.allclose(out.double(), cond.double() + 2.0 * orth, atol=1e-5)
    assert abs(((out - cond).double() * cond.double()).sum().item()) < 1e-3  # orthogonal to cond


def test_apg_clips_the_norm_and_keeps_momentum():
    diff = torch.full((1, 1, 1, 1, 4), 50.0)  # norm 100
    cond = torch.tensor([0.0, 0.0, 0.0, 1.0]).reshape(1, 1, 1, 1, 4)
    out = projected_guidance(diff, cond, None, norm_threshold=55.0)
    assert torch.allclose(out.flatten(), torch.tensor([27.5, 27.5, 27.5, 0.0]))
    buf = MomentumBuffer(-0.75)
    buf.update(torch.ones(2))
    assert torch.allclose(buf.update(torch.ones(2)), torch.full((2,), 0.25))


def test_guidance_config_rejects_non_numbers():
    with pytest.raises(ws.PipelineError):
        GuidanceConfig(text_scale=float("nan"))


# --- latent overwrite ----------------------------------------------------------------------------
def test_overwrite_head_copies_and_replaces_the_first_frames():
    latent, head = torch.randn(1, 16, 5, 2, 2), torch.randn(1, 16, 2, 2, 2)
    out = overwrite_head(latent, head)
    assert torch.equal(out[:, :, :2], head) and torch.equal(out[:, :, 2:], latent[:, :, 2:])
    assert not torch.equal(latent[:, :, :2], head)  # input untouched


# --- colour match --------------------------------------------------------------------------------
def test_lab_conversion_known_values_and_round_trip():
    rgb = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.2, 0.5, 0.7]])
    lab = rgb_to_lab(rgb)
    assert torch.allclose(lab[0], torch.tensor([100.0, 0.0, 0.0], dtype=torch.float64), atol=0.05)
    assert torch.allclose(lab[1], torch.tensor([53.24, 80.09, 67.20], dtype=torch.float64), atol=0.05)
    assert torch.allclose(lab[2], torch.zeros(3, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(lab_to_rgb(lab), rgb.double(), atol=1e-5)


def test_color_match_undoes_a_lab_affine_drift():
    """Frames whose Lab channels drifted by a per-channel affine map are mapped back onto the
    reference (mean and std matching inverts any such drift)."""
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(3, 16, 16, generator=g) * 1.2 - 0.6  # in gamut with room to spare
    lab = rgb_to_lab((ref.permute(1, 2, 0) + 1) / 2)
    mean = lab.mean((0, 1))
    drift = [
        (lab - mean) * torch.tensor(s, dtype=torch.float64) + mean + torch.tensor(o, dtype=torch.float64)
        for s, o in (((0.9, 0.9, 0.9), (1.0, 1.0, 1.0)), ((0.8, 1.0, 0.9), (-3.0, 2.0, 0.5)))
    ]
    frames = torch.stack([lab_to_rgb(d).permute(2, 0, 1).float() * 2 - 1 for d in drift], dim=1)
    out = match_colors(frames, ref, 1.0)
    assert out.shape == frames.shape and out.dtype == frames.dtype
    assert torch.allclose(out, ref[:, None].expand_as(out), atol=1e-5)
    assert match_colors(frames, ref, 0.0) is frames
    half = match_colors(frames, ref, 0.5)
    assert torch.allclose(half, (out + frames) / 2, atol=1e-5)
    with pytest.raises(ws.PipelineError):
        match_colors(frames, ref, 1.5)


# --- clip plan / audio windows -------------------------------------------------------------------
@pytest.mark.parametrize("audio_frames, clips", [(1, 1), (81, 1), (82, 2), (153, 2), (154, 3), (190, 3)])
def test_clip_plan_counts(audio_frames, clips):
    plan = ClipPlan.make(audio_frames, 81, 9, 1000)
    assert plan.clips == clips
    assert sum(plan.kept(k) for k in range(plan.clips)) == plan.total_frames == audio_frames
    assert [plan.dropped(k) for k in range(plan.clips)] == [0] + [9] * (clips - 1)
    assert [plan.start(k) for k in range(plan.clips)] == [72 * k for k in range(clips)]


def test_clip_plan_respects_max_frames():
    plan = ClipPlan.make(500, 81, 9, 100)
    assert plan.total_frames == 100 and plan.clips == 2 and plan.kept(1) == 100 - 81


def test_mirror_pad_and_windows():
    f = torch.arange(5.0)[:, None]
    assert mirror_pad(f, 12)[:, 0].tolist() == [0, 1, 2, 3, 4, 4, 3, 2, 1, 0, 0, 1]
    w = audio_windows_for_clip(f, 0, 3, 5)[..., 0]
    assert w.tolist() == [[0, 0, 0, 1, 2], [0, 0, 1, 2, 3], [0, 1, 2, 3, 4]]
    assert audio_windows_for_clip(f, 3, 5, 5)[..., 0].tolist() == [[1, 2, 3, 4, 4], [2, 3, 4, 4, 4]]
