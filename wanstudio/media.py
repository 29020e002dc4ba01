"""Media files: read the portrait and the speech, write the mp4.

Audio and video go through the ffmpeg binary bundled with imageio-ffmpeg (any format it reads);
images through PIL. A file that cannot be read or written raises MediaError naming the file and
what to do; an array of the wrong shape raises ShapeError.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import subprocess
import tempfile
import uuid
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import MediaError, ShapeError
from .options import SizeClass, SpeakerMix, parse_option

VIDEO_FPS = 25  # InfiniteTalk's output rate; audio features are computed per video frame
SAMPLE_RATE = 16000  # wav2vec2's input rate
SILENCE_PEAK = 1e-4  # peak amplitude (-80 dBFS) below which a track counts as silent
MAX_IMAGE_PIXELS = 64_000_000  # 48 Mpx photos pass; 100 Mpx took 23 s + 1.1 GiB to decode
ASSETS = Path(__file__).resolve().parent / "assets"

# InfiniteTalk's size buckets: (H / W aspect ratio, H, W). 480 class ~640^2 px, 720 ~960^2 px.
_BUCKETS: dict[SizeClass, tuple[tuple[float, int, int], ...]] = {
    SizeClass.P480: (
        (0.26, 320, 1216),
        (0.38, 384, 1024),
        (0.50, 448, 896),
        (0.67, 512, 768),
        (0.82, 576, 704),
        (1.00, 640, 640),
        (1.22, 704, 576),
        (1.50, 768, 512),
        (1.86, 832, 448),
        (2.00, 896, 448),
        (2.50, 960, 384),
        (2.83, 1088, 384),
        (3.60, 1152, 320),
        (3.80, 1216, 320),
        (4.00, 1280, 320),
    ),
    SizeClass.P720: (
        (0.22, 448, 2048),
        (0.29, 512, 1792),
        (0.36, 576, 1600),
        (0.45, 640, 1408),
        (0.55, 704, 1280),
        (0.63, 768, 1216),
        (0.76, 832, 1088),
        (0.88, 896, 1024),
        (1.00, 960, 960),
        (1.14, 1024, 896),
        (1.31, 1088, 832),
        (1.50, 1152, 768),
        (1.58, 1216, 768),
        (1.82, 1280, 704),
        (1.91, 1344, 704),
        (2.20, 1408, 640),
        (2.30, 1472, 640),
        (2.67, 1536, 576),
        (2.89, 1664, 576),
        (3.62, 1856, 512),
        (3.75, 1920, 512),
    ),
}


# --- images ---------------------------------------------------------------------------------


def load_image(path: str | os.PathLike) -> Image.Image:
    """An image file -> RGB PIL image, EXIF orientation applied, transparency over white.

    The size is read from the header first: more than :data:`MAX_IMAGE_PIXELS` is refused
    before anything is decoded. An animated image gives its first frame, with a warning.
    """
    path = check_input_file(path, "image")
    try:
        with warnings.catch_warnings():  # PIL warns at 89 Mpx; ours refuses lower, just below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path)  # lazy: reads the header only
        with opened:
            _check_image_header(opened, path)
            image = ImageOps.exif_transpose(opened)
            image.load()
    except Image.DecompressionBombError as err:  # PIL's own limit, above ours: same advice
        raise MediaError(_too_large(path, err)) from err
    except UnidentifiedImageError as err:
        raise MediaError(
            f"{path} is not an image PIL can read (PNG, JPEG, WebP, ...). Pass a picture file."
        ) from err
    except OSError as err:
        raise MediaError(f"{path}: the image could not be decoded ({err}); it may be truncated.") from err
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return image.convert("RGB")


def _check_image_header(opened: Image.Image, path: Path) -> None:
    """Refuse an image too large to decode cheaply; warn about frames after the first."""
    width, height = opened.size
    if width * height > MAX_IMAGE_PIXELS:
        raise MediaError(_too_large(path, f"{width}x{height} = {width * height / 1e6:.1f} Mpx"))
    if getattr(opened, "n_frames", 1) > 1:
        warnings.warn(
            f"{path} is an animated image: using its first frame of {opened.n_frames}.", stacklevel=3
        )


def _too_large(path: Path, found) -> str:
    return (
        f"{path} is too large for a reference image ({found}; the limit is {MAX_IMAGE_PIXELS / 1e6:.0f} "
        f"Mpx, videos are at most 2048 pixels on a side): downscale it first, e.g. to 4096 on its longer side."
    )


def choose_bucket(width: int, height: int, size_class: str | int | SizeClass) -> tuple[int, int]:
    """(W, H) of the bucket whose aspect ratio (H / W) is nearest the image's."""
    if width < 1 or height < 1:
        raise MediaError(f"image size must be positive, got {width} x {height}.")
    buckets = _BUCKETS[parse_option(SizeClass, str(size_class))]
    ratio = height / width
    _, h, w = min(buckets, key=lambda b: abs(b[0] - ratio))  # first of equals, as InfiniteTalk
    return w, h


