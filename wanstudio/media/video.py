"""The mp4: frames and the speech written through ffmpeg atomically, and probed."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import subprocess
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch

from ..atomic import part_path
from ..errors import MediaError, ShapeError
from .common import SAMPLE_RATE, VIDEO_FPS, _ffmpeg, _ffmpeg_command, _last_line, check_input_file

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov")  # what VideoWriter writes: an MP4 (ISO BMFF) file
_WRITE_ERRORS = {
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOSPC: "no space left on the disk",
    errno.ENOTDIR: "a part of the folder path is a file",
    errno.EEXIST: "a part of the folder path is a file",
}

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
        self._video_part = part_path(self.path, "video")  # the writer's pid is in the names
        self._muxed_part = part_path(self.path)
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


def check_output_path(path: str | os.PathLike) -> Path:
    """Refuse, before any heavy work, a video path that could not be written; returns it.

    ``path`` must not be a folder and must end in a video suffix (.mp4, .m4v, .mov); its
    folder is created when missing and must accept a new file (a temp file is created and
    removed there, so a read-only disk, a missing permission or a full disk show now).
    """
    path = Path(path)
    if path.is_dir():
        raise MediaError(
            f"cannot write the video to {path}: it is a folder. Pass a file in it, e.g. {path / 'video.mp4'}."
        )
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise MediaError(
            f"cannot write the video to {path}: expected a name ending in {', '.join(VIDEO_SUFFIXES)}, "
            f"found {path.suffix or 'no suffix'!r}. Pass e.g. {path.with_name(path.name + '.mp4')}."
        )
    folder = path.parent
    probe = part_path(path, "probe")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        probe.unlink()
    except OSError as err:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
        reason = _WRITE_ERRORS.get(err.errno, err.strerror or str(err))
        raise MediaError(
            f"cannot write the video to {path}: {reason} ({folder}). Pass an output path on a writable disk."
        ) from err
    return path


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


def probe_media(path: str | os.PathLike, *, count_frames: bool = True) -> dict:
    """What ffmpeg reads from a media file.

    Keys: ``duration`` (s), ``has_video``, ``has_audio``; with video: ``video_codec``,
    ``pix_fmt``, ``width``, ``height``, ``fps``, ``frames`` (counted by demuxing the whole file;
    None with ``count_frames=False``, which reads the header only); with audio:
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
            frames=_count_frames(path) if count_frames else None,
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
