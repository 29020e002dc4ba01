"""Step caches inside the InfiniteTalk pipeline: off by default, exact at threshold 0, refused
for the distilled setting, reset per clip, and part of a run's fingerprint (resume)."""

from __future__ import annotations

import pytest
import torch
from test_pipeline import speech

import wanstudio as ws
from wanstudio.pipeline import InfiniteTalkPipeline

ARGS = dict(steps=10, text_scale=1.0, audio_scale=2.0, motion_frame=5, progress=False, seed=3, max_frames=29)


@pytest.fixture(scope="module")
def pipe():
    pytest.importorskip("wanstudio.media")
    return InfiniteTalkPipeline.tiny(seed=0)


@pytest.fixture(scope="module")
def image():
    from wanstudio.media import asset_path

    return asset_path("portrait.png")


@pytest.mark.slow
def test_threshold_zero_is_bitwise_the_uncached_video(pipe, image):
    wave = speech(0.7)
    plain = pipe(image, wave, **ARGS)
    cached = pipe(image, wave, cache="teacache", cache_threshold=0.0, **ARGS)
    assert torch.equal(plain.frames, cached.frames)
    assert plain.cache is None and cached.cache.skipped_calls == 0
    assert cached.cache.calls == 2 * ARGS["steps"]  # two conditions a step at text scale 1


@pytest.mark.slow
def test_a_skipping_cache_says_what_it_skipped_and_resets_each_clip(pipe, image):
    wave = speech(1.3)  # max_frames 29: two clips of 17 frames with 5 carried
    out = pipe(image, wave, cache="magcache", cache_threshold=1.0, **ARGS)
    assert out.clips == 2 and out.cache.clips == 2
    assert out.cache.skipped_calls > 0
    steps = [d.step for d in out.cache.decisions]  # the last clip's calls, in order
    assert steps[:2] == [0, 0] and len(steps) == 2 * ARGS["steps"]  # reset: this clip began at 0
    assert "DiT calls computed" in out.summary() and "skipped" in out.summary()


def test_the_distilled_setting_refuses_caching_before_any_work(pipe, image):
    calls = []
    pipe.model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ws.PipelineError, match="steps"):
        pipe(image, speech(0.7), steps=4, text_scale=1.0, audio_scale=1.0, cache="teacache", progress=False)
    assert calls == []
    pipe.model._forward_pre_hooks.clear()


@pytest.mark.slow
def test_a_cached_run_resumes_into_the_same_video_and_other_settings_are_refused(pipe, image, tmp_path):
    wave = speech(1.3)
    args = dict(ARGS, cache="magcache", cache_threshold=1.0)
    reference = pipe(image, wave, **args).frames
    out = tmp_path / "talk.mp4"
    real = pipe.model.forward
    count = {"n": 0}

    def dies_in_clip_two(*a, **kw):
        count["n"] += 1
        if count["n"] > 2 * ARGS["steps"] + 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    pipe.model.forward = dies_in_clip_two
    try:
        with pytest.raises(KeyboardInterrupt):
            pipe(image, wave, out=out, **args)
    finally:
        del pipe.model.forward
    with pytest.raises(ws.PipelineError, match="cache"):
        pipe(image, wave, out=out, resume=True, **dict(args, cache="teacache"))
    resumed = pipe(image, wave, out=out, resume=True, **args)
    assert resumed.resumed_clips == 1 and torch.equal(resumed.frames, reference)