def resize_and_crop(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """Cover-resize (bilinear) to ``size`` = (W, H), centre-crop -> [3, H, W] float32 in [-1, 1]."""
    width, height = size
    scale = max(width / image.width, height / image.height)
    resized_w, resized_h = math.ceil(scale * image.width), math.ceil(scale * image.height)
    resized = image.convert("RGB").resize((resized_w, resized_h), Image.BILINEAR)
    top, left = round((resized_h - height) / 2), round((resized_w - width) / 2)
    cropped = resized.crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.asarray(cropped, dtype=np.uint8).copy())  # (H, W, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1.0  # (3, H, W)


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


# --- video ----------------------------------------------------------------------------------


@dataclass
class _Scratch:
    """What an unfinished VideoWriter owns: its ffmpeg process and its temp files."""

    paths: tuple[Path, ...]
    log: IO[bytes]  # ffmpeg's stderr: a file, since a pipe nobody reads could fill and block it
    proc: subprocess.Popen | None = None

    def discard(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            with contextlib.suppress(BrokenPipeError):  # frames still buffered for a dead ffmpeg
                self.proc.stdin.close()
        for path in self.paths:
            path.unlink(missing_ok=True)
        self.log.close()


class VideoWriter:
    """Stream frames into an H.264 / yuv420p mp4 with AAC audio; publish it atomically.

    Frames are piped to ffmpeg as they are appended (memory stays bounded). The file at
    ``path`` appears only when close() succeeds: frames are encoded into a hidden temp file
    beside it, the audio is muxed in a second pass (video stream copied, audio padded or cut to
    the video's length), then ``os.replace`` puts the result in place. An exception inside the
    ``with`` block, or abort(), deletes the temp files and leaves ``path`` as it was.

    ``append`` accepts uint8 frames [F, H, W, 3] (numpy or torch), or float frames
    [3, F, H, W] in [-1, 1] (one sample of ``VAE.decode``'s [B, 3, F, H, W]). H and W must be
    even (yuv420p).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fps: int = VIDEO_FPS,
        audio: np.ndarray | None = None,
        sample_rate: int = SAMPLE_RATE,
    ):
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise MediaError(f"cannot write {self.path}: folder {self.path.parent} does not exist.")
        self.fps, self.sample_rate = fps, sample_rate
        self.audio = None if audio is None else np.array(audio, dtype=np.float32)  # own copy
        if self.audio is not None and self.audio.ndim != 1:
            raise ShapeError(
                f"VideoWriter wants mono audio [N]; got shape {self.audio.shape}. For two "
                f"speakers pass the sum of the mix_speakers tracks."
            )
        self.frames = 0
        self._size: tuple[int, int] | None = None  # (W, H), fixed by the first append
        self._done = False
        stem = f".{self.path.name}.{uuid.uuid4().hex[:8]}"
        self._video_part = self.path.with_name(stem + ".video.part")
        self._muxed_part = self.path.with_name(stem + ".part")
        log = tempfile.TemporaryFile()  # noqa: SIM115 -- lives until close() / abort()
        self._scratch = _Scratch((self._video_part, self._muxed_part), log)
        # Runs discard once: at close() / abort(), or when a forgotten writer is collected.
        self._discard = weakref.finalize(self, self._scratch.discard)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def append(self, frames: np.ndarray | torch.Tensor) -> None:
        """Encode more frames: uint8 [F, H, W, 3], or float [3, F, H, W] in [-1, 1]."""
        if self._done:
            raise MediaError(f"{self.path}: append() after close() or abort().")
        rgb = _to_rgb24(frames)  # (F, H, W, 3) uint8
        size = (rgb.shape[2], rgb.shape[1])
        if self._size is None:
            self._start(*size)
        elif size != self._size:
            raise ShapeError(
                f"{self.path}: frames of {size[0]}x{size[1]} after frames of "
                f"{self._size[0]}x{self._size[1]}; every frame of a video has one size."
            )
        try:
            self._scratch.proc.stdin.write(rgb.tobytes())
        except BrokenPipeError as err:
            message = f"ffmpeg stopped encoding {self.path}: {self._ffmpeg_log()}"
            self.abort()
            raise MediaError(message) from err
        self.frames += rgb.shape[0]

    def close(self) -> Path:
        """Finish encoding, mux the audio, move the mp4 into place; returns its path."""
        if self._done:
            raise MediaError(f"{self.path}: close() after close() or abort().")
        if self.frames == 0:
            self.abort()
            raise MediaError(f"{self.path}: no frames were appended, so there is no video to write.")
        try:
            proc = self._scratch.proc
            proc.stdin.close()
            if proc.wait() != 0:
                raise MediaError(f"ffmpeg failed to encode {self.path}: {self._ffmpeg_log()}")
            if self.audio is not None:
                self._mux_audio()
            os.replace(self._muxed_part if self.audio is not None else self._video_part, self.path)
        except BaseException:
            self.abort()
            raise
        self._finish()
        return self.path

    def abort(self) -> None:
        """Stop ffmpeg and delete the temp files; ``path`` is left as it was."""
        self._finish()

    def _finish(self) -> None:
        self._done = True
        self._discard()

    def _start(self, width: int, height: int) -> None:
        self._size = (width, height)
        command = _ffmpeg_command(
            [
                "-f",
                "rawvideo",
                "-pix_fmt",
                "rgb24",
                "-s",
                f"{width}x{height}",
                "-r",
                str(self.fps),
                "-i",
                "-",
                "-an",
                "-c:v",
                "libx264",
                "-pix_fmt",
                "yuv420p",
                "-crf",
                "18",
                "-f",
                "mp4",
                str(self._video_part),
            ],
            reads_stdin=True,
        )
        self._scratch.proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._scratch.log
        )

    def _mux_audio(self) -> None:
        audio = np.clip(self.audio, -1.0, 1.0).astype("<f4")
        result = _ffmpeg(
            [
                "-i",
                str(self._video_part),
                "-f",
                "f32le",
                "-ar",
                str(self.sample_rate),
                "-ac",
                "1",
                "-i",
                "-",
                "-map",
                "0:v:0",
                "-map",
                "1:a:0",
                "-c:v",
                "copy",
                "-c:a",
                "aac",
                "-af",
                "apad",
                "-t",
                f"{self.frames / self.fps:.6f}",
                "-movflags",
                "+faststart",
                "-f",
                "mp4",
                str(self._muxed_part),
            ],
            stdin=audio.tobytes(),
        )
        if result.returncode != 0:
            log = result.stderr.decode(errors="replace")
            raise MediaError(f"ffmpeg failed to mux the audio into {self.path}: {_last_line(log)}")

    def _ffmpeg_log(self) -> str:
        self._scratch.log.seek(0)
        return _last_line(self._scratch.log.read().decode(errors="replace"))


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray | torch.Tensor,
    fps: int = VIDEO_FPS,
    audio: np.ndarray | None = None,
    sample_rate: int = SAMPLE_RATE,
) -> Path:
    """Write all ``frames`` (formats as VideoWriter.append) and ``audio`` to an mp4 at ``path``."""
    with VideoWriter(path, fps, audio, sample_rate) as writer:
        writer.append(frames)
    return writer.path


def _to_rgb24(frames: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 [F, H, W, 3] or float [3, F, H, W] in [-1, 1] -> C-contiguous uint8 [F, H, W, 3]."""
    x = torch.as_tensor(frames).detach().cpu()
    if x.dtype == torch.uint8 and x.ndim == 4 and x.shape[-1] == 3:
        rgb = x
    elif x.is_floating_point() and x.ndim == 4 and x.shape[0] == 3:
        rgb = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0)
    else:
        raise ShapeError(
            f"video frames must be uint8 [F, H, W, 3] or float [3, F, H, W] in [-1, 1]; got "
            f"{x.dtype} {tuple(x.shape)}. For VAE.decode output [B, 3, F, H, W] pass video[0]."
        )
    if rgb.shape[1] % 2 or rgb.shape[2] % 2:
        raise ShapeError(
            f"H.264 yuv420p needs even frame sizes; got {rgb.shape[2]}x{rgb.shape[1]}. Crop or pad one pixel."
        )
    return np.ascontiguousarray(rgb.numpy())


