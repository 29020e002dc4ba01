"""The training set: speech made here, faces drawn where the training runs.

:func:`build_dataset` (CPU, needs espeak-ng for real speech) writes two files to a folder:

* ``speech.npz`` — per utterance: the tiny wav2vec2's features [T, 3, 32] (float16, computed
  exactly as the pipeline does: loudness-normalised to -23 LUFS, the whole track at once), the
  mouth track [T, 3] (open, wide, round) and the loudness envelope [T]; the tiny umT5's
  embeddings of a few prompts; a held-out evaluation track (a voice and sentences never used
  for training, with a one-second pause); and a JSON description (seed, voices, versions).
* ``encoders.safetensors`` — the tiny text / image / audio encoders' weights (seeded random,
  never trained), so features computed later match the ones trained on, whatever library
  version re-creates them.

:class:`ClipSampler` (any device) turns that into training clips: a random utterance window,
a random person (:class:`~wanstudio.train.faces.FaceStyle`), small head motion and blinks,
the mouth from the track, all drawn by :func:`~wanstudio.train.faces.render` on the device.
Frame 0 of every utterance is the person at rest: the reference picture.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write
from ..errors import CheckpointError
from . import faces, speech

SPEECH_FILE = "speech.npz"
ENCODERS_FILE = "encoders.safetensors"
# prompts the DiT sees during training (it must learn to ignore them: the tiny umT5 is random);
# "NEGATIVE" stands for the pipeline's default negative prompt, which guidance feeds it
PROMPTS = ("a person talking to the camera", "", "a cartoon face", "someone speaking, close-up", "NEGATIVE")
AUDIO_WINDOW = 5  # the tiny preset's audio_window: offsets -2..2


def prompts() -> tuple[str, ...]:
    """PROMPTS with "NEGATIVE" replaced by the pipeline's default negative prompt."""
    from ..pipeline.infinitetalk import DEFAULT_NEGATIVE_PROMPT

    return tuple(DEFAULT_NEGATIVE_PROMPT if p == "NEGATIVE" else p for p in PROMPTS)


def tiny_encoders(seed: int = 0):
    """The tiny preset's text / image / audio encoders, exactly as ``InfiniteTalkPipeline.tiny``
    builds them (seeded random weights, widths of the 'tiny-infinitetalk' config)."""
    from ..config import WanConfig
    from ..encoders import AudioEncoder, ImageEncoder, TextEncoder

    cfg = WanConfig.preset("tiny-infinitetalk")
    return (
        TextEncoder.tiny(text_dim=cfg.text_dim, seed=seed),
        ImageEncoder.tiny(clip_dim=cfg.clip_dim, seed=seed),
        AudioEncoder.tiny(layers=cfg.audio_layers, dim=cfg.audio_dim, seed=seed),
    )


def encoder_state(text, image, audio) -> dict[str, torch.Tensor]:
    """The three encoders' weights under 'text.', 'image.', 'audio.' (contiguous copies)."""
    out = {}
    for prefix, enc in (("text", text), ("image", image), ("audio", audio)):
        for k, v in enc.model.state_dict().items():
            out[f"{prefix}.{k}"] = v.detach().cpu().contiguous().clone()
    return out


def heldout_track(use_espeak: bool) -> tuple[np.ndarray, tuple[float, float], str]:
    """A held-out speech track: two sentences, a one-second pause between them, in the voice
    training never uses ('en-us'); babble when espeak-ng is missing. -> (wave, pause, text)."""
    sr = speech.SAMPLE_RATE
    if use_espeak:
        a, b = (
            speech._trim(speech.synthesize(t, speech.HELD_OUT_VOICE, 150, 45))
            for t in speech.HELD_OUT_SENTENCES
        )
        text = " | ".join(speech.HELD_OUT_SENTENCES)
    else:
        rng = np.random.default_rng(12345)
        a, b = speech.babble(rng, 2.5), speech.babble(rng, 2.0)
        text = "(babble)"
    lead = np.zeros(int(0.3 * sr), np.float32)
    start = (len(lead) + len(a)) / sr
    wave = np.concatenate([lead, a, np.zeros(sr, np.float32), b, np.zeros(int(0.3 * sr), np.float32)])
    return wave.astype(np.float32), (start, start + 1.0), text


