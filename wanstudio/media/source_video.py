"""Source videos (dubbing): frames read on demand through one ffmpeg pipe, at 25 fps.

A dubbing run needs one source frame per clip (the frame at the clip's start), in increasing
order, from a video that may be minutes of 1080p: :class:`VideoReader` holds one decoded frame,
never the video. ffmpeg resamples the source to the output rate with its ``fps`` filter (frames
dropped or repeated by timestamp, so frame i is the source picture shown at i / 25 s) and writes
PPM images to a pipe; each PPM header carries its frame's size, so a rotated phone video arrives
upright, at the size a player shows it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
import weakref
from pathlib import Path

import numpy as np

from ..errors import MediaError
from .common import VIDEO_FPS, _ffmpeg_command, _last_line, check_input_file
from .video import probe_media

# what a path passed as an image is taken to be a video by (the official tool's list, + a few)
VIDEO_INPUT_SUFFIXES = (
    ".mp4",
    ".m4v",
    ".mov",
    ".mkv",
    ".avi",
    ".webm",
    ".flv",
    ".wmv",
    ".mpeg",
    ".mpg",
    ".ts",
    ".3gp",
    ".y4m",
)


def is_video_file(path: str | os.PathLike) -> bool:
    """True when ``path``'s suffix names a video container (:data:`VIDEO_INPUT_SUFFIXES`)."""
    return Path(path).suffix.lower() in VIDEO_INPUT_SUFFIXES


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (read in 1 MiB chunks: memory stays flat for any size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:32]