def probe_media(path: str | os.PathLike) -> dict:
    """What ffmpeg reads from a media file.

    Keys: ``duration`` (s), ``has_video``, ``has_audio``; with video: ``video_codec``,
    ``pix_fmt``, ``width``, ``height``, ``fps``, ``frames`` (counted by demuxing); with audio:
    ``audio_codec``, ``sample_rate``.
    """
    path = check_input_file(path, "media")
    # With no output file ffmpeg prints the input's header and stops.
    header = _ffmpeg(["-i", str(path)], loglevel="info").stderr.decode(errors="replace")
    if "Input #0" not in header:
        raise MediaError(f"{path} is not a media file ffmpeg can read ({_last_line(header)}).")
    info: dict = {"duration": None, "has_video": False, "has_audio": False}
    duration = re.search(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)", header)
    if duration:
        h, m, s = duration.groups()
        info["duration"] = int(h) * 3600 + int(m) * 60 + float(s)
    video = re.search(r"Stream #0:\d+.*?: Video: (.*)", header)
    if video:
        fields = _split_fields(video[1])
        size = next((m for f in fields if (m := re.match(r"(\d+)x(\d+)\b", f))), None)
        fps = re.search(r"([\d.]+) fps", video[1])
        info.update(
            has_video=True,
            video_codec=fields[0].split()[0],
            pix_fmt=fields[1].split("(")[0],
            width=int(size[1]) if size else None,
            height=int(size[2]) if size else None,
            fps=float(fps[1]) if fps else None,
            frames=_count_frames(path),
        )
    audio = re.search(r"Stream #0:\d+.*?: Audio: (.*)", header)
    if audio:
        rate = re.search(r"(\d+) Hz", audio[1])
        info.update(
            has_audio=True,
            audio_codec=audio[1].split()[0].rstrip(","),
            sample_rate=int(rate[1]) if rate else None,
        )
    return info