def build_dataset(
    folder: str | Path,
    *,
    seed: int = 0,
    utterances: int = 400,
    use_espeak: bool | None = None,
    log=print,
) -> Path:
    """Make the speech half of the training set in ``folder`` (see the module doc).

    Deterministic from ``seed`` (utterance i draws from ``numpy.random.default_rng([seed, i])``).
    ``use_espeak`` None: espeak-ng when installed, else babble. Returns the folder.
    """
    from safetensors.torch import save

    from ..media import loudness_normalize

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if use_espeak is None:
        use_espeak = speech.espeak_available()
    text_enc, image_enc, audio_enc = tiny_encoders()
    t0 = time.perf_counter()
    feats, tracks, envs, lengths, voices, texts, seconds = [], [], [], [], [], [], 0.0
    for i in range(utterances):
        u = speech.random_utterance(np.random.default_rng([seed, i]), use_espeak=use_espeak)
        wave = loudness_normalize(u.wave, speech.SAMPLE_RATE, -23.0)  # as the pipeline does
        f = audio_enc.encode(wave, num_frames=u.frames)  # (T, layers, dim)
        m = speech.speech_mouth(wave)
        feats.append(f.numpy().astype(np.float16))
        tracks.append(np.stack([m["open"], m["wide"], m["round"]], axis=1).astype(np.float16))
        envs.append(m["env"].astype(np.float16))
        lengths.append(u.frames)
        voices.append(u.voice)
        texts.append(u.text)
        seconds += u.seconds
        if log and (i + 1) % 50 == 0:
            log(f"  {i + 1}/{utterances} utterances, {seconds / 60:.1f} min of speech")
    contexts = [c.float() for c in text_enc.encode(list(prompts()))]
    L = max(len(c) for c in contexts)
    context = np.zeros((len(PROMPTS), L, contexts[0].shape[1]), np.float32)
    for k, c in enumerate(contexts):
        context[k, : len(c)] = c.numpy()
    held_wave, pause, held_text = heldout_track(use_espeak)
    held_wave = loudness_normalize(held_wave, speech.SAMPLE_RATE, -23.0)  # as the pipeline would
    meta = dict(
        seed=seed,
        utterances=utterances,
        frames=int(sum(lengths)),
        minutes=round(seconds / 60, 2),
        speech="espeak-ng" if use_espeak else "babble",
        espeak=_espeak_version() if use_espeak else None,
        voices=sorted(set(voices)),
        prompts=list(PROMPTS),
        heldout=dict(
            voice=speech.HELD_OUT_VOICE if use_espeak else "babble", text=held_text, pause=list(pause)
        ),
        made_on=platform.platform(),
        torch=torch.__version__,
        seconds_to_build=round(time.perf_counter() - t0, 1),
    )
    arrays = dict(
        features=np.concatenate(feats),
        mouth=np.concatenate(tracks),
        envelope=np.concatenate(envs),
        lengths=np.asarray(lengths, np.int64),
        context=context,
        context_lengths=np.asarray([len(c) for c in contexts], np.int64),
        heldout_wave=held_wave,
        heldout_pause=np.asarray(pause, np.float64),
        meta=np.asarray(json.dumps(meta)),
        texts=np.asarray(texts),
    )
    atomic_write(folder / SPEECH_FILE, lambda f: np.savez_compressed(f, **arrays))
    state = encoder_state(text_enc, image_enc, audio_enc)
    atomic_write(folder / ENCODERS_FILE, lambda f: f.write(save(state)))
    return folder


def _espeak_version() -> str:
    try:
        return subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


