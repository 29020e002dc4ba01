"""Reading weight files: one validating safetensors reader, shard resolution, fp8 dequantization.

Used by the DiT loader (``checkpoints.py``) and the encoder loaders (``encoders/weights.py``),
so both accept the same files, list shards in the same order and dequantize fp8 alike.

Why not ``safetensors.safe_open``: its mmap keeps every touched page of the file resident, so
reading a whole checkpoint costs RSS equal to the file on top of the model. Reading each tensor
with ``readinto`` into its own buffer keeps peak host memory at one copy of the model plus the
largest tensor, and lets us report truncated / corrupt files precisely.

The header is checked at least as strictly as the ``safetensors`` library checks it: every
file it refuses is refused here with a :class:`CheckpointError` naming the file, the key and
the problem, before any tensor is read, in time and memory bounded by the file's size. Stricter
than the library, on purpose (a well-formed file never needs these): a key or field given twice
in one JSON object (the library keeps the last), fields other than dtype / shape / data_offsets
in an entry (the library ignores them), dimensions of 2**63 or more (torch cannot hold them),
and the sub-byte dtypes F4 / F6_* (no torch storage wanstudio can use).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Container, Iterable, Mapping, Sequence
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
for _name, _attr in (
    ("F8_E8M0", "float8_e8m0fnu"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
    ("C64", "complex64"),
):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
# Known to the safetensors format, refused here: sub-byte types pack several values per byte.
_UNSUPPORTED_DTYPES = ("F4", "F6_E2M3", "F6_E3M2")

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# Per-layer scales of scaled-fp8 files: ComfyUI's legacy name and its current one.
SCALE_LEAVES = ("scale_weight", "weight_scale")
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")

_MAX_HEADER = 100_000_000  # the safetensors library's limit
_U64 = 2**64  # offsets and element counts are u64 in the format
_MAX_DIM = 2**63 - 1  # torch sizes are int64
_FIELDS = ("dtype", "shape", "data_offsets")


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a safetensors file (validated against the file's size)."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int
    path: Path


class SafetensorsFile:
    """Header of one .safetensors file, validated; tensors are read on demand.

    ``entries`` maps each key to its :class:`TensorEntry` in header order; ``metadata`` is
    the ``__metadata__`` str -> str map (empty when absent).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file")
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise CheckpointError(
                        f"{self.path}: {size} bytes is too short to be a safetensors file "
                        f"(truncated download?)"
                    )
                (hlen,) = struct.unpack("<Q", raw)
                if hlen > min(_MAX_HEADER, size - 8):
                    where = (
                        f"a {size}-byte file" if hlen > size - 8 else f"the format's {_MAX_HEADER}-byte limit"
                    )
                    raise CheckpointError(
                        f"{self.path}: header length {hlen} does not fit in {where}; it is not a "
                        f"readable safetensors file (truncated, or a .pth/.ckpt renamed?)"
                    )
                text = f.read(hlen)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read the file ({e})") from None
        header = _parse_header(self.path, text)
        self.metadata: dict[str, str] = _check_metadata(self.path, header.pop("__metadata__", None))
        data_start = 8 + hlen
        self.entries: dict[str, TensorEntry] = {}
        for key, info in header.items():
            dtype, shape, begin, end = _check_entry(self.path, key, info)
            self.entries[key] = TensorEntry(key, dtype, shape, data_start + begin, end - begin, self.path)
        _check_data_area(self.path, self.entries, data_start, size)

    def keys(self) -> list[str]:
        """Tensor keys in header order."""
        return list(self.entries)

    def read_all(self) -> dict[str, torch.Tensor]:
        """Every tensor, each in its own CPU buffer (the file is opened once)."""
        try:
            with open(self.path, "rb") as f:
                return {key: read_tensor(entry, f) for key, entry in self.entries.items()}
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read the file ({e})") from None


