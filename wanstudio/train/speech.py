"""Speech for the training set, and the mouth it implies.

Speech comes from eSpeak NG (Debian package ``espeak-ng``: several voices, languages, speeds,
pitches) reading sentences and made-up words, joined with pauses. Where espeak-ng is missing,
:func:`babble` makes speech-like sound (a pulse train through vowel formants, syllable by
syllable, with noise consonants) so the pipeline still runs, e.g. in CI.

The mouth follows the sound (:func:`mouth_track`): its opening follows the loudness envelope
(:func:`wanstudio.eval.loudness_envelope`, the one the lip-sync score uses), and its shape one of
three visemes from the spectral centroid of each frame: low -> *round* (o, u), middle -> *open*
(a), high -> *wide* (i, e, s). Everything is deterministic given a ``numpy`` Generator.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
import wave as wavefile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MediaError
from ..eval import FPS, SAMPLE_RATE, loudness_envelope

# Voices used for training; 'en-us' (the shipped speech.wav's voice) is held out for testing.
TRAIN_VOICES = (
    "en-gb", "en-gb-x-rp", "en-gb-scotland", "en-029", "de", "fr-fr", "es", "it", "pt",
    "nl", "pl", "sv", "cs", "fi", "hu", "id", "sw", "tr",
)  # fmt: skip
VARIANTS = ("", "+m1", "+m2", "+m3", "+m4", "+f1", "+f2", "+f3", "+f4", "+f5")
HELD_OUT_VOICE = "en-us"
SYLLABLES_ON = "bdfgklmnprstvz"
VOWELS = "aeiou"

# a few real sentences per language (the rest is made-up words); none is used in the tests
SENTENCES = {
    "en": [
        "The weather is lovely this morning.",
        "Could you pass me the salt, please?",
        "We walked along the river until sunset.",
        "Numbers like seven, eleven and forty two.",
        "She opened the window and looked outside.",
        "Every picture tells a story of its own.",
    ],
    "de": ["Guten Morgen, wie geht es dir heute?", "Das Wetter ist schön und warm."],
    "fr": ["Bonjour, je voudrais un café, s'il vous plaît.", "La voiture rouge est devant la maison."],
    "es": ["Buenos días, ¿cómo estás?", "Me gusta caminar por la playa."],
    "it": ["Oggi mangiamo la pizza con gli amici.", "Il treno parte alle otto."],
}
# sentences the trained model never hears (tests use them with the held-out voice)
HELD_OUT_SENTENCES = (
    "Good evening, my friend. I have been waiting here for quite a while.",
    "Please remember to water the plants on Thursday.",
)


def espeak_available() -> bool:
    """Whether the ``espeak-ng`` program is on PATH."""
    return shutil.which("espeak-ng") is not None


def synthesize(text: str, voice: str = "en-gb", speed: int = 160, pitch: int = 50) -> np.ndarray:
    """eSpeak NG reads ``text`` -> float32 [N] at 16 kHz (its 22.05 kHz output, resampled)."""
    if not espeak_available():
        raise MediaError(
            "espeak-ng is not installed: `apt-get install -y espeak-ng` (Debian/Ubuntu), "
            "or build the data set with babble=True"
        )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        cmd = ["espeak-ng", "-v", voice, "-s", str(int(speed)), "-p", str(int(pitch)), "-w", str(path), text]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if done.returncode != 0 or not path.is_file():
            raise MediaError(f"espeak-ng failed for voice {voice!r}: {done.stderr.strip()[-300:]}")
        with wavefile.open(str(path)) as w:
            rate = w.getframerate()
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return resample(pcm.astype(np.float32) / 32768.0, rate, SAMPLE_RATE)


def resample(x: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling (scipy) -> float32."""
    if rate == target:
        return np.asarray(x, dtype=np.float32)
    from scipy.signal import resample_poly

    g = math.gcd(int(rate), int(target))
    return resample_poly(x, target // g, rate // g).astype(np.float32)


def made_up_words(rng: np.random.Generator, words: int) -> str:
    """Pronounceable nonsense ('bolo kamita rasu.'): consonant-vowel syllables."""
    out = []
    for _ in range(words):
        n = int(rng.integers(1, 4))
        w = "".join(rng.choice(list(SYLLABLES_ON)) + rng.choice(list(VOWELS)) for _ in range(n))
        if rng.uniform() < 0.25:
            w += rng.choice(list("nrs"))
        out.append(w)
    return " ".join(out) + rng.choice([".", ",", "!", "?"])


def babble(rng: np.random.Generator, seconds: float, pitch: float | None = None) -> np.ndarray:
    """Speech-like sound without espeak-ng: float32 [N] at 16 kHz.

    Syllables of 120-260 ms: a glottal pulse train (``pitch`` Hz, gliding) through three
    formant resonators of a random vowel, under an attack/decay envelope, some led by a noise
    burst (a consonant); 10% of the gaps are pauses of 0.2-0.8 s.
    """
    from scipy.signal import lfilter

    formants = {"a": (750, 1250, 2600), "e": (450, 1900, 2600), "i": (300, 2300, 3000),
                "o": (500, 900, 2500), "u": (320, 800, 2300)}  # fmt: skip
    f0 = float(pitch if pitch is not None else rng.uniform(95, 230))
    out = np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float64)
    t = int(rng.uniform(0.05, 0.3) * SAMPLE_RATE)
    while t < len(out):
        n = int(rng.uniform(0.12, 0.26) * SAMPLE_RATE)
        f = f0 * (1 + 0.15 * rng.standard_normal() * 0.3) * np.linspace(1.05, 0.95, n)
        phase = np.cumsum(f / SAMPLE_RATE)
        src = (np.diff(np.floor(phase), prepend=0) > 0).astype(np.float64)  # one pulse per period
        y = src
        for fc in formants[rng.choice(list(formants))]:
            r = math.exp(-math.pi * 90 / SAMPLE_RATE)
            w = 2 * math.pi * fc / SAMPLE_RATE
            y = lfilter([1 - r], [1, -2 * r * math.cos(w), r * r], y)
        env = np.minimum(1, np.arange(n) / (0.03 * SAMPLE_RATE)) * np.exp(-np.arange(n) / (0.5 * n))
        y = y / (np.abs(y).max() + 1e-9) * env * rng.uniform(0.4, 1.0)
        if rng.uniform() < 0.5:  # a consonant: a short noise burst before the vowel
            k = int(rng.uniform(0.03, 0.08) * SAMPLE_RATE)
            y[:k] = rng.standard_normal(k) * 0.1 * np.hanning(k)
        end = min(len(out), t + n)
        out[t:end] += y[: end - t]
        t = end + int(rng.uniform(0.02, 0.08) * SAMPLE_RATE)
        if rng.uniform() < 0.1:
            t += int(rng.uniform(0.2, 0.8) * SAMPLE_RATE)
    return (0.5 * out / (np.abs(out).max() + 1e-9)).astype(np.float32)


