"""The work folder of a long generation: every finished clip, so a broken run can resume.

Layout of a work folder::

    manifest.json        what the run is (a fingerprint of every input and setting that
                         changes the frames) and how many clips are finished
    clip_0000.pt ...     per finished clip: the frames it adds to the video (uint8
                         [T, H, W, 3]), the motion frames that seed the next clip (fp32
                         [3, m, H, W], after colour correction) and the noise generator's
                         state after the clip
    run.lock             the run using the folder now: pid, host, start time (see RunLock)

Files are written to a temporary name and renamed, and the manifest is updated only after the
clip file is complete, so a kill at any moment leaves a consistent folder; temp files left by a
killed run are deleted by the next one. Resuming restores the generator state and the motion
frames exactly, so the finished video equals an uninterrupted run with the same inputs and seed.
One run at a time holds a folder (RunLock); finished clips are never deleted unless the caller
says ``overwrite=True``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import atomic_write, disk_full, pid_alive, remove_stale_parts
from ..errors import PipelineError
from ..quant import QuantizedLinear

try:  # POSIX; elsewhere the lock relies on the pid check alone
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LOCK = "run.lock"
FORMAT_VERSION = 2  # 2: the fingerprint holds modes, dtypes, device, CPU threads, torch
# RuntimeModes fields that change the frames. The others don't: block swap and prefetch move
# weights, strict layout only checks; the precision is in the fingerprint's dtypes.
NUMERIC_MODES = ("quantization", "attention")
_YOUNG_LOCK_S = 10.0  # an empty lock file younger than this is being written by its creator


def tensor_digest(*tensors: torch.Tensor) -> str:
    """sha256 of tensors' shapes, dtypes and bytes (inputs that define a run)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def environment_fingerprint(pipeline) -> dict:
    """What changes the frames besides a call's arguments, for a run's fingerprint.

    The numeric modes (quantization and attention from ``pipeline.modes``, and whether the
    blocks are compiled; not block swap, which only moves weights), the LoRAs merged into the
    DiT, the text encoder's quantized storage, every part's dtype, the device, torch's CPU
    thread count (CPU reductions add in another order with another count, so the frames
    differ) and the torch version.
    """
    model = pipeline.model
    run_modes = getattr(pipeline, "modes", None)
    modes = {} if run_modes is None else {k: getattr(run_modes, k).value for k in NUMERIC_MODES}
    modes["compiled"] = any(getattr(b, "_wanstudio_compiled", False) for b in getattr(model, "blocks", ()))
    parts = ("model", "vae", "text_encoder", "image_encoder", "audio_encoder")
    out = dict(
        modes=modes,
        dtypes={name: _dtype_name(getattr(pipeline, name, None)) for name in parts},
        device=_device_name(getattr(model, "device", "cpu")),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
    )
    # only when present, so the work folders of runs without them still match
    loras = getattr(run_modes, "loras", ())
    if loras:  # merged into the DiT's weights: file (name and size) and strength
        out["loras"] = [
            f"{lora.path.name} ({_file_size(lora.path)} bytes) x{lora.strength:g}"
            + ("" if lora.use_alpha else " without alpha")
            for lora in loras
        ]
    text = getattr(getattr(pipeline, "text_encoder", None), "model", None)
    stored = sorted({m.mode.value for m in text.modules() if isinstance(m, QuantizedLinear)}) if text else []
    if stored:  # an fp8 umT5 gives other text embeddings
        out["text_encoder_storage"] = stored
    return out


def _file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


@dataclass
class ClipRecord:
    """What a finished clip leaves behind."""

    index: int  # 0-based clip index
    frames: torch.Tensor  # uint8 [T, H, W, 3], the frames this clip adds to the output
    motion: torch.Tensor  # fp32 [3, m, H, W], the colour-corrected frames seeding the next clip
    rng_state: torch.Tensor  # the noise generator's state after this clip
    frames_done: int  # output frames finished after this clip


