"""The work folder of a long generation: every finished clip, so a broken run can resume.

Layout of a work folder::

    manifest.json        what the run is (a fingerprint of every input that changes the
                         frames) and how many clips are finished
    clip_0000.pt ...     per finished clip: the frames it adds to the video (uint8
                         [T, H, W, 3]), the motion frames that seed the next clip (fp32
                         [3, m, H, W], after colour correction) and the noise generator's
                         state after the clip

Files are written to a temporary name and renamed, and the manifest is updated only after the
clip file is complete, so a kill at any moment leaves a consistent folder. Resuming restores
the generator state and the motion frames exactly, so the finished video equals an
uninterrupted run with the same inputs and seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import PipelineError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def tensor_digest(*tensors: torch.Tensor) -> str:
    """sha256 of tensors' shapes, dtypes and bytes (inputs that define a run)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


@dataclass
class ClipRecord:
    """What a finished clip leaves behind."""

    index: int  # 0-based clip index
    frames: torch.Tensor  # uint8 [T, H, W, 3], the frames this clip adds to the output
    motion: torch.Tensor  # fp32 [3, m, H, W], the colour-corrected frames seeding the next clip
    rng_state: torch.Tensor  # the noise generator's state after this clip
    frames_done: int  # output frames finished after this clip


def _atomic_write_bytes(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class WorkFolder:
    """Persistence of finished clips for one run.

    Args:
        path: the folder (created if missing).
        fingerprint: JSON-able description of everything that changes the frames.
        clips: the number of clips the run will have.
        resume: continue a previous run found in ``path`` (its fingerprint must match);
            otherwise any previous run's files in ``path`` are removed first.
        temporary: the folder was made for this call only; :meth:`finish` deletes it.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fingerprint: dict,
        clips: int,
        *,
        resume: bool = False,
        temporary: bool = False,
    ):
        self.path = Path(path)
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))
        self.clips = clips
        self.temporary = temporary
        self.resume_args = "resume=True"  # what the caller must pass to come back here
        self.path.mkdir(parents=True, exist_ok=True)
        self.finished = 0
        manifest = self._read_manifest()
        if resume and manifest is not None:
            self._check_same_run(manifest)
            self.finished = self._count_readable(int(manifest.get("finished", 0)))
            if self.finished:
                log.info("resuming from %s: %d of %d clips already finished", self.path, self.finished, clips)
        else:
            if resume:
                log.info("resume=True but %s holds no previous run: starting from clip 1", self.path)
            self._clear()
        self._write_manifest()

    # --- manifest ----------------------------------------------------------------------------------
    def _read_manifest(self) -> dict | None:
        file = self.path / MANIFEST
        if not file.exists():
            return None
        try:
            return json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PipelineError(
                f"work folder {self.path}: {MANIFEST} is unreadable ({e}); "
                f"delete the folder or pass resume=False to start over"
            ) from None

    def _write_manifest(self) -> None:
        data = {
            "format": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "clips": self.clips,
            "finished": self.finished,
        }
        text = json.dumps(data, indent=1, sort_keys=True).encode()
        _atomic_write_bytes(self.path / MANIFEST, lambda f: f.write(text))

    def _check_same_run(self, manifest: dict) -> None:
        if manifest.get("format") != FORMAT_VERSION:
            raise PipelineError(
                f"work folder {self.path} was written by another wanstudio "
                f"version (format {manifest.get('format')}); pass resume=False"
            )
        old = manifest.get("fingerprint", {})
        changed = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
        if changed:
            detail = "; ".join(f"{k}: {old.get(k)!r} -> {self.fingerprint.get(k)!r}" for k in changed[:6])
            raise PipelineError(
                f"cannot resume from {self.path}: it holds a run with different inputs or settings "
                f"({detail}). Call again with the same arguments, or resume=False to start over"
            )

    def _count_readable(self, finished: int) -> int:
        for i in range(finished):  # a clip file lost after the manifest said it was there
            if not self.clip_file(i).exists():
                log.warning(
                    "work folder %s: %s is missing; resuming from clip %d",
                    self.path,
                    self.clip_file(i).name,
                    i + 1,
                )
                return i
        return finished

    def _clear(self) -> None:
        for file in self.path.glob("clip_*.pt"):
            file.unlink()
        (self.path / MANIFEST).unlink(missing_ok=True)

    # --- clips -------------------------------------------------------------------------------------
    def clip_file(self, index: int) -> Path:
        return self.path / f"clip_{index:04d}.pt"

    def save(self, record: ClipRecord) -> None:
        """Persist a finished clip, then mark it finished in the manifest."""
        if record.index != self.finished:
            raise PipelineError(
                f"clip {record.index + 1} finished out of order (expected clip {self.finished + 1})"
            )
        payload = {
            "index": record.index,
            "frames": record.frames.cpu().contiguous(),
            "motion": record.motion.cpu().float().contiguous(),
            "rng_state": record.rng_state.cpu(),
            "frames_done": record.frames_done,
        }
        _atomic_write_bytes(self.clip_file(record.index), lambda f: torch.save(payload, f))
        self.finished = record.index + 1
        self._write_manifest()

    def load(self, index: int) -> ClipRecord:
        try:
            data = torch.load(self.clip_file(index), map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file
            raise PipelineError(
                f"work folder {self.path}: cannot read {self.clip_file(index).name} "
                f"({e}); pass resume=False to start over"
            ) from None
        return ClipRecord(
            index=data["index"],
            frames=data["frames"],
            motion=data["motion"],
            rng_state=data["rng_state"],
            frames_done=int(data["frames_done"]),
        )

    def finish(self) -> None:
        """The video is complete: drop a temporary folder (a user-named one is kept)."""
        if self.temporary:
            shutil.rmtree(self.path, ignore_errors=True)