# --- utterances -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Utterance:
    """One speech track: 16 kHz wave, what was said, by whom, and where the pauses are."""

    wave: np.ndarray
    text: str
    voice: str
    speed: int
    pitch: int
    pauses: tuple[tuple[float, float], ...]  # (start, end) seconds of the silences between pieces

    @property
    def seconds(self) -> float:
        return len(self.wave) / SAMPLE_RATE

    @property
    def frames(self) -> int:
        """Video frames at 25 fps, as the pipeline counts them."""
        return int(len(self.wave) / SAMPLE_RATE * FPS)


def random_utterance(
    rng: np.random.Generator, *, use_espeak: bool = True, max_seconds: float = 9.0
) -> Utterance:
    """2-4 pieces of speech (a sentence or made-up words) in one random training voice, with
    pauses of 0.15-1.3 s between them and short silences at both ends."""
    voice = str(rng.choice(TRAIN_VOICES)) + str(rng.choice(VARIANTS))
    speed, pitch = int(rng.integers(120, 230)), int(rng.integers(25, 80))
    lang = voice.split("-")[0].split("+")[0]
    pieces, texts, pauses = [], [], []
    t = rng.uniform(0.0, 0.4)
    pieces.append(np.zeros(int(t * SAMPLE_RATE), np.float32))
    for k in range(int(rng.integers(2, 5))):
        if use_espeak:
            if lang in SENTENCES and rng.uniform() < 0.4:
                text = str(rng.choice(SENTENCES[lang]))
            else:
                text = made_up_words(rng, int(rng.integers(2, 7)))
            speech = _trim(synthesize(text, voice, speed, pitch))
        else:
            text = "(babble)"
            speech = babble(rng, rng.uniform(0.8, 2.5), pitch=80 + 2.5 * pitch)
        if k and t + len(speech) / SAMPLE_RATE > max_seconds:
            break
        if k:
            gap = float(rng.choice([rng.uniform(0.15, 0.4), rng.uniform(0.5, 1.3)]))
            pauses.append((t, t + gap))
            pieces.append(np.zeros(int(gap * SAMPLE_RATE), np.float32))
            t += gap
        pieces.append(speech * rng.uniform(0.5, 1.0))
        texts.append(text)
        t += len(speech) / SAMPLE_RATE
    pieces.append(np.zeros(int(rng.uniform(0.2, 0.6) * SAMPLE_RATE), np.float32))
    wave = np.concatenate(pieces).astype(np.float32)
    return Utterance(wave, " | ".join(texts), voice if use_espeak else "babble", speed, pitch, tuple(pauses))


