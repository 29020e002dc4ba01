"""Speech: read through ffmpeg at 16 kHz mono, checked, loudness-normalised, mixed."""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from ..errors import MediaError, ShapeError
from ..options import SpeakerMix, parse_option
from .common import SAMPLE_RATE, SILENCE_PEAK, VIDEO_FPS, _ffmpeg, _last_line, check_input_file

# --- audio ----------------------------------------------------------------------------------


def load_audio(
    path: str | os.PathLike,
    sample_rate: int = SAMPLE_RATE,
    *,
    min_seconds: float = 1 / VIDEO_FPS,
) -> np.ndarray:
    """Any file ffmpeg reads (wav, mp3, m4a, a video's sound, ...) -> float32 mono [N] at ``sample_rate``.

    Channels are averaged. Refused: no audio stream, no samples, non-finite samples, silence
    (peak below -80 dBFS), or shorter than ``min_seconds`` (default one video frame, 1/25 s).
    """
    path = check_input_file(path, "audio")
    result = _ffmpeg(
        ["-i", str(path), "-map", "0:a:0", "-ac", "1", "-ar", str(sample_rate), "-f", "f32le", "-"]
    )
    if result.returncode != 0:
        log = result.stderr.decode(errors="replace")
        if "matches no streams" in log:
            raise MediaError(f"{path} has no audio stream. Pass a speech recording.")
        raise MediaError(
            f"{path} is not an audio file ffmpeg can read ({_last_line(log)}). "
            f"Pass a wav, mp3, m4a or other audio file."
        )
    wave = np.frombuffer(result.stdout, dtype="<f4").astype(np.float32)
    _check_wave(wave, sample_rate, min_seconds, str(path))
    return wave


def check_speech(
    wave: np.ndarray | torch.Tensor,
    sample_rate: int = SAMPLE_RATE,
    *,
    min_seconds: float = 1 / VIDEO_FPS,
    name: str = "the audio array",
) -> np.ndarray:
    """A speech array (not a file) -> float32 mono [N], refused as :func:`load_audio` refuses files.

    Empty, NaN / Inf, shorter than ``min_seconds`` or silent: MediaError; not [N]: ShapeError.
    """
    if isinstance(wave, torch.Tensor):
        wave = wave.detach().cpu().float().numpy()
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise ShapeError(f"{name} must be mono [samples] at {sample_rate} Hz, got shape {wave.shape}.")
    _check_wave(wave, sample_rate, min_seconds, name)
    return wave


def _check_wave(wave: np.ndarray, sample_rate: int, min_seconds: float, name: str) -> None:
    if wave.size == 0:
        raise MediaError(f"{name} contains no audio samples. Pass a recording with sound.")
    if not np.isfinite(wave).all():
        raise MediaError(f"{name} contains NaN or infinite samples; re-export the recording.")
    seconds = wave.size / sample_rate
    if seconds < min_seconds:
        raise MediaError(
            f"{name} lasts {seconds:.4f} s, shorter than {min_seconds:.4f} s (one video frame at "
            f"{VIDEO_FPS} fps). Pass a longer recording."
        )
    peak = float(np.abs(wave).max())
    if peak < SILENCE_PEAK:
        raise MediaError(
            f"{name} is silent (peak amplitude {peak:.2e}); the video is driven by speech. "
            f"Pass a recording with a voice in it."
        )


def loudness_normalize(
    wave: np.ndarray, sample_rate: int = SAMPLE_RATE, target_lufs: float = -23.0
) -> np.ndarray:
    """Scale to ``target_lufs`` integrated loudness (ITU-R BS.1770, pyloudnorm) -> new float32 array.

    Left as is, like InfiniteTalk, when the loudness cannot be measured: non-finite or
    |L| > 100 LUFS (near silence), or shorter than the meter's 0.4 s gating block.
    """
    wave = np.asarray(wave, dtype=np.float64)
    if wave.ndim != 1:
        raise ShapeError(f"loudness_normalize wants mono audio [N]; got shape {wave.shape}.")
    import pyloudnorm  # imported on use: wanstudio.media loads on machines without it

    meter = pyloudnorm.Meter(sample_rate)
    if wave.size < meter.block_size * sample_rate:
        return wave.astype(np.float32)
    loudness = meter.integrated_loudness(wave)
    if not math.isfinite(loudness) or abs(loudness) > 100:
        return wave.astype(np.float32)
    return pyloudnorm.normalize.loudness(wave, loudness, target_lufs).astype(np.float32)


def mix_speakers(
    a1: np.ndarray, a2: np.ndarray, mode: str | SpeakerMix = SpeakerMix.PARA
) -> tuple[np.ndarray, np.ndarray]:
    """Two speakers' tracks -> two tracks of one common length (new arrays).

    'para': both talk at once; the shorter is zero-padded at the end.
    'add': speaker 1 talks, then speaker 2; each track is silent while the other talks.
    """
    mix = parse_option(SpeakerMix, mode)
    a1, a2 = np.asarray(a1, dtype=np.float32), np.asarray(a2, dtype=np.float32)
    if a1.ndim != 1 or a2.ndim != 1:
        raise ShapeError(f"mix_speakers wants two mono tracks [N]; got {a1.shape} and {a2.shape}.")
    if mix is SpeakerMix.ADD:
        return np.pad(a1, (0, a2.size)), np.pad(a2, (a1.size, 0))
    length = max(a1.size, a2.size)
    return np.pad(a1, (0, length - a1.size)), np.pad(a2, (0, length - a2.size))
