"""Reading encoder / VAE weight files without running their code, and loading them into a model.

Formats: ``.safetensors`` (one file, or shards listed by an index), ``.pth`` / ``.pt`` / ``.bin``
/ ``.ckpt`` (read with ``torch.load(weights_only=True)``: a pickle carrying code is refused), or a
folder holding either. fp8 / scaled-fp8 tensors are dequantized to the compute dtype here, so the
transformers / diffusers modules only ever see ordinary floating-point weights.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..weights import (
    FP8_DTYPES,
    PICKLE_SUFFIXES,
    SCALE_LEAVES,
    dequantize_fp8,
    load_safetensors,
    resolve_files,
    scale_key,
)
from .convert import find_component, to_hf_layout

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# Side tensors of quantized files that carry no weight: activation scales and format markers.
_MARKER_NAMES = ("scale_input", "input_scale", "comfy_quant", "scaled_fp8")
# Checkpoints sometimes wrap the state dict in one of these keys.
_WRAPPER_KEYS = ("state_dict", "model", "module")

# An architecture for ``from_files(config=...)``: a dict, a transformers / diffusers config
# object, a config.json, or a folder holding one.
ConfigSource = Any


def read_component(path: str | os.PathLike, component: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read ``path``, check it holds ``component``, dequantize / cast to ``dtype``, rename to HF keys.

    Dequantization precedes renaming: scaled-fp8 scales are named after their layer's file key.
    """
    state = read_state_dict(path)
    layout, prefix = find_component(state, component, path)
    return to_hf_layout(to_compute_dtype(state, dtype), layout, prefix)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a weight file or folder, on the CPU, in its stored dtype."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"weights not found: {path} does not exist. Check the path.")
    files = resolve_files(path, pickles=True)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(_read_file(file))
    if not state:
        raise CheckpointError(f"{path} holds no tensors; expected a model's weights.")
    return state


def _read_file(file: Path) -> dict[str, torch.Tensor]:
    suffix = file.suffix.lower()
    if suffix == ".safetensors":
        return load_safetensors(file)  # validated as strictly as the safetensors library
    if suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{file}: unknown weight format {suffix!r}; expected .safetensors or one of "
            f"{', '.join(PICKLE_SUFFIXES)}."
        )
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0]
        raise CheckpointError(
            f"{file} refused: it holds pickled objects beyond plain tensors, and unpickling them "
            f"could run code (torch.load(weights_only=True) says: {reason}). Use the official "
            f"file or a .safetensors copy from a source you trust."
        ) from err
    except (RuntimeError, OSError, EOFError) as err:
        raise CheckpointError(unreadable_checkpoint_message(file, err)) from err
    return _tensors_of(loaded, file)


def unreadable_checkpoint_message(file: str | os.PathLike, err: BaseException) -> str:
    """Why ``torch.load`` could not read ``file``, told from its first bytes.

    A current ``torch.save`` writes a zip archive ("PK\\x03\\x04"); torch before 1.6 (or
    ``_use_new_zipfile_serialization=False``) wrote a bare pickle (protocol 2: 0x80 0x02),
    which cannot be memory-mapped. Anything else is not a PyTorch checkpoint at all.
    """
    try:
        with open(file, "rb") as f:
            head = f.read(4)
    except OSError as read_err:
        return f"{file} cannot be read ({read_err}). Check the path and its permissions."
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # pickle PROTO
        return (
            f"{file} is in the legacy (non-zip) torch.save format (torch < 1.6), which wanstudio "
            f"does not read (it memory-maps checkpoints): re-save it with a current torch "
            f"(torch.save(torch.load(path, weights_only=True), path)) or convert it to safetensors."
        )
    if not head:
        return f"{file} is empty (0 bytes): download it again."
    if head == b"PK\x03\x04":
        return f"{file} is not a readable PyTorch checkpoint ({err}). It may be truncated: download it again."
    return (
        f"{file} is not a PyTorch checkpoint: it starts with bytes {head!r}, neither a torch.save "
        f"zip archive (b'PK\\x03\\x04') nor a legacy pickle (b'\\x80\\x02'). Check that it is "
        f"the right file, or download it again."
    )


def _tensors_of(loaded: Any, file: Path) -> dict[str, torch.Tensor]:
    if isinstance(loaded, Mapping):
        for key in _WRAPPER_KEYS:
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
        tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise CheckpointError(
        f"{file} holds a {type(loaded).__name__} without tensors, not a state dict of weights."
    )


def to_compute_dtype(state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Cast floating tensors to ``dtype``; fp8 weights are first dequantized with their scales.

    A scaled-fp8 layer stores ``<layer>.weight`` in fp8 and ``<layer>.scale_weight`` (or
    ``.weight_scale``): a scalar or one fp32 scale per output row. Scale and marker tensors are
    consumed here and do not reach the model. Integer tensors keep their dtype.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        leaf = key.rsplit(".", 1)[-1]
        if leaf in SCALE_LEAVES or leaf in _MARKER_NAMES:
            continue
        if tensor.dtype in FP8_DTYPES:
            scale = scale_key(key, state)
            tensor = dequantize_fp8(key, tensor, state[scale] if scale is not None else None)
        out[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return out


def read_config(
    config: ConfigSource | None,
    weights: str | os.PathLike,
    shipped: str,
) -> dict[str, Any]:
    """The architecture config to build, as a dict.

    ``config`` wins when given (a mapping, a config object with ``to_dict()``, a config.json or
    a folder holding one); else the ``config.json`` beside the weights when ``weights`` is a
    folder; else the config shipped in ``wanstudio/encoders/configs/<shipped>`` (never fetched).
    """
    if config is None:
        folder_config = Path(weights) / "config.json"
        config = folder_config if folder_config.is_file() else CONFIG_DIR / shipped
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    if isinstance(config, Mapping):
        return dict(config)
    path = Path(config)
    path = path / "config.json" if path.is_dir() else path
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"cannot read the model config {path} ({err}); expected a config.json file."
        ) from err


def load_into(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    device: torch.device | str,
    what: str,
    source: str | os.PathLike,
) -> nn.Module:
    """Put ``state`` into ``model`` (built on the meta device) by assignment; eval, no grad.

    Assignment keeps host memory at one copy of the weights. Keys and shapes are checked
    first, so a file of another model size fails with a list of what differs.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _check_fit(expected, state, what, source)
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{what}: no values for {', '.join(left)} after loading {source}.")
    return model.to(device).eval().requires_grad_(False)


def _check_fit(
    expected: Mapping[str, tuple[int, ...]],
    state: Mapping[str, torch.Tensor],
    what: str,
    source: str | os.PathLike,
) -> None:
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    resized = [
        f"{k}: file {tuple(t.shape)} vs model {expected[k]}"
        for k, t in state.items()
        if k in expected and tuple(t.shape) != expected[k]
    ]
    if not (missing or unexpected or resized):
        return
    parts = [
        f"{len(items)} {label} (e.g. {'; '.join(items[:3])})"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("with other shapes", resized))
        if items
    ]
    raise CheckpointError(
        f"{source} does not fit the {what} architecture: {', '.join(parts)}. If the file is "
        f"another size of this model, pass config= with its config.json."
    )


def empty_model(factory: Callable[[], nn.Module]) -> nn.Module:
    """Build a module on the meta device: shapes only, no memory, no random init."""
    with torch.device("meta"):
        return factory()
