"""The procedural training set: faces, speech, the mouth that follows it, the clips."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from wanstudio.eval import loudness_envelope, mouth_box
from wanstudio.train import dataset, faces, speech

needs_espeak = pytest.mark.skipif(not speech.espeak_available(), reason="espeak-ng is not installed")


def _motion(n, **arrays):
    m = faces.FaceMotion.still(n)
    return dataclasses.replace(m, **{k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()})


# --- faces ----------------------------------------------------------------------------------------
def test_same_seed_same_face_and_frames():
    a = faces.FaceStyle.sample(np.random.default_rng(7))
    b = faces.FaceStyle.sample(np.random.default_rng(7))
    assert a == b
    assert a != faces.FaceStyle.sample(np.random.default_rng(8))
    m = _motion(5, open=[0, 0.2, 0.5, 0.8, 1.0], dx=[0, 0.01, 0.0, -0.01, 0.0], blink=[0, 0, 1, 0, 0])
    assert np.array_equal(faces.draw_faces(a, m), faces.draw_faces(b, m))


@pytest.mark.parametrize("seed", range(6))
def test_mouth_opening_follows_its_input(seed):
    """The mouth region's departure from the rest frame grows with the opening parameter,
    and stays inside the mouth box that wanstudio.eval finds on the rest frame."""
    style = faces.FaceStyle.portrait() if seed == 0 else faces.FaceStyle.sample(np.random.default_rng(seed))
    opening = np.linspace(0, 1, 9)
    frames = faces.draw_faces(style, _motion(9, open=opening)).astype(np.float64) / 255
    change = np.abs(frames - frames[0]).sum(-1)  # (T, H, W)
    amount = change.sum((1, 2))
    assert np.all(np.diff(amount) > 0), amount
    assert np.corrcoef(amount, opening)[0, 1] > 0.95
    x0, y0, x1, y1 = mouth_box((frames[0] * 255).round().astype(np.uint8))
    inside = change[:, y0:y1, x0:x1].sum()
    assert inside / change.sum() > 0.95


def test_shape_visemes_change_the_mouth_differently():
    style = faces.FaceStyle.portrait()
    m = _motion(3, open=[0.6, 0.6, 0.6], wide=[0, 1, 0], round=[0, 0, 1])
    f = faces.draw_faces(style, m, size=(128, 128)).astype(np.float64)
    assert np.abs(f[1] - f[0]).mean() > 0.3 and np.abs(f[2] - f[0]).mean() > 0.3
    assert np.abs(f[1] - f[2]).mean() > 0.3


def test_blink_and_head_motion_leave_the_rest_frame_as_the_reference():
    rng = np.random.default_rng(3)
    style = faces.FaceStyle.sample(rng)
    head = dict(
        dx=dataset.head_walk(rng, 40, 0.012),
        dy=dataset.head_walk(rng, 40, 0.009),
        tilt=dataset.head_walk(rng, 40, 0.04),
    )
    m = _motion(40, blink=dataset.blinks(rng, 40, every_s=0.3), **head)
    frames = faces.draw_faces(style, m)
    rest = faces.draw_faces(style, faces.FaceMotion.still(1))[0]
    assert np.array_equal(frames[0], rest)  # frame 0 is the person at rest
    assert m.blink.max() == 1.0 and m.blink[0] == 0
    assert np.abs(frames[1:].astype(int) - rest).max() > 0  # and then it moves


def test_portrait_style_resembles_the_shipped_portrait():
    from wanstudio.eval import identity_psnr
    from wanstudio.media import asset_path

    drawn = faces.draw_faces(faces.FaceStyle.portrait(), faces.FaceMotion.still(1))
    other = faces.draw_faces(faces.FaceStyle.held_out(), faces.FaceMotion.still(1))
    portrait = asset_path("portrait.png")
    assert identity_psnr(drawn, portrait) > 20.0
    assert identity_psnr(other, portrait) < 14.0


def test_render_batches_many_people_at_once():
    rng = np.random.default_rng(0)
    styles = [faces.FaceStyle.sample(rng) for _ in range(3)]
    one_by_one = np.concatenate([faces.draw_faces(s, faces.FaceMotion.still(1)) for s in styles])
    arrays = faces.style_arrays(styles)
    params = {k: torch.from_numpy(v) for k, v in arrays.items()}
    params.update({k: torch.zeros(3) for k in faces.MOTION_FIELDS})
    together = faces.to_uint8(faces.render(params)).numpy()
    assert np.array_equal(one_by_one, together)


# --- speech and the mouth -------------------------------------------------------------------------
def test_mouth_track_follows_the_envelope():
    t = np.arange(200)
    env = np.clip(0.5 + 0.5 * np.sin(t / 3.0), 0, 1) * (t < 150)  # syllables, then silence
    track = speech.mouth_track(env, np.tile([1.0, 0.0, 0.0], (200, 1)))
    opening = track["open"]
    assert opening[0] == 0.0  # the reference frame is at rest
    assert np.corrcoef(opening[:150], env[:150])[0, 1] > 0.8
    assert opening[160:].max() < 0.05  # shut in silence
    louder = speech.mouth_track(np.full(20, 0.95), np.tile([1.0, 0, 0], (20, 1)))["open"]
    softer = speech.mouth_track(np.full(20, 0.75), np.tile([1.0, 0, 0], (20, 1)))["open"]
    assert louder[-1] > softer[-1] > 0.2


def test_visemes_from_the_spectrum():
    sr = speech.SAMPLE_RATE
    t = np.arange(sr) / sr
    low = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate((200, 400, 600), 1))  # o / u
    high = np.random.default_rng(0).standard_normal(sr)  # s / i: energy up to 8 kHz
    mid = sum(np.sin(2 * np.pi * f * t) for f in (700, 800, 900))  # a
    for wave, k in ((low, 2), (high, 1), (mid, 0)):
        w = speech.visemes(wave, 25)
        assert np.argmax(w[5:20].mean(0)) == k, w[5:20].mean(0)
        assert np.allclose(w.sum(1), 1, atol=1e-5)


def test_babble_is_deterministic_speech_like_sound():
    a = speech.babble(np.random.default_rng(4), 3.0)
    b = speech.babble(np.random.default_rng(4), 3.0)
    assert np.array_equal(a, b) and len(a) == 3 * speech.SAMPLE_RATE
    env = loudness_envelope(a)
    assert 0.2 < (env > 0.5).mean() < 0.95  # loud syllables and quiet gaps


@needs_espeak
def test_espeak_utterance_is_deterministic_and_uses_training_voices():
    a = speech.random_utterance(np.random.default_rng([5, 0]))
    b = speech.random_utterance(np.random.default_rng([5, 0]))
    assert np.array_equal(a.wave, b.wave) and a.text == b.text
    assert a.voice.split("+")[0] in speech.TRAIN_VOICES
    assert speech.HELD_OUT_VOICE not in speech.TRAIN_VOICES
    env = loudness_envelope(a.wave)
    for start, end in a.pauses:  # the pauses are silent
        assert env[int(start * 25) + 1 : int(end * 25) - 1].max(initial=0) < 0.05


# --- the data set and its clips -------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("traindata")
    dataset.build_dataset(folder, seed=3, utterances=3, use_espeak=False, log=None)
    return folder


def test_build_dataset_is_deterministic(small_data, tmp_path):
    dataset.build_dataset(tmp_path, seed=3, utterances=3, use_espeak=False, log=None)
    a, b = dataset.SpeechData.load(small_data), dataset.SpeechData.load(tmp_path)
    assert np.array_equal(a.features, b.features) and np.array_equal(a.mouth, b.mouth)
    assert a.features.shape[1:] == (3, 32) and len(a.lengths) == 3
    assert a.context.shape[0] == len(dataset.PROMPTS)
    assert a.meta["speech"] == "babble"


def test_clips_use_the_pipelines_audio_windows(small_data):
    from wanstudio.pipeline.infinitetalk import audio_windows_for_clip

    data = dataset.SpeechData.load(small_data)
    sampler = dataset.ClipSampler(data)
    clip = sampler.sample(np.random.default_rng(0), 6)
    assert clip.video.shape == (6, 3, 17, 64, 64) and clip.reference.shape == (6, 3, 64, 64)
    for b in range(6):
        feats, _ = data.utterance(int(clip.utterance[b]))
        s = int(clip.start[b])
        want = audio_windows_for_clip(torch.from_numpy(feats).float(), s, s + 17, 5)
        assert torch.equal(clip.audio[b, 0], want)
        if s == 0:  # a first clip starts on the reference picture
            assert torch.equal(clip.video[b, :, 0], clip.reference[b])
    again = sampler.sample(np.random.default_rng(0), 6)
    assert torch.equal(again.video, clip.video)