# --- reading it back ------------------------------------------------------------------------------
@dataclass
class SpeechData:
    """``speech.npz`` in memory; per-utterance arrays are views into the concatenated ones."""

    features: np.ndarray  # (sum T, layers, dim) float16
    mouth: np.ndarray  # (sum T, 3) float16: open, wide, round
    envelope: np.ndarray  # (sum T,) float16
    lengths: np.ndarray  # (U,)
    context: np.ndarray  # (P, L, text_dim) float32, zero-padded
    context_lengths: np.ndarray  # (P,)
    heldout_wave: np.ndarray
    heldout_pause: tuple[float, float]
    meta: dict

    @classmethod
    def load(cls, folder: str | Path) -> SpeechData:
        """Read ``speech.npz`` from ``folder``; CheckpointError (with the command that makes it) when absent."""
        path = Path(folder) / SPEECH_FILE
        if not path.is_file():
            raise CheckpointError(
                f"no training data at {path}: make it with `python -m wanstudio.train data --out {folder}`"
            )
        with np.load(path) as z:
            return cls(
                features=z["features"],
                mouth=z["mouth"],
                envelope=z["envelope"],
                lengths=z["lengths"],
                context=z["context"],
                context_lengths=z["context_lengths"],
                heldout_wave=z["heldout_wave"],
                heldout_pause=tuple(float(v) for v in z["heldout_pause"]),
                meta=json.loads(str(z["meta"])),
            )

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths)])

    def utterance(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(features [T, layers, dim], mouth [T, 3]) of utterance i."""
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.features[a:b], self.mouth[a:b]


# --- clips ----------------------------------------------------------------------------------------
def head_walk(rng: np.random.Generator, frames: int, spread: float, smooth: float = 0.08) -> np.ndarray:
    """Smooth random head motion starting at 0: white noise through two one-pole low-passes
    (pole 1 - ``smooth``), scaled to a stationary spread of ``spread``: float64 [frames]."""
    from scipy.signal import lfilter

    p = 1.0 - smooth
    sigma = spread * np.sqrt((1 - p * p) ** 3 / (smooth * smooth * (1 + p * p)))
    noise = rng.normal(0, sigma, frames)
    noise[0] = 0.0
    once = lfilter([1.0], [1.0, -p], noise)
    return lfilter([smooth], [1.0, -p], once)


def blinks(rng: np.random.Generator, frames: int, every_s: float = 3.5) -> np.ndarray:
    """Eye closure [frames]: 4-frame blinks at exponential intervals, never on frame 0."""
    out = np.zeros(frames)
    t = int(rng.exponential(every_s * 25 * 0.6)) + 5
    while t < frames:
        for k, v in enumerate((0.6, 1.0, 1.0, 0.5)):
            if t + k < frames:
                out[t + k] = v
        t += 8 + int(rng.exponential(every_s * 25))
    return out


@dataclass
class Clip:
    """A batch of training clips (B clips of F frames) on one device."""

    video: torch.Tensor  # (B, 3, F, H, W) in [-1, 1]
    reference: torch.Tensor  # (B, 3, H, W) in [-1, 1]: each person at rest (= frame 0 of the utterance)
    audio: torch.Tensor  # (B, 1, F, window, layers, dim) float32, the pipeline's windows
    context: torch.Tensor  # (B, L, text_dim): one of PROMPTS each
    start: torch.Tensor  # (B,) the clip's first frame in its utterance
    utterance: torch.Tensor  # (B,) which utterance
    mouth_xy: torch.Tensor  # (B, 2) the mouth centre in pixels (x, y), for loss weights
    mouth: torch.Tensor  # (B, F, 3) the drawn mouth per frame (open, wide, round), for the VAE's readout


class ClipSampler:
    """Random training clips drawn on ``device`` (see the module doc).

    A clip starts at frame 0 of its utterance with probability ``p_first`` (the pipeline's
    first clip, whose frame 0 is the reference), else anywhere it fits.
    """

    def __init__(
        self, data: SpeechData, *, frame_num: int = 17, size: int = 64, device="cpu", p_first: float = 0.3
    ):
        self.data, self.frame_num, self.size, self.p_first = data, frame_num, size, p_first
        self.device = torch.device(device)
        keep = np.nonzero(data.lengths >= frame_num)[0]
        if len(keep) == 0:
            raise CheckpointError(f"no utterance is {frame_num} frames long; build a larger data set")
        self.usable = keep
        self.offsets = data.offsets
        self.features = torch.from_numpy(data.features).to(self.device)
        self.context = torch.from_numpy(data.context).to(self.device)

    def sample(self, rng: np.random.Generator, batch: int) -> Clip:
        """``batch`` random clips, each a random utterance, start, face style and head motion, the
        mouth moving with the utterance's speech; rendered on ``device``."""
        F, window = self.frame_num, AUDIO_WINDOW
        styles, starts, utts, audio_idx, tracks = [], [], [], [], []
        motion = {k: [] for k in faces.MOTION_FIELDS}
        for _ in range(batch):
            u = int(rng.choice(self.usable))
            T = int(self.data.lengths[u])
            s = 0 if rng.uniform() < self.p_first else int(rng.integers(0, T - F + 1))
            style = faces.FaceStyle.sample(rng)
            styles.append(style)
            n = s + F
            head = dict(
                dx=head_walk(rng, n, 0.012),
                dy=head_walk(rng, n, 0.008),
                tilt=head_walk(rng, n, np.radians(2.0)),
            )
            head["blink"] = blinks(rng, n)
            a = self.offsets[u]
            mouth = self.data.mouth[a + s : a + n].astype(np.float32)
            for k in ("dx", "dy", "tilt", "blink"):
                motion[k].append(head[k][s:n])
            for j, k in enumerate(("open", "wide", "round")):
                motion[k].append(mouth[:, j])
            tracks.append(mouth)
            # the pipeline's audio windows: frame t sees t-2..t+2, clamped to the utterance
            idx = np.arange(s, n)[:, None] + np.arange(-(window // 2), window // 2 + 1)[None, :]
            audio_idx.append(a + np.clip(idx, 0, T - 1))
            starts.append(s)
            utts.append(u)
        st = faces.style_arrays(styles)
        dev = self.device
        per_frame = {k: torch.from_numpy(np.repeat(v, F, axis=0)).to(dev) for k, v in st.items()}
        for k, v in motion.items():
            per_frame[k] = torch.from_numpy(np.concatenate(v).astype(np.float32)).to(dev)
        size = (self.size, self.size)
        video = faces.render(per_frame, size).view(batch, F, self.size, self.size, 3)
        rest = {k: torch.from_numpy(v).to(dev) for k, v in st.items()}
        for k in faces.MOTION_FIELDS:
            rest[k] = torch.zeros(batch, device=dev)
        reference = faces.render(rest, size)  # (B, H, W, 3)
        audio = self.features[
            torch.from_numpy(np.stack(audio_idx)).to(dev)
        ].float()  # (B, F, window, layers, dim)
        prompt = torch.from_numpy(rng.integers(0, len(self.context), batch)).to(dev)
        return Clip(
            video=_quantize(video).permute(0, 4, 1, 2, 3),
            reference=_quantize(reference).permute(0, 3, 1, 2),
            audio=audio[:, None],
            context=self.context[prompt],
            start=torch.tensor(starts, device=dev),
            utterance=torch.tensor(utts, device=dev),
            mouth_xy=torch.from_numpy(_mouth_pixels(st, self.size)).to(dev),
            mouth=torch.from_numpy(np.stack(tracks)).to(dev),
        )


def _quantize(frames: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> uint8 steps -> [-1, 1]: what a saved picture would hold."""
    return faces.to_uint8(frames).float() / 127.5 - 1.0


def _mouth_pixels(st: dict[str, np.ndarray], size: int) -> np.ndarray:
    """Mouth centre (x, y) in pixels of the size x size crop, head at rest."""
    scale = max(size, size / faces.PORTRAIT_ASPECT)
    left, top = (scale - size) / 2, (scale * faces.PORTRAIT_ASPECT - size) / 2
    x = (0.5 - 0.5 + st["shift_x"]) * st["zoom"] + 0.5
    y = (st["mouth_y"] - 0.6 + st["shift_y"]) * st["zoom"] + 0.6
    return np.stack([x * scale - left, y * scale - top], axis=1).astype(np.float32)
