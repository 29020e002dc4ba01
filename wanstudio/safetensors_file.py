"""A minimal, validating safetensors reader that streams one tensor at a time.

Why not ``safetensors.safe_open``: its mmap keeps every touched page of the file resident, so
reading a whole checkpoint costs RSS equal to the file on top of the model. Reading each tensor
with ``readinto`` into its own buffer keeps peak host memory at one copy of the model plus the
largest tensor, and lets us report truncated / corrupt files precisely.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
if hasattr(torch, "float8_e8m0fnu"):
    DTYPES["F8_E8M0"] = torch.float8_e8m0fnu

_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int
    path: Path


class SafetensorsFile:
    """Header of one .safetensors file; tensors are read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(
                    f"{self.path}: {size} bytes is too short to be a safetensors file (truncated download?)"
                )
            (hlen,) = struct.unpack("<Q", raw)
            if hlen > min(_MAX_HEADER, size - 8):
                raise CheckpointError(
                    f"{self.path}: header length {hlen} does not fit in a {size}-byte file; the file "
                    f"is truncated or not a safetensors file (a .pth/.ckpt renamed?)"
                )
            try:
                header = json.loads(f.read(hlen))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        data_start = 8 + hlen
        self.entries: dict[str, TensorEntry] = {}
        for key, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except KeyError as e:
                raise CheckpointError(
                    f"{self.path}: tensor {key!r} has an unknown dtype or field {e}"
                ) from None
            if data_start + end > size:
                raise CheckpointError(
                    f"{self.path}: tensor {key!r} ends at byte {data_start + end} but the file has "
                    f"{size} bytes: the file is truncated (re-download it)"
                )
            self.entries[key] = TensorEntry(key, dtype, shape, data_start + begin, end - begin, self.path)

    def keys(self) -> list[str]:
        return list(self.entries)


def read_tensor(entry: TensorEntry) -> torch.Tensor:
    """Read one tensor into a fresh CPU buffer (no mmap)."""
    out = torch.empty(entry.shape, dtype=entry.dtype)
    buf = out.view(-1).view(torch.uint8) if out.numel() else out.view(torch.uint8)
    if buf.numel() != entry.nbytes:
        raise CheckpointError(
            f"{entry.path}: tensor {entry.key!r} of shape {entry.shape} {entry.dtype} needs "
            f"{buf.numel()} bytes but the header gives {entry.nbytes}: corrupt header"
        )
    with open(entry.path, "rb") as f:
        f.seek(entry.start)
        got = f.readinto(memoryview(buf.numpy()))
    if got != entry.nbytes:
        raise CheckpointError(f"{entry.path}: short read of {entry.key!r} ({got} of {entry.nbytes} bytes)")
    return out
