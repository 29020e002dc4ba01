"""wanstudio.eval: the lip-sync, pause and identity scores on synthetic videos."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from wanstudio import eval as ev
from wanstudio.media import asset_path
from wanstudio.train import faces, speech

SR = ev.SAMPLE_RATE


def _speech_with_pause(seed=2):
    """Babble, one second of silence, babble: (wave, (pause start, pause end))."""
    rng = np.random.default_rng(seed)
    a, b = speech.babble(rng, 2.4), speech.babble(rng, 2.4)
    pause = (len(a) / SR, len(a) / SR + 1.0)
    return np.concatenate([a, np.zeros(SR, np.float32), b]), pause


def _video(style, wave, opening=None, seed=0):
    """A face whose mouth follows ``wave`` (or the given opening), with head motion and blinks."""
    from wanstudio.train.dataset import blinks, head_walk

    track = speech.speech_mouth(wave)
    T = len(track["open"])
    rng = np.random.default_rng(seed)
    m = faces.FaceMotion(
        dx=head_walk(rng, T, 0.012),
        dy=head_walk(rng, T, 0.008),
        tilt=head_walk(rng, T, np.radians(2.0)),
        blink=blinks(rng, T),
        open=track["open"] if opening is None else opening,
        wide=track["wide"] if opening is None else np.zeros(T),
        round=track["round"] if opening is None else np.zeros(T),
    )
    return faces.draw_faces(style, m, size=(96, 96))


@pytest.fixture(scope="module")
def talk():
    wave, pause = _speech_with_pause()
    style = faces.FaceStyle.portrait()
    return wave, pause, style, _video(style, wave)


def test_envelope_marks_loud_frames_and_silence():
    t = np.arange(2 * SR) / SR
    wave = np.where((t > 0.5) & (t < 1.5), 0.3 * np.sin(2 * np.pi * 220 * t), 0.0)
    env = ev.loudness_envelope(wave)
    assert env.shape == (50,)
    assert env[15:35].min() > 0.95 and env[:10].max() == 0 and env[40:].max() == 0
    assert np.array_equal(ev.loudness_envelope(np.zeros(SR)), np.zeros(25))


def test_mouth_box_finds_the_portraits_mouth():
    # the shipped portrait's lips span x 165..220, y 263..286 of 384 x 448; on the 64x64 grid
    # (cover-resize to 64 x 75, crop 6 rows) that is x 27.5..36.7, y 37..42
    x0, y0, x1, y1 = ev.mouth_box(asset_path("portrait.png"))
    assert x0 <= 27 and x1 >= 37 and y0 <= 37 and y1 >= 43
    assert (x1 - x0) * (y1 - y0) < 0.1 * 64 * 64  # the mouth, not the face


def test_mouth_box_stays_off_the_jaw_of_a_face_with_ears():
    """The held-out drawn portrait's ears widen its face box; the mouth box is still the lips and
    a margin, inside the face's edges on every one of its rows, so a wobbling jaw line or the
    hair beside it is not counted as the mouth moving."""
    from wanstudio.train.evaluate import eval_portraits

    portrait = eval_portraits()["drawn"]
    img = ev.to_grid(portrait)
    (fx0, _, fx1, _), seen = ev._face(img)
    x0, y0, x1, y1 = ev.mouth_box(portrait)
    assert x1 - x0 < 0.5 * (fx1 - fx0)  # the old rule took 68% of the face box
    for y in range(y0, y1):
        skin = np.nonzero(seen[y])[0]
        if len(skin):
            assert skin.min() < x0 and x1 <= skin.max(), (y, (x0, x1), (skin.min(), skin.max()))
    lips = ~seen[y0:y1, x0:x1] & (img[y0:y1, x0:x1].sum(-1) > 0.3)  # not skin, not black hair
    assert lips.sum() >= 6  # and the lips are in it


def test_a_mouth_that_follows_the_speech_scores_high(talk):
    wave, pause, style, video = talk
    score = ev.sync_score(video, wave)
    assert score > 0.6, score
    assert ev.pause_ratio(video, wave, pause) < 0.15


def test_a_still_or_random_mouth_scores_about_zero(talk):
    wave, pause, style, _ = talk
    T = len(ev.loudness_envelope(wave))
    static = faces.draw_faces(style, faces.FaceMotion.still(T), size=(96, 96))
    assert ev.sync_score(static, wave) == 0.0
    random = _video(style, wave, opening=np.random.default_rng(1).uniform(0, 1, T))
    assert abs(ev.sync_score(random, wave)) < 0.25
    assert ev.pause_ratio(random, wave, pause) > 0.6
    # head motion and blinks alone: what is left after the head's shift is taken out is chance
    head_only = [ev.sync_score(_video(style, wave, opening=np.zeros(T), seed=s), wave) for s in range(3)]
    assert np.mean(np.abs(head_only)) < 0.25, head_only


def test_a_mouth_out_of_step_scores_lower(talk):
    wave, pause, style, video = talk
    late = np.concatenate([np.zeros(SR // 2, np.float32), wave])[: len(wave)]  # 0.5 s behind
    moved = _video(style, late)
    assert ev.sync_score(moved, wave) < ev.sync_score(video, wave) - 0.3


def test_scores_do_not_depend_on_the_video_size(talk):
    wave, _, style, _ = talk
    track = speech.speech_mouth(wave)
    m = faces.FaceMotion.still(len(track["open"]))
    m = dataclasses.replace(m, open=track["open"].astype(np.float64))
    small = faces.draw_faces(style, m, size=(64, 64))
    large = faces.draw_faces(style, m, size=(256, 256))
    assert abs(ev.sync_score(small, wave) - ev.sync_score(large, wave)) < 0.1


def test_identity_psnr_tells_the_portrait_from_another_face():
    portrait = asset_path("portrait.png")
    same = ev.to_grid(portrait)[None].repeat(5, 0)
    shifted = np.roll(same, 1, axis=2)
    other = faces.draw_faces(faces.FaceStyle.held_out(), faces.FaceMotion.still(5))
    to_u8 = ev.v_uint8
    assert ev.identity_psnr(to_u8(same), portrait) > 40
    assert 20 < ev.identity_psnr(to_u8(shifted), portrait) < 30
    assert ev.identity_psnr(other, portrait) < 12
    big = np.repeat(np.repeat(to_u8(same), 4, axis=1), 4, axis=2)  # 256x256 frames
    assert ev.identity_psnr(big, portrait) > 30
