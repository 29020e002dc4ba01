"""Atomic file writes with temp names a later run can recognise and clean up.

A file is written to a hidden temp file beside it, ``.<name>.<pid>.<token>[.<kind>].part``,
then renamed over the target. The writer's process id is in the name, so when a run is killed
(``kill -9``, power loss) the next run can tell its leftovers from the temp files of a run
that is still writing, and delete only the former (:func:`remove_stale_parts`).
"""

from __future__ import annotations

import errno
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

PART_SUFFIX = ".part"
# .<name>.<pid>.<8 hex>[.<kind>].part
_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))  # disk full, quota exceeded
_PART = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}(?:\.[a-z]+)?\.part$")


def part_path(path: str | os.PathLike, kind: str = "") -> Path:
    """The hidden temp name for an atomic write of ``path``, in the same folder (same disk)."""
    path = Path(path)
    tail = f".{kind}" if kind else ""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{tail}{PART_SUFFIX}")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (a zombie counts as running)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OSError:  # a platform without signal 0: assume alive, never delete its files
        return True
    return True


def stale_parts(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Temp files in ``folder`` (for the target ``name``, or any) whose writer is gone."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        m = _PART.match(entry.name)
        if m is None or (name is not None and m["name"] != name):
            continue
        pid = int(m["pid"])
        if pid != os.getpid() and not pid_alive(pid) and entry.is_file():
            found.append(entry)
    return sorted(found)


def remove_stale_parts(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete :func:`stale_parts` of ``folder``; returns what was deleted."""
    removed = []
    for path in stale_parts(folder, name):
        try:
            path.unlink()
        except FileNotFoundError:  # another run cleaned it up first
            continue
        removed.append(path)
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write(f)`` on a temp file beside ``path``, sync it, rename it over ``path``.

    On any error (a full disk included) the temp file is deleted and ``path`` is untouched.
    """
    path = Path(path)
    tmp = part_path(path)
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def disk_full(error: BaseException) -> bool:
    """Whether ``error`` or an error it was raised from / while handling is ENOSPC / EDQUOT.

    torch.save reports a full disk as a RuntimeError ("unexpected pos") raised while
    handling the OSError, so the chain is searched.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _FULL:
            return True
        error = error.__cause__ or error.__context__
    return False