class VideoReader:
    """The frames of a video resampled to ``fps``, decoded on demand by one ffmpeg process.

    ``read(i)`` returns frame i (uint8 [H, W, 3]); an index past the end gives the last frame
    (and :attr:`count` becomes known). Reading forward costs only decoding; reading backward,
    or after :meth:`suspend`, starts ffmpeg again from frame 0. Opening reads frame 0, so a file
    ffmpeg cannot read, one without a video stream and one without frames are refused at once
    (MediaError naming the file).

    Attributes:
        path: the file. source_fps: its frame rate as ffmpeg reports it (None if unknown).
        duration: its length in seconds from the header (None if unknown).
        width, height: the decoded (displayed) frame size.
        count: frames at ``fps``; None until the end was reached.
    """

    def __init__(self, path: str | os.PathLike, fps: int = VIDEO_FPS):
        self.path = check_input_file(path, "video")
        self.fps = fps
        try:
            info = probe_media(self.path, count_frames=False)
        except MediaError as err:
            raise MediaError(f"{err} Pass an mp4, mov, mkv, webm or other video file.") from err
        if not info["has_video"]:
            found = "only an audio stream" if info["has_audio"] else "no video stream"
            raise MediaError(
                f"{self.path} holds {found}: a source video needs frames. Pass a video file (or a "
                f"still image as the reference)."
            )
        self.source_fps: float | None = info.get("fps")
        self.duration: float | None = info.get("duration")
        self.count: int | None = None
        self._proc: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 -- ffmpeg's stderr, closed by close()
        self._buffer = bytearray()  # the current frame's RGB bytes
        self._size = (0, 0)  # (W, H) of the current frame
        self._index = -1  # the index of the frame in the buffer (-1: none yet)
        self._finalizer = weakref.finalize(self, _stop, [None], self._log)
        self.read(0)
        self.width, self.height = self._size

    # --- reading -----------------------------------------------------------------------------
    @property
    def estimated_frames(self) -> int | None:
        """Frames at ``fps`` by the header's duration (exact once :attr:`count` is known)."""
        if self.count is not None:
            return self.count
        return None if self.duration is None else max(1, round(self.duration * self.fps))

    def read(self, index: int) -> tuple[int, np.ndarray]:
        """(the index served, frame uint8 [H, W, 3]): frame ``index``, or the last frame when
        the video is shorter (the index served is then ``count - 1``)."""
        if not self._finalizer.alive:
            raise MediaError(f"{self.path}: read() after close()")
        if index < 0:
            raise MediaError(f"{self.path}: frame index {index} is negative")
        if self.count is not None:
            index = min(index, self.count - 1)
        if index < self._index or (index > self._index and self._proc is None):
            self._restart()  # backwards, or after suspend(): decode again from the start
        while self._index < index:
            if not self._next():
                break
        w, h = self._size
        frame = np.frombuffer(self._buffer, dtype=np.uint8).reshape(h, w, 3).copy()
        return self._index, frame

    def frame(self, index: int) -> np.ndarray:
        """Frame ``index`` (uint8 [H, W, 3]); the last frame past the end."""
        return self.read(index)[1]

    def suspend(self) -> None:
        """Stop ffmpeg but keep the current frame (no process waits while nothing is read);
        the next read of another frame starts it again from frame 0."""
        _kill(self._proc)
        self._proc = None

    def close(self) -> None:
        """Stop ffmpeg; the reader cannot read afterwards."""
        self._finalizer()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> str:
        """'in.mp4: 1920x1080 at 29.97 fps, 12.40 s (310 frames at 25 fps)'."""
        fps = f"{self.source_fps:g} fps" if self.source_fps else "unknown fps"
        secs = f"{self.duration:.2f} s" if self.duration is not None else "unknown length"
        frames = self.estimated_frames
        about = "" if self.count is not None else "about "
        count = f" ({about}{frames} frames at {self.fps} fps)" if frames else ""
        return f"{self.path.name}: {self.width}x{self.height} at {fps}, {secs}{count}"

    # --- the ffmpeg pipe ---------------------------------------------------------------------
    def _start(self) -> subprocess.Popen:
        command = _ffmpeg_command(
            ["-i", str(self.path), "-map", "0:v:0", "-vf", f"fps={self.fps}"]
            + ["-f", "image2pipe", "-c:v", "ppm", "-pix_fmt", "rgb24", "-"]
        )
        self._log.seek(0)
        self._log.truncate()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL)
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _stop, [proc], self._log)
        return proc

    def _restart(self) -> None:
        _kill(self._proc)
        self._proc, self._index = None, -1

    def _next(self) -> bool:
        """Decode the next frame into the buffer; False at the end of the video."""
        if self._proc is None:
            self._proc = self._start()
        stream = self._proc.stdout
        header = _read_ppm_header(stream)
        if header is None:  # the end: ffmpeg exits 0, or it failed
            code = self._proc.wait()
            if code != 0:
                raise MediaError(
                    f"ffmpeg could not decode {self.path} (frame {self._index + 1} at {self.fps} fps): "
                    f"{self._ffmpeg_log()}. Re-encode it, e.g. ffmpeg -i in -c:v libx264 out.mp4."
                )
            if self._index < 0:
                raise MediaError(
                    f"{self.path} holds no video frames: ffmpeg decoded none. Pass a video with frames."
                )
            self.count = self._index + 1
            return False
        w, h = header
        if len(self._buffer) != w * h * 3:
            self._buffer = bytearray(w * h * 3)
        view, got = memoryview(self._buffer), 0
        while got < len(view):
            n = stream.readinto(view[got:])
            if not n:
                raise MediaError(f"{self.path}: ffmpeg stopped in the middle of frame {self._index + 1}")
            got += n
        self._size = (w, h)
        self._index += 1
        return True

    def _ffmpeg_log(self) -> str:
        self._log.seek(0)
        return _last_line(self._log.read().decode(errors="replace"))


def _read_ppm_header(stream) -> tuple[int, int] | None:
    """(W, H) from a binary PPM header 'P6 <W> <H> <maxval>' + one whitespace; None at EOF."""
    tokens: list[bytes] = []
    token = b""
    while len(tokens) < 4:
        byte = stream.read(1)
        if not byte:
            if tokens or token:
                raise MediaError("ffmpeg's frame stream ended inside a frame header")
            return None
        if byte.isspace():
            if token:
                tokens.append(token)
                token = b""
        else:
            token += byte
    if tokens[0] != b"P6" or tokens[3] != b"255":
        raise MediaError(f"unexpected frame header from ffmpeg: {b' '.join(tokens)!r}")
    return int(tokens[1]), int(tokens[2])


def _kill(proc: subprocess.Popen | None) -> None:
    if proc is None:
        return
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def _stop(procs: list, log) -> None:
    for proc in procs:
        _kill(proc)
    log.close()