def _count_frames(path: Path) -> int:
    command = ["-i", str(path), "-map", "0:v:0", "-c", "copy", "-f", "null", "-"]
    log = _ffmpeg(command, loglevel="info")
    counts = re.findall(r"frame=\s*(\d+)", log.stderr.decode(errors="replace"))
    return int(counts[-1]) if counts else 0


def _split_fields(text: str) -> list[str]:
    """Split ffmpeg's stream description at commas that are not inside parentheses."""
    fields, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char == "(") - (char == ")")
        if char == "," and depth == 0:
            fields.append(text[start:i].strip())
            start = i + 1
    return [*fields, text[start:].strip()]


# --- shared ---------------------------------------------------------------------------------


def asset_path(name: str) -> Path:
    """A sample file shipped in wanstudio/assets: 'portrait.png' or 'speech.wav'."""
    path = ASSETS / name
    if not path.is_file():
        shipped = sorted(p.name for p in ASSETS.iterdir() if p.suffix != ".md")
        raise MediaError(f"no asset {name!r}; wanstudio ships {', '.join(shipped)}.")
    return path


def check_input_file(path: str | os.PathLike, kind: str) -> Path:
    """``path`` when it is a readable file; else a MediaError: "x is a folder, expected an image file"."""
    path, article = Path(path), "an" if kind[:1] in "aeiou" else "a"
    if not path.exists():
        raise MediaError(f"{kind} file not found: {path}. Check the path.")
    if not path.is_file():
        what = "a folder" if path.is_dir() else "not a regular file"
        raise MediaError(f"{path} is {what}, expected {article} {kind} file. Pass the file itself.")
    if not os.access(path, os.R_OK):
        raise MediaError(f"{path} is not readable (permission denied). Check its permissions.")
    return path


def _ffmpeg_command(args: list[str], *, reads_stdin: bool = False, loglevel: str = "error") -> list[str]:
    """The bundled ffmpeg with ``args``; stdin stays closed unless the command reads it."""
    quiet = [] if reads_stdin else ["-nostdin"]
    import imageio_ffmpeg  # imported on use: the DiT and encoders load on GPU boxes without ffmpeg

    return [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-v", loglevel, *quiet, *args]


def _ffmpeg(
    args: list[str], *, stdin: bytes | None = None, loglevel: str = "error"
) -> subprocess.CompletedProcess:
    command = _ffmpeg_command(args, reads_stdin=stdin is not None, loglevel=loglevel)
    return subprocess.run(command, input=stdin, capture_output=True, check=False)


def _last_line(log: str) -> str:
    lines = [line.strip() for line in log.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"