# --- the lock ---------------------------------------------------------------------------------------
class RunLock:
    """One run's exclusive hold on a work folder: the file ``<folder>/run.lock``.

    The file is created with O_CREAT | O_EXCL and holds the owner's pid, host and start time;
    the owner also keeps an ``flock`` on it while it lives (the kernel drops that however the
    process ends). A lock nobody holds an flock on, left by a pid that no longer runs on this
    host (or by this very process), is stale: the next run takes it over and logs it.
    """

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock; PipelineError naming the holder when a live run has it."""
        for _ in range(8):  # each retry follows a stale lock removed or a lock released meanwhile
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            except OSError as e:
                raise PipelineError(
                    f"cannot create {self.path} ({e.strerror or e}): the work folder must be on a "
                    f"writable disk; pass work_dir= / --work-dir elsewhere"
                ) from e
            try:
                _flock(fd)  # blocks only while another run inspects the new file
                info = dict(pid=os.getpid(), host=socket.gethostname(), started=_now())
                os.write(fd, json.dumps(info).encode())
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                self.path.unlink(missing_ok=True)
                raise
            self._fd = fd
            return self
        raise PipelineError(f"could not take {self.path}: other runs keep creating it; try again")

    def release(self) -> None:
        """Give the folder back (delete the lock file if it is still ours). Idempotent."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if _same_file(fd, self.path):
                self.path.unlink()
        except OSError:  # a vanished folder, a read-only remount: the flock goes with the fd
            pass
        finally:
            os.close(fd)

    def _take_over_if_stale(self) -> None:
        """Delete the lock file when its owner is gone; raise PipelineError when it lives."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:  # released meanwhile
            return
        try:
            if not _try_flock(fd):
                raise self._held_error(_read_lock(fd))
            info = _read_lock(fd)
            why = _stale_reason(info, fd)
            if why is None:
                raise self._held_error(info)
            if _same_file(fd, self.path):  # not already replaced by a run that took it over
                log.warning("work folder %s: taking over a stale lock (%s)", self.path.parent, why)
                self.path.unlink()
        finally:
            os.close(fd)  # drops our flock on the old file

    def _held_error(self, info: dict | None) -> PipelineError:
        if info is None:
            who = "a run that is starting now"
        else:
            here = info.get("host") == socket.gethostname()
            this = " (this process)" if here and info.get("pid") == os.getpid() else ""
            who = f"pid {info.get('pid')}{this} on {info.get('host')}, running since {info.get('started')}"
        return PipelineError(
            f"{self.path.parent} is in use by another run ({who}); two runs in one work folder "
            f"would mix their clips and delete each other's files. Wait for that run to end or "
            f"stop it, or give this run another out= / --out (or work_dir= / --work-dir). If no "
            f"such run is alive, delete {self.path}"
        )


def _flock(fd: int) -> None:
    if fcntl is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as e:  # a file system without flock (some network mounts): the pid check remains
        log.debug("flock unavailable on %s: %s", fd, e)


def _try_flock(fd: int) -> bool:
    """False when a live process holds the file's flock (True when flock cannot tell)."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # no flock here: the pid check decides
        return True
    return True


