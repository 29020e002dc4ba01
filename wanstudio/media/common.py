"""What the media modules share: rates, the assets folder, input-file checks, ffmpeg."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from ..errors import MediaError

VIDEO_FPS = 25  # InfiniteTalk's output rate; audio features are computed per video frame
SAMPLE_RATE = 16000  # wav2vec2's input rate
SILENCE_PEAK = 1e-4  # peak amplitude (-80 dBFS) below which a track counts as silent
MAX_IMAGE_PIXELS = 64_000_000  # 48 Mpx photos pass; 100 Mpx took 23 s + 1.1 GiB to decode
ASSETS = Path(__file__).resolve().parents[1] / "assets"

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