def read_tensor(entry: TensorEntry, file=None) -> torch.Tensor:
    """Read one tensor into a fresh CPU buffer (no mmap); ``file``: an open handle to reuse."""
    out = torch.empty(entry.shape, dtype=entry.dtype)
    needed = out.numel() * out.element_size()
    if needed != entry.nbytes:  # SafetensorsFile checked it; a hand-made entry may not be
        raise CheckpointError(
            f"{entry.path}: tensor {entry.key!r} of shape {entry.shape} {entry.dtype} needs "
            f"{needed} bytes but the header gives {entry.nbytes}: corrupt header"
        )
    if not needed:
        return out
    buf = out.view(-1).view(torch.uint8)  # (nbytes,) over the tensor's own storage
    try:
        if file is None:
            with open(entry.path, "rb") as f:
                f.seek(entry.start)
                got = f.readinto(memoryview(buf.numpy()))
        else:
            file.seek(entry.start)
            got = file.readinto(memoryview(buf.numpy()))
    except OSError as e:
        raise CheckpointError(f"{entry.path}: cannot read tensor {entry.key!r} ({e})") from None
    if got != entry.nbytes:
        raise CheckpointError(
            f"{entry.path}: short read of {entry.key!r} ({got} of {entry.nbytes} bytes): the file "
            f"changed or was truncated after its header was read"
        )
    return out


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, validated, on the CPU, in its stored dtype."""
    return SafetensorsFile(path).read_all()


# --- the header ---------------------------------------------------------------------------------
def _short(value) -> str:
    """A value of the header for an error message: bounded length, never recursive."""
    if isinstance(value, _Pairs):
        return f"an object of {len(value)} keys"
    if isinstance(value, list):  # one level deep, six items at most
        items = ["[...]" if isinstance(v, list) else repr(v)[:24] for v in value[:6]]
        if len(value) > 6:
            items.append("...")
        return "[" + ", ".join(items) + "]"
    text = repr(value[:60] if isinstance(value, str) else value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Pairs(list):
    """A JSON object as the list of its (key, value) pairs: duplicates stay visible."""


class _NotUInt:
    """A JSON number that is no non-negative integer (the format's only kind of number)."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text[:40]


def _uint(text: str):
    # json gives "-0" as 0 and parses any digit string; the format wants a u64 literal.
    if text.startswith("-") or len(text) > 20:
        return _NotUInt(text)
    return int(text)


def _parse_header(path: Path, raw: bytes) -> dict:
    def corrupt(problem: str) -> CheckpointError:
        return CheckpointError(
            f"{path}: corrupt safetensors header ({problem}); the file is damaged or not a "
            f"safetensors file: download it again"
        )

    try:
        text = raw.decode("utf-8")  # bytes would let json guess UTF-16 / UTF-32
    except UnicodeDecodeError as e:
        raise corrupt(f"not UTF-8 at header byte {e.start}") from None
    try:
        parsed = json.loads(
            text,
            object_pairs_hook=_Pairs,
            parse_int=_uint,
            parse_float=_NotUInt,
            parse_constant=_NotUInt,  # NaN, Infinity: not JSON, but Python's json takes them
        )
    except RecursionError:
        raise corrupt("JSON nested too deeply") from None
    except ValueError as e:
        raise corrupt(str(e)) from None
    if type(parsed) is not _Pairs:
        raise corrupt(f"expected a JSON object, found {_short(parsed)}")
    header: dict = {}
    for key, value in parsed:
        if key in header:
            raise corrupt(f"key {_short(key)} appears twice")
        _check_str(path, key, "key")
        header[key] = value
    return header


def _check_str(path: Path, text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # json takes lone surrogate escapes ("\ud800"); UTF-8 cannot hold them
        raise CheckpointError(
            f"{path}: corrupt safetensors header: {what} {_short(text)} holds a lone UTF-16 surrogate"
        ) from None


def _check_metadata(path: Path, value) -> dict[str, str]:
    if value is None:
        return {}
    if type(value) is not _Pairs:
        raise CheckpointError(
            f"{path}: corrupt safetensors header: '__metadata__' must map strings to strings, "
            f"found {_short(value)}"
        )
    out: dict[str, str] = {}
    for key, text in value:
        if key in out or type(text) is not str:
            problem = "appears twice" if key in out else f"has the non-string value {_short(text)}"
            raise CheckpointError(f"{path}: corrupt safetensors header: '__metadata__' key {key!r} {problem}")
        _check_str(path, key, "'__metadata__' key")
        _check_str(path, text, "'__metadata__' value")
        out[key] = text
    return out


def _check_entry(path: Path, key: str, info) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, or a CheckpointError naming the key."""

    def bad(problem: str) -> CheckpointError:
        return CheckpointError(
            f"{path}: tensor {key!r}: {problem}. The safetensors header is corrupt: download the file again"
        )

    if type(info) is not _Pairs:
        raise bad(f"expected an object with dtype, shape and data_offsets, found {_short(info)}")
    fields: dict = {}
    for name, value in info:
        if name in fields:
            raise bad(f"duplicate field {name!r}")
        if name not in _FIELDS:
            raise bad(f"unexpected field {_short(name)} (an entry holds only {', '.join(_FIELDS)})")
        fields[name] = value
    if missing := [n for n in _FIELDS if n not in fields]:
        raise bad(f"missing field {missing[0]!r}")
    dtype_name, shape, offsets = (fields[n] for n in _FIELDS)
    if type(dtype_name) is not str or dtype_name not in DTYPES:
        if dtype_name in _UNSUPPORTED_DTYPES:
            raise CheckpointError(
                f"{path}: tensor {key!r}: dtype {dtype_name} is not supported by wanstudio "
                f"(sub-byte storage); convert the file to F8 / BF16 / F16 / F32"
            )
        raise bad(f"unknown dtype {_short(dtype_name)} (expected one of {', '.join(DTYPES)})")
    dtype = DTYPES[dtype_name]
    if type(shape) is not list or not all(type(d) is int for d in shape):
        raise bad(f"shape must be a list of non-negative integers, found {_short(shape)}")
    count = 1
    for d in shape:  # in order, as the library multiplies: its overflow is ours
        if d > _MAX_DIM:
            raise bad(f"dimension {d} of shape {_short(shape)} exceeds 2**63 - 1")
        count *= d
        if count >= _U64:
            raise bad(f"shape {_short(shape)} holds more than 2**64 elements")
    nbytes = count * dtype.itemsize
    if type(offsets) is not list or len(offsets) != 2 or not all(type(o) is int for o in offsets):
        raise bad(f"data_offsets must be two non-negative integers [begin, end], found {_short(offsets)}")
    begin, end = offsets
    if end >= _U64:
        raise bad(f"data_offsets {offsets} exceed 2**64 - 1")
    if end < begin:
        raise bad(f"data_offsets {offsets} end before they begin")
    if end - begin != nbytes:
        raise bad(
            f"shape {list(shape)} of {dtype_name} needs {nbytes} bytes but data_offsets {offsets} "
            f"span {end - begin}"
        )
    return dtype, tuple(shape), begin, end


def _check_data_area(path: Path, entries: dict[str, TensorEntry], data_start: int, size: int) -> None:
    """Every byte after the header belongs to exactly one tensor, in offset order from 0."""
    for e in entries.values():
        if e.start + e.nbytes > size:
            raise CheckpointError(
                f"{path}: tensor {e.key!r} ends at byte {e.start + e.nbytes} but the file has "
                f"{size} bytes: the file is truncated (re-download it)"
            )
    pos, previous = data_start, None
    for e in sorted(entries.values(), key=lambda e: (e.start, e.nbytes)):
        if e.start != pos:
            where = (
                f"overlaps tensor {previous.key!r} (data bytes {previous.start - data_start}.."
                f"{previous.start + previous.nbytes - data_start})"
                if e.start < pos
                else f"leaves data bytes {pos - data_start}..{e.start - data_start} unclaimed"
            )
            raise CheckpointError(
                f"{path}: tensor {e.key!r} at data bytes {e.start - data_start}.."
                f"{e.start + e.nbytes - data_start} {where}: every byte after the header must "
                f"belong to exactly one tensor; the header is corrupt or was edited"
            )
        pos, previous = e.start + e.nbytes, e
    if pos != size:
        last = f"after tensor {previous.key!r} " if previous else ""
        raise CheckpointError(
            f"{path}: {size - pos} bytes {last}belong to no tensor (the header's length or offsets "
            f"are off); the file is corrupt: download it again"
        )


# --- which files ---------------------------------------------------------------------------------
def resolve_files(
    paths: str | os.PathLike | Sequence[str | os.PathLike], *, pickles: bool = False
) -> list[Path]:
    """Expand files / ``*.safetensors.index.json`` / folders into the ordered list of weight files.

    A folder means its one index's shards, else its ``*.safetensors`` files (else, with
    ``pickles``, its ``pytorch_model*.bin``). Shards and folder files come sorted by name; a
    list keeps its order (later files override earlier ones). Pickled files (.pth / .pt /
    .bin / .ckpt) are refused unless ``pickles`` (the caller then reads them weights-only).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise CheckpointError(
                f"{p}: no such file or folder (expected a .safetensors file, a "
                f"*.safetensors.index.json, or a folder holding them)"
            )
        if p.is_dir():
            files += _files_of_folder(p, pickles)
        elif p.name.endswith(".json"):
            files += files_of_index(p)
        elif p.suffix.lower() in PICKLE_SUFFIXES and not pickles:
            raise CheckpointError(
                f"{p}: pickled {p.suffix} checkpoints are not loaded for this model (unsafe and "
                f"slow); convert it to .safetensors or use the official safetensors files"
            )
        else:
            files.append(p)
    return files


def _files_of_folder(folder: Path, pickles: bool) -> list[Path]:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(
            f"{folder}: {len(indexes)} shard indexes ({', '.join(i.name for i in indexes)}); "
            f"pass the index of the weights you mean"
        )
    if indexes:
        return files_of_index(indexes[0])
    files = sorted(folder.glob("*.safetensors"))
    if not files and pickles:
        files = sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(
            f"{folder} holds no weight files: expected *.safetensors (optionally with an "
            f"index.json){' or pytorch_model*.bin' if pickles else ''}. Point at the model's "
            f"folder or at one file."
        )
    return files


def files_of_index(index: Path) -> list[Path]:
    """The shards a ``*.index.json`` names (sorted, each once); every one must exist beside it."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
        if not all(type(n) is str for n in names):
            raise TypeError("shard names must be strings")
    except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a safetensors index (no valid 'weight_map': {e})") from None
    if not names:
        raise CheckpointError(f"{index}: the index lists no shards")
    outside = [n for n in names if Path(n).is_absolute() or ".." in Path(n).parts]
    if outside:
        raise CheckpointError(
            f"{index}: shard {outside[0]!r} points outside the index's folder; an index names files beside it"
        )
    missing = [n for n in names if not (index.parent / n).is_file()]
    if missing:
        raise CheckpointError(
            f"{index}: {len(missing)} of {len(names)} shards are missing beside the index, "
            f"e.g. {missing[:3]}; download every shard into {index.parent}"
        )
    return [index.parent / n for n in names]


# --- fp8 -----------------------------------------------------------------------------------------
def scale_key(key: str, keys: Container[str]) -> str | None:
    """The stored scale of fp8 tensor ``key`` (``<layer>.scale_weight`` / ``.weight_scale``), if any."""
    base = key.removesuffix(".weight")
    return next((base + "." + leaf for leaf in SCALE_LEAVES if base + "." + leaf in keys), None)


def dequantize_fp8(
    key: str, weight: torch.Tensor, scale: torch.Tensor | None, *, source: str | os.PathLike | None = None
) -> torch.Tensor:
    """An fp8 weight in fp32, times its stored scale: a scalar or one scale per output row.

    ``source`` (the file) prefixes the error raised for a scale of any other shape."""
    w = weight.float()
    if scale is None:
        return w
    scale = scale.float()
    if scale.numel() == 1:
        return w * scale.reshape(())
    if w.dim() and scale.numel() == w.shape[0]:
        return w * scale.reshape(w.shape[0], *([1] * (w.dim() - 1)))  # (out, 1, ...)
    raise CheckpointError(
        f"{f'{source}: ' if source else ''}{key}: fp8 scale of shape {tuple(scale.shape)} fits neither a per-tensor nor a "
        f"per-row scale of the weight {tuple(w.shape)}; the file is not a scaled-fp8 layout "
        f"wanstudio knows."
    )


def check_stored_dtypes(names: Iterable[str], entries: Mapping[str, TensorEntry]) -> None:
    """Refuse, from headers alone (before any tensor is read), the model tensors whose stored
    dtype no conversion makes right: integer, bool or complex tensors (int8 only with its
    scale, quanto's layout), and 8-bit weights whose scale is neither one value nor one per
    output row. ``entries``: official name -> entry; GGUF block tensors are the caller's to
    leave out. Each error names the file, the key, what was found and what was expected."""
    for name in names:
        e = entries[name]
        eight_bit = e.dtype in FP8_DTYPES or e.dtype == torch.int8
        if e.dtype.is_floating_point and not eight_bit:
            continue
        key = repr(e.key) + ("" if e.key == name else f" (read as {name})")
        kind = str(e.dtype).replace("torch.", "")
        skey = scale_key(name, entries) if eight_bit else None
        if skey is None and e.dtype in FP8_DTYPES:
            continue  # plain fp8: runs as stored
        if skey is None:
            int8 = " without a scale (quanto stores <layer>.weight._scale beside it)" if eight_bit else ""
            raise CheckpointError(
                f"{e.path}: tensor {key} is {kind}{int8}; the model needs a floating-point tensor "
                f"here (F32 / F16 / BF16, F8_E4M3 / F8_E5M2 with or without a scale, or I8 with a "
                f"per-row scale). The file was converted wrongly or is not a Wan DiT: download it again"
            )
        s = entries[skey]
        rows, count = (e.shape[0] if e.shape else 1), 1
        for d in s.shape:
            count *= d
        if count not in (1, rows) or len(s.shape) > 2:
            where = "" if s.path == e.path else f" (the weight is in {e.path})"
            raise CheckpointError(
                f"{s.path}: scale {s.key!r} has shape {list(s.shape)}, but {kind} weight {key} of "
                f"shape {list(e.shape)}{where} needs one value (per tensor) or {rows} (one per output "
                f"row); the scale belongs to another tensor or the file is corrupt: download it again"
            )


def _load_malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL(None).malloc_trim  # glibc; absent on musl, macOS, Windows
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()


def trim_host_heap() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Merging a LoRA makes fp32 temporaries of a few tens of MB per weight; glibc keeps freed
    ones of that size in its heap instead of unmapping them, and a whole-model load then peaks
    at ~1.4-1.7x the model (measured, tests/test_lora_loading.py) instead of ~1x.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
