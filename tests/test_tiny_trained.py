"""The shipped tiny weights talk: lip sync on held-out speech, a still mouth in a pause, the
portrait's face — for the shipped portrait and a second, differently drawn one.

Skipped until ``wanstudio/assets/tiny/`` holds the trained weights. The speech is the shipped
``speech.wav`` (eSpeak NG 'en-us', a voice and sentence training never uses) with one second of
silence inserted at its comma; no espeak-ng is needed. Settings: the demo's (8 steps, text
scale 5, audio scale 4, motion_frame 5, seed 42).
"""

from __future__ import annotations

import pytest

from wanstudio.pipeline.tiny_weights import tiny_weights_available

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not tiny_weights_available(), reason="no trained weights in wanstudio/assets/tiny yet"
    ),
]


@pytest.fixture(scope="module")
def results():
    from wanstudio.pipeline import InfiniteTalkPipeline
    from wanstudio.pipeline.tiny_weights import load_tiny_trained
    from wanstudio.train.evaluate import eval_portraits, heldout_speech, score_video

    pipe = InfiniteTalkPipeline.tiny(seed=0)
    load_tiny_trained(pipe.model, pipe.vae, pipe.text_encoder, pipe.image_encoder, pipe.audio_encoder)
    wave, pause = heldout_speech()
    out = {}
    for name, portrait in eval_portraits().items():
        video = pipe(portrait, wave, steps=8, motion_frame=5, seed=42, progress=False)
        out[name] = score_video(video.frames.numpy(), wave, portrait, pause)
    return out


@pytest.mark.parametrize("portrait", ["shipped", "drawn"])
def test_lips_follow_held_out_speech(results, portrait):
    from wanstudio.train.evaluate import BARS

    r = results[portrait]
    assert r["sync"] >= BARS["sync"], r
    assert r["pause"] <= BARS["pause"], r
    assert r["identity_db"] >= BARS["identity_db"], r


def test_every_quantization_mode_keeps_the_lips_of_bf16():
    """The README's quantization table: each mode's sync score on the held-out speech within 0.05
    of plain bf16 (the same model, portrait, seed and steps)."""
    from wanstudio.train.evaluate import quant_mode_scores

    scores = quant_mode_scores()
    base = scores["disabled"]["sync"]
    off = {mode: r["sync"] for mode, r in scores.items() if abs(r["sync"] - base) > 0.05}
    assert not off, f"bf16 sync {base}; modes off by more than 0.05: {off}"