def _read_lock(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        info = json.loads(os.read(fd, 4096).decode())
    except (ValueError, UnicodeDecodeError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None


def _stale_reason(info: dict | None, fd: int) -> str | None:
    """Why a lock file nobody holds an flock on is stale, or None when it may be live."""
    if info is None:
        age = time.time() - os.fstat(fd).st_mtime
        return f"an unreadable lock file {age:.0f} s old" if age > _YOUNG_LOCK_S else None
    if info.get("host") != socket.gethostname():
        return None  # another host's pid cannot be checked from here
    pid, since = info["pid"], info.get("started")
    if pid == os.getpid():
        return f"left by this process (started {since}) without being released"
    if not pid_alive(pid):
        return f"pid {pid}, started {since}, no longer runs"
    return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


# --- the manifest -----------------------------------------------------------------------------------
def read_manifest(folder: str | os.PathLike) -> dict | None:
    """A work folder's manifest, checked field by field; None when there is none.

    PipelineError names the file and the field when it is unreadable or malformed.
    """
    file = Path(folder) / MANIFEST
    if not file.exists():
        return None
    fix = "pass overwrite=True / --overwrite to start again (its clips are deleted)"
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PipelineError(f"{file} is unreadable ({e}); {fix}") from None

    def bad(field: str, wanted: str) -> PipelineError:
        found = data.get(field, "(missing)") if isinstance(data, dict) else data
        return PipelineError(f"{file}: field {field!r} must be {wanted}, found {found!r}; {fix}")

    if not isinstance(data, dict):
        raise PipelineError(f"{file} must hold a JSON object, found {type(data).__name__}; {fix}")
    if not _is_int(data.get("format")):
        raise bad("format", "an integer")
    if data["format"] != FORMAT_VERSION:
        raise PipelineError(
            f"{file} was written by another wanstudio version (format {data['format']}, this one "
            f"reads {FORMAT_VERSION}), so its run cannot be checked against this call; {fix}"
        )
    if not isinstance(data.get("fingerprint"), dict):
        raise bad("fingerprint", "an object")
    if not _is_int(data.get("clips")) or data["clips"] < 1:
        raise bad("clips", "an integer >= 1")
    if not _is_int(data.get("finished")) or not 0 <= data["finished"] <= data["clips"]:
        raise bad("finished", f"an integer from 0 to clips ({data['clips']})")
    return data


def finished_clips(folder: str | os.PathLike) -> int:
    """How many finished clips a work folder holds (0 when none, or when it cannot tell)."""
    try:
        manifest = read_manifest(folder)
    except PipelineError:
        return len(list(Path(folder).glob("clip_*.pt")))
    if manifest is None:
        return len(list(Path(folder).glob("clip_*.pt"))) if Path(folder).is_dir() else 0
    return manifest["finished"]


def check_work_folder(path: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> None:
    """What WorkFolder would refuse, checked before any heavy work (loading weights).

    PipelineError when ``path`` is a file, when a live run holds it, when its manifest is
    malformed, or when it holds finished clips that this call would delete.
    """
    path = Path(path)
    _check_flags(path, resume, overwrite)
    if not path.exists():
        return
    if not path.is_dir():
        raise PipelineError(f"work folder {path} is a file; pass another work_dir= / --work-dir")
    RunLock(path).acquire().release()
    if not overwrite:
        _refuse_to_delete(path, read_manifest(path), resume)


def _check_flags(path: Path, resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise PipelineError(
            f"resume=True continues the earlier run in {path} and overwrite=True deletes it: pass one of them"
        )


def _refuse_to_delete(path: Path, manifest: dict | None, resume: bool) -> None:
    """Finished clips a call would delete without overwrite=True: PipelineError."""
    if manifest is None:
        stray = len(list(path.glob("clip_*.pt")))
        if stray:
            raise PipelineError(
                f"{path} holds {stray} clip file(s) but no {MANIFEST}, so they cannot be checked "
                f"against this call: pass overwrite=True / --overwrite to start again"
            )
    elif not resume and manifest["finished"]:
        raise PipelineError(
            f"{path} holds {manifest['finished']} finished clip(s) of an earlier run: pass "
            f"resume=True / --resume to continue it, or overwrite=True / --overwrite to start again"
        )


# --- the work folder --------------------------------------------------------------------------------
class WorkFolder:
    """Persistence of finished clips for one run; holds the folder's RunLock until released.

    Args:
        path: the folder (created if missing).
        fingerprint: JSON-able description of everything that changes the frames.
        clips: the number of clips the run will have.
        resume: continue a previous run found in ``path`` (its fingerprint must match).
        overwrite: delete a previous run's clips and start again; without it (and without
            ``resume``) finished clips of a previous run are an error, never deleted.
        temporary: the folder was made for this call only; :meth:`finish` deletes it.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fingerprint: dict,
        clips: int,
        *,
        resume: bool = False,
        overwrite: bool = False,
        temporary: bool = False,
    ):
        self.path = Path(path)
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        self.clips = clips
        self.temporary = temporary
        self.resume_args = "resume=True"  # what the caller must pass to come back here
        self.finished = 0
        self._clip_bytes = 0  # size of a clip file, known after the first save
        _check_flags(self.path, resume, overwrite)
        if self.path.exists() and not self.path.is_dir():
            raise PipelineError(f"work folder {self.path} is a file; pass another work_dir= / --work-dir")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PipelineError(
                f"cannot create the work folder {self.path} ({e.strerror or e}); pass work_dir= / "
                f"--work-dir on a writable disk"
            ) from e
        self.lock = RunLock(self.path).acquire()
        try:
            for part in remove_stale_parts(self.path):
                log.info("work folder %s: deleted %s, left by a killed run", self.path, part.name)
            manifest = None if overwrite else read_manifest(self.path)
            if not overwrite:
                _refuse_to_delete(self.path, manifest, resume)
            if resume and manifest is not None:
                self._check_same_run(manifest)
                self.finished = self._count_readable(manifest["finished"])
                if self.finished:
                    log.info(
                        "resuming from %s: %d of %d clips already finished", self.path, self.finished, clips
                    )
            else:
                if resume:
                    log.info("resume=True but %s holds no previous run: starting from clip 1", self.path)
                self._clear()
            self._write_manifest(self.finished)
        except BaseException:
            self.release()
            raise

    # --- manifest ----------------------------------------------------------------------------------
    def _write_manifest(self, finished: int) -> None:
        data = {
            "format": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "clips": self.clips,
            "finished": finished,
        }
        text = json.dumps(data, indent=1, sort_keys=True).encode()
        try:
            atomic_write(self.path / MANIFEST, lambda f: f.write(text))
        except (OSError, RuntimeError) as e:
            if disk_full(e):
                raise self._disk_full_error() from e
            raise

    def _check_same_run(self, manifest: dict) -> None:
        old, new = _flatten(manifest["fingerprint"]), _flatten(self.fingerprint)
        changed = sorted(k for k in set(old) | set(new) if old.get(k, _ABSENT) != new.get(k, _ABSENT))
        if not changed:
            return
        shown = [f"{k}: {_show(old.get(k, _ABSENT))} -> {_show(new.get(k, _ABSENT))}" for k in changed[:12]]
        more = f"; and {len(changed) - 12} more" if len(changed) > 12 else ""
        raise PipelineError(
            f"cannot resume from {self.path}: it holds a run with other inputs or settings, whose "
            f"clips would not fit this video. Differences (earlier run -> this call): "
            f"{'; '.join(shown)}{more}. Call again with the earlier run's arguments (same inputs, "
            f"modes, device and torch thread count) to continue it, or pass overwrite=True / "
            f"--overwrite to start again (its {manifest['finished']} finished clip(s) are deleted)"
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

    def _disk_full_error(self) -> PipelineError:
        free, left = shutil.disk_usage(self.path).free, self.clips - self.finished
        if self._clip_bytes:
            need = f"need ~{_mb(self._clip_bytes * left)} MB for the remaining {left} clip file(s)"
        else:
            need = f"need room for {MANIFEST} and {left} clip file(s)"
        return PipelineError(
            f"no space left on {self.path}: {need}, {_mb(free)} MB free. The folder is "
            f"consistent: {self.finished} finished clip(s) are saved there; free some space, then "
            f"call again with the same arguments and {self.resume_args} (--resume on the command "
            f"line) to continue from clip {self.finished + 1}"
        )

    # --- clips -------------------------------------------------------------------------------------
    def clip_file(self, index: int) -> Path:
        """Where finished clip ``index`` (0-based) is saved."""
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
        tensors = [v for v in payload.values() if isinstance(v, torch.Tensor)]
        self._clip_bytes = sum(t.numel() * t.element_size() for t in tensors) + 4096  # + zip headers
        try:
            atomic_write(self.clip_file(record.index), lambda f: torch.save(payload, f))
        except (OSError, RuntimeError) as e:  # torch.save: RuntimeError raised while handling ENOSPC
            if disk_full(e):
                raise self._disk_full_error() from e
            raise
        self._write_manifest(record.index + 1)
        self.finished = record.index + 1

    def load(self, index: int) -> ClipRecord:
        """Finished clip ``index`` as saved; a truncated or foreign file is a PipelineError."""
        try:
            data = torch.load(self.clip_file(index), map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file
            raise PipelineError(
                f"work folder {self.path}: cannot read {self.clip_file(index).name} "
                f"({e}); pass overwrite=True / --overwrite to start over"
            ) from None
        return ClipRecord(
            index=data["index"],
            frames=data["frames"],
            motion=data["motion"],
            rng_state=data["rng_state"],
            frames_done=int(data["frames_done"]),
        )

    def release(self) -> None:
        """Let another run use the folder (the files stay). Idempotent."""
        self.lock.release()

    def finish(self) -> None:
        """The video is complete: drop a temporary folder (a user-named one is kept); release."""
        if not self.temporary:
            self.release()
            return
        self._clear()
        self.release()
        with contextlib.suppress(OSError):  # only if empty: a run that took it since keeps its files
            self.path.rmdir()


# --- helpers ----------------------------------------------------------------------------------------
_ABSENT = object()


def _flatten(d: dict, prefix: str = "") -> dict:
    """{'modes': {'attention': 'sdpa'}} -> {'modes.attention': 'sdpa'}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _show(value) -> str:
    if value is _ABSENT:
        return "(absent)"
    text = repr(value)
    return text if len(text) <= 40 else text[:36] + "...'"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f}" if n < 10 * 2**20 else f"{n / 2**20:.0f}"


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def _dtype_name(component) -> str | None:
    """The dtype a part computes in: its ``dtype``, else its (wrapped) module's first parameter's."""
    dtype = getattr(component, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        module = component if isinstance(component, torch.nn.Module) else getattr(component, "model", None)
        param = next(module.parameters(), None) if isinstance(module, torch.nn.Module) else None
        dtype = None if param is None else param.dtype
    return None if dtype is None else str(dtype).replace("torch.", "")


def _device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type
