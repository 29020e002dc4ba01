"""Reading GGUF files: the city96-style ``.gguf`` conversions of the Wan DiT (official tensor
names inside), through GGML's own reader, the ``gguf`` package (``gguf.GGUFReader``).

A :class:`GGUFFile` presents a file like ``weights.SafetensorsFile`` does: ``entries`` maps
each tensor's name to a :class:`~wanstudio.weights.TensorEntry` (its place in the file), so
``checkpoints.scan_checkpoint`` merges GGUF and safetensors files alike. Float tensors (F32,
F16, BF16) are plain entries that ``weights.read_tensor`` reads; block-quantized tensors
(Q8_0, Q4_0, K-quants, ...) are :class:`GGUFEntry` objects whose bytes :func:`read_blocks`
reads and :func:`dequantize` turns into floats with ``gguf.quants.dequantize``.

GGUF stores a tensor's dimensions fastest-first (``ne[0]`` is the row length): the torch
shape is the reverse. city96's converter may also flatten a tensor to rows of 256 and record
its real shape in the metadata key ``comfy.gguf.orig_shape.<name>``; the entry's ``shape`` is
then that real shape (``stored_shape`` keeps the rows the blocks run along).

Validation is as strict as for safetensors where GGUF allows it: every read of the header is
bounds-checked (a truncated header is a :class:`CheckpointError`, never an ``IndexError`` or a
hang), every tensor has a supported type, a shape whose rows hold whole blocks, an aligned
offset, and bytes inside the file that no other tensor claims. Errors name the file and the
tensor. Nothing is memory-mapped past the header: tensors are read one at a time into their
own buffers (``weights.read_tensor``), so peak host memory stays at one tensor beyond the model.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError
from .quant import q8_0
from .weights import TensorEntry, read_tensor

MAGIC = b"GGUF"

# GGML types read as plain tensors, and the torch dtype of each.
FLOAT_TYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
}
# Block-quantized GGML types: (weights per block, bytes per block). Q8_0 can be kept as stored
# (``gguf_q8_0``); the others are dequantized once at load (``gguf.quants.dequantize``).
BLOCK_TYPES: dict[str, tuple[int, int]] = {
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q2_K": (256, 84),
    "Q3_K": (256, 110),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}
SUPPORTED_TYPES: tuple[str, ...] = (*FLOAT_TYPES, *BLOCK_TYPES)
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."

# Header reads allowed before a file is called corrupt: a real DiT file needs ~10^4; a corrupt
# array length could otherwise walk a multi-GB file one element at a time.
_MAX_HEADER_READS = 20_000_000


@dataclass(frozen=True)
class GGUFEntry(TensorEntry):
    """A block-quantized GGUF tensor: ``nbytes`` of ``ggml_type`` blocks from ``start``.

    ``dtype`` is ``torch.uint8`` (the stored bytes) and ``shape`` the tensor's torch shape;
    ``stored_shape`` is the shape the blocks run along (the same unless the converter
    flattened the tensor, see the module doc). Read it with :func:`read_blocks` /
    :func:`dequantize`, not ``weights.read_tensor``.
    """

    ggml_type: str = ""
    stored_shape: tuple[int, ...] = ()

    @property
    def block(self) -> tuple[int, int]:
        """(weights per block, bytes per block)."""
        return BLOCK_TYPES[self.ggml_type]


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether the file starts with GGUF's magic bytes (whatever its name)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


@functools.cache
def _gguf():
    try:
        import gguf
    except ImportError as e:  # a declared dependency; only a broken install lacks it
        raise CheckpointError(
            f"reading GGUF files needs the 'gguf' package ({e}); install it: pip install 'gguf>=0.10'"
        ) from None
    return gguf


class _Truncated(Exception):
    def __init__(self, end: int):
        self.end = end


@functools.cache
def _reader_class():
    """``gguf.GGUFReader`` with every header read bounds-checked and counted, and no tensor
    data views (tensors are read one at a time, later)."""
    gguf = _gguf()

    class BoundedReader(gguf.GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            count = int(count)
            end = int(offset) + np.dtype(dtype).itemsize * count
            if end > len(self.data):
                raise _Truncated(end)
            self._reads = getattr(self, "_reads", 0) + 1
            if self._reads > _MAX_HEADER_READS:
                raise ValueError(f"more than {_MAX_HEADER_READS} header reads: a corrupt array length")
            return super()._get(offset, dtype, count, override_order)

        def _build_tensors(self, start_offs, fields):
            # fields: [name_len, name, n_dims, dims (ne[0] first), type, offset]
            self.tensor_infos = [
                (
                    bytes(f.parts[1]).decode("utf-8"),
                    [int(d) for d in f.parts[3]],
                    int(f.parts[4][0]),
                    int(f.parts[5][0]),
                )
                for f in fields
            ]
            self.tensors = []

    return BoundedReader


class GGUFFile:
    """The tensor table of one ``.gguf`` file, validated; tensors are read on demand.

    ``entries`` maps each tensor name to a ``TensorEntry`` (float types) or a
    :class:`GGUFEntry` (block-quantized types), in file order; ``metadata`` holds the file's
    scalar and string key-value pairs (``general.architecture``, ``general.file_type``, ...).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file")
        size = self.path.stat().st_size
        reader = self._read_header(size)
        gguf = _gguf()
        self.version = int(reader.fields["GGUF.version"].parts[0][0])
        self.alignment = int(reader.alignment)
        self.metadata: dict[str, object] = {}
        orig_shapes: dict[str, list[int]] = {}
        for name, field in reader.fields.items():
            if name.startswith("GGUF."):
                continue
            value = _field_value(gguf, field)
            if name.startswith(ORIG_SHAPE_KEY):
                orig_shapes[name[len(ORIG_SHAPE_KEY) :]] = value
            elif not isinstance(value, list):
                self.metadata[name] = value
        data_start = int(reader.data_offset)
        del reader  # closes the header's memory map
        self.entries: dict[str, TensorEntry] = {}
        for name, dims, type_id, offset in self._infos:
            entry = self._entry(gguf, name, dims, type_id, offset, data_start, orig_shapes.get(name))
            if name in self.entries:
                raise self._bad(name, "appears twice in the tensor table")
            self.entries[name] = entry
        self._check_data_area(size)

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return list(self.entries)

    # --- header ---------------------------------------------------------------------------------
    def _read_header(self, size: int):
        if size < 24:
            raise CheckpointError(f"{self.path}: {size} bytes is too short to be a GGUF file (truncated?)")
        if not is_gguf(self.path):
            raise CheckpointError(f"{self.path}: not a GGUF file (its first bytes are not 'GGUF')")
        try:
            reader = _reader_class()(self.path)
        except _Truncated as e:
            raise CheckpointError(
                f"{self.path}: the GGUF header runs to byte {e.end} but the file has {size} bytes: "
                f"the file is truncated or its header is corrupt (download it again)"
            ) from None
        except CheckpointError:
            raise
        except Exception as e:  # the reader raises ValueError, KeyError, UnicodeError, ...
            raise CheckpointError(
                f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e}); the file is "
                f"corrupt or not a GGUF model: download it again"
            ) from None
        if reader.byte_order != "I":
            raise CheckpointError(
                f"{self.path}: a big-endian GGUF file; wanstudio reads little-endian GGUF (the "
                f"files city96 and llama.cpp publish)"
            )
        self._infos = reader.tensor_infos
        return reader

    def _bad(self, name: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: tensor {name!r}: {problem}")

    def _entry(self, gguf, name, dims, type_id, offset, data_start, orig) -> TensorEntry:
        try:
            type_name = gguf.GGMLQuantizationType(type_id).name
        except ValueError:
            type_name = f"unknown type id {type_id}"
        if type_name not in SUPPORTED_TYPES:
            raise self._bad(
                name,
                f"GGML type {type_name} is not supported; wanstudio reads {', '.join(SUPPORTED_TYPES)}. "
                f"Use a file of one of these types (city96's Q8_0 / Q6_K / Q5_K_M / Q4_K_M / Q4_0 / F16)",
            )
        if not dims or any(d < 0 or d >= 2**63 for d in dims):
            raise self._bad(name, f"dimensions {dims} are not a tensor shape")
        stored = tuple(reversed(dims))  # GGUF lists ne[0] (the row length) first
        count = math.prod(stored)
        if type_name in FLOAT_TYPES:
            dtype = FLOAT_TYPES[type_name]
            nbytes = count * dtype.itemsize
        else:
            per_block, block_bytes = BLOCK_TYPES[type_name]
            if stored[-1] % per_block:
                raise self._bad(
                    name, f"rows of {stored[-1]} {type_name} weights are not whole blocks of {per_block}"
                )
            dtype, nbytes = torch.uint8, count // per_block * block_bytes
        shape = stored
        if orig is not None:
            if not all(isinstance(d, int) and d > 0 for d in orig) or math.prod(orig) != count:
                raise self._bad(name, f"{ORIG_SHAPE_KEY}{name} = {orig} does not hold its {count} elements")
            shape = tuple(orig)
        if offset % self.alignment:
            raise self._bad(
                name, f"data offset {offset} is not a multiple of the file's alignment {self.alignment}"
            )
        start = data_start + offset
        if type_name in FLOAT_TYPES:
            return TensorEntry(name, dtype, shape, start, nbytes, self.path)
        return GGUFEntry(name, dtype, shape, start, nbytes, self.path, type_name, stored)

    def _check_data_area(self, size: int) -> None:
        previous = None
        for e in sorted(self.entries.values(), key=lambda e: (e.start, e.nbytes)):
            if e.start + e.nbytes > size:
                raise self._bad(
                    e.key,
                    f"ends at byte {e.start + e.nbytes} but the file has {size} bytes: the file is "
                    f"truncated (download it again)",
                )
            if previous is not None and e.start < previous.start + previous.nbytes:
                raise self._bad(
                    e.key,
                    f"bytes {e.start}..{e.start + e.nbytes} overlap tensor {previous.key!r}: the "
                    f"tensor table is corrupt (download the file again)",
                )
            previous = e


def _field_value(gguf, field):
    """A metadata value: str, int, float, bool, or a list of them."""
    types = field.types
    kind = gguf.GGUFValueType
    if types and types[0] == kind.ARRAY:
        if types[-1] == kind.STRING:
            return [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if types and types[0] == kind.STRING:
        return bytes(field.parts[-1]).decode("utf-8", "replace")
    return field.parts[-1].tolist()[0]


# --- reading ------------------------------------------------------------------------------------------
def read_blocks(entry: GGUFEntry) -> torch.Tensor:
    """The stored blocks of a block-quantized tensor: uint8 [rows, bytes per row], rows along
    ``stored_shape`` (a fresh CPU buffer, no mmap)."""
    raw = read_tensor(
        TensorEntry(entry.key, torch.uint8, (entry.nbytes,), entry.start, entry.nbytes, entry.path)
    )
    rows = math.prod(entry.stored_shape[:-1])
    return raw.view(rows, -1) if rows else raw.view(0, 0)


def dequantize(entry: GGUFEntry, raw: torch.Tensor | None = None) -> torch.Tensor:
    """A block-quantized tensor in fp32, in its torch ``shape`` (``gguf.quants.dequantize``)."""
    raw = read_blocks(entry) if raw is None else raw
    if entry.ggml_type == "Q8_0":  # the same bits as gguf's numpy code, at torch speed
        return q8_0.blocks_to_float(raw).reshape(entry.shape)
    gguf = _gguf()
    try:
        out = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType[entry.ggml_type])
    except (NotImplementedError, ValueError) as e:
        raise CheckpointError(
            f"{entry.path}: tensor {entry.key!r}: cannot dequantize {entry.ggml_type}: {e}"
        ) from None
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(entry.shape)


def describe_type(entry: TensorEntry) -> str:
    """The GGML type of an entry of a GGUF file (``"Q4_K"``, ``"F32"``)."""
    if isinstance(entry, GGUFEntry):
        return entry.ggml_type
    return next((k for k, v in FLOAT_TYPES.items() if v == entry.dtype), str(entry.dtype))