def _trim(x: np.ndarray, level: float = 1e-3) -> np.ndarray:
    """Drop leading and trailing silence (espeak pads each sentence)."""
    loud = np.nonzero(np.abs(x) > level)[0]
    return x[loud[0] : loud[-1] + 1] if len(loud) else x


# --- the mouth ------------------------------------------------------------------------------------
def spectral_centroid(wave: np.ndarray, frames: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Per-video-frame spectral centroid (Hz, 150-4000 Hz band) of a 64 ms Hann window."""
    n = 1024
    hop = sample_rate / FPS
    x = np.pad(np.asarray(wave, np.float64), (n, n))
    centres = ((np.arange(frames) + 0.5) * hop).astype(np.int64) + n
    seg = x[centres[:, None] + np.arange(-n // 2, n // 2)[None, :]] * np.hanning(n)
    power = np.abs(np.fft.rfft(seg, axis=1)) ** 2
    f = np.fft.rfftfreq(n, 1 / sample_rate)
    band = (f >= 150) & (f <= 4000)
    p = power[:, band]
    return (p * f[band]).sum(1) / np.maximum(p.sum(1), 1e-12)


def visemes(wave: np.ndarray, frames: int) -> np.ndarray:
    """[T, 3] weights (open, wide, round), each row summing to 1, from the spectral centroid:
    below ~520 Hz round, above ~1000 Hz wide, open in between (soft edges; about a third of
    espeak-ng's loud frames each)."""
    c = spectral_centroid(wave, frames)
    rnd = 1 / (1 + np.exp((c - 520) / 80))
    wide = 1 / (1 + np.exp(-(c - 1000) / 120))
    opn = np.clip(1 - rnd - wide, 0, 1)
    w = np.stack([opn, wide, rnd], axis=1)
    return (w / w.sum(1, keepdims=True)).astype(np.float32)


def mouth_track(
    envelope: np.ndarray, shapes: np.ndarray, *, start_closed: bool = True
) -> dict[str, np.ndarray]:
    """Mouth state per frame from the loudness envelope [T] and viseme weights [T, 3].

    ``open``: 0 below -16 dB of the loud frames, 1 at -2 dB, smoothed with a fast attack and a
    slower release (jaws do not snap shut). ``wide`` / ``round``: the viseme weights, faded out
    as the mouth closes. Frame 0 is the rest pose when ``start_closed`` (the reference frame).
    """
    env = np.asarray(envelope, np.float64)
    target = np.clip((env - 0.6) / 0.35, 0, 1)
    opening = np.zeros_like(target)
    level = 0.0
    for t, v in enumerate(target):
        level += (v - level) * (0.8 if v > level else 0.55)
        opening[t] = level
    if start_closed and len(opening):
        opening[0] = 0.0
    gate = np.clip(opening * 2.5, 0, 1)
    shapes = np.asarray(shapes, np.float64)
    wide = _ema(shapes[:, 1], 0.5) * gate
    rnd = _ema(shapes[:, 2], 0.5) * gate
    return {
        "open": opening.astype(np.float32),
        "wide": wide.astype(np.float32),
        "round": rnd.astype(np.float32),
    }


def _ema(x: np.ndarray, a: float) -> np.ndarray:
    out = np.empty_like(x)
    level = x[0] if len(x) else 0.0
    for t, v in enumerate(x):
        level += (v - level) * a
        out[t] = level
    return out


def speech_mouth(wave: np.ndarray) -> dict[str, np.ndarray]:
    """The mouth for a 16 kHz wave: :func:`mouth_track` of its envelope and visemes, plus the
    envelope itself (``env``), all [T] with T = int(seconds * 25)."""
    T = int(len(wave) / SAMPLE_RATE * FPS)
    env = loudness_envelope(wave, frames=T)
    track = mouth_track(env, visemes(wave, T))
    track["env"] = env
    return track
