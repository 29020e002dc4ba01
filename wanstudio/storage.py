"""What a checkpoint's weights are stored as, per tensor, and the mode that runs each as stored.

A DiT may arrive in several formats at once (kijai's e5m2-scaled base with an e4m3-scaled
InfiniteTalk file; a GGUF Q4_K_M mixing Q4_K, Q6_K and Q8_0): the loader decides per layer.
This module names each weight's storage (:func:`stored_label`, what ``CheckpointInfo.storage``
counts), picks the mode that runs it as stored (:func:`storage_mode`, what
``quantization="disabled"`` gives each quantizable layer) and recognises optimum-quanto files
(:func:`check_quanto`).

optimum-quanto layout (the official InfiniteTalk repo's ``quant_models``, written by quanto's
``freeze`` + ``safetensors.save_file``, read back by ``requantize`` with the map): a quantized
Linear stores ``<layer>.weight._data`` (int8 for ``qint8``, float8_e4m3fn for ``qfloat8`` /
``qfloat8_e4m3fn``, float8_e5m2 for ``qfloat8_e5m2``, [out, in]), ``<layer>.weight._scale``
([out, 1], in the float dtype the weight had; weight = data * scale), its ``bias``, and
``input_scale`` / ``output_scale`` (scalars, used only with activation quantization). The JSON
map beside the file (same name, ``.json``) maps module names to ``{"weights": qtype,
"activations": qtype or "none"}``. int4 / int2 weights (``qint4`` / ``qint2``: packed data and a
``._shift``) are refused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .errors import CheckpointError
from .gguf_file import GGUFEntry, GGUFFile, describe_type
from .options import QuantMode
from .weights import FP8_DTYPES, TensorEntry, scale_key

log = logging.getLogger(__name__)

# quanto's serialised weight leaves -> the names wanstudio reads them under
QUANTO_LEAVES = ((".weight._data", ".weight"), (".weight._scale", ".weight_scale"))
QUANTO_QTYPES = {
    "qint8": torch.int8,
    "qfloat8": torch.float8_e4m3fn,
    "qfloat8_e4m3fn": torch.float8_e4m3fn,
    "qfloat8_e5m2": torch.float8_e5m2,
}


def storage_mode(entries: dict[str, TensorEntry], name: str, scaled_files: set[Path]) -> QuantMode:
    """The mode that runs weight ``name`` as its file stores it (what ``disabled`` picks for a
    quantizable layer).

    * fp8 -> its fp8 storage mode, ``_scaled`` when the layer has a scale (``scale_weight`` /
      ``weight_scale`` / quanto's ``._scale``) or its file is in ``scaled_files`` (the
      ``scaled_fp8`` marker);
    * GGUF Q8_0 -> ``gguf_q8_0``, kept exactly as stored;
    * quanto qint8 -> ``gguf_q8_0``: int8 with one scale per row is Q8_0 whose blocks share the
      row's scale, kept exactly when the scales are fp16 numbers (they are, for weight scales
      of trained models), else re-quantized per block of 32 (finer scales: ~1 dB below the
      stored weight's SQNR). Same memory as the file (8.5 bits per weight);
    * float weights and the other GGUF types (dequantized once at load) -> ``disabled``.
    """
    from .quant import storage_mode_for

    entry = entries[name]
    if isinstance(entry, GGUFEntry):
        return QuantMode.GGUF_Q8_0 if entry.ggml_type == "Q8_0" else QuantMode.DISABLED
    if entry.dtype in FP8_DTYPES:
        scaled = scale_key(name, entries) is not None or entry.path in scaled_files
        return storage_mode_for(entry.dtype, scaled=scaled)
    return QuantMode.GGUF_Q8_0 if entry.dtype == torch.int8 else QuantMode.DISABLED


def stored_label(entries: dict[str, TensorEntry], name: str, scaled_files: set[Path], fmt: str) -> str:
    """How a weight is stored, in wanstudio's words: ``"bfloat16"``, ``"fp8_e5m2_scaled"`` (an
    fp8 weight: the mode that runs it), ``"gguf Q4_K"``, ``"quanto qint8"``. ``fmt`` is its
    file's format as ``CheckpointInfo.formats`` names it."""
    entry = entries[name]
    if fmt == "gguf":
        return f"gguf {describe_type(entry)}"
    if entry.dtype in FP8_DTYPES:
        mode = storage_mode(entries, name, scaled_files).value
        return f"quanto {mode}" if fmt == "quanto" else mode
    if entry.dtype == torch.int8:
        return "quanto qint8"
    return str(entry.dtype).replace("torch.", "")


def check_quanto(path: Path, st) -> bool:
    """Whether an opened weight file holds optimum-quanto weights. Refuses the quanto layouts
    wanstudio does not read and checks the JSON quantization map beside the file, if any."""
    if isinstance(st, GGUFFile):
        return False
    keys = st.keys()
    if any(k.endswith((".weight._shift", ".weight._group_size")) for k in keys):
        raise CheckpointError(
            f"{path}: optimum-quanto int4 / int2 weights (packed, with a shift) are not supported; "
            f"use the qint8 or fp8 files of the model"
        )
    data = {k[: -len(".weight._data")]: st.entries[k] for k in keys if k.endswith(".weight._data")}
    if not data:
        return False
    for layer, entry in data.items():
        has_scale = layer + ".weight._scale" in st.entries
        if entry.dtype not in (torch.int8, *FP8_DTYPES) or not has_scale:
            raise CheckpointError(
                f"{path}: quanto weight {layer}.weight._data is {entry.dtype}"
                f"{'' if has_scale else ' without its .weight._scale'}; wanstudio reads quanto "
                f"qint8 / qfloat8 weights (int8 or fp8 data + a scale per row)"
            )
    qmap_path = path.with_suffix(".json")
    if not qmap_path.is_file():
        log.info("%s: quanto weights without a quantization map beside them; types read from the data", path)
        return True
    try:
        qmap = json.loads(qmap_path.read_text(encoding="utf-8"))
        items = [(str(m), c["weights"], c.get("activations", "none")) for m, c in qmap.items()]
    except (OSError, ValueError, RecursionError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(
            f"{qmap_path}: not a quanto quantization map ({{module: {{'weights': qtype, ...}}}}): {e}"
        ) from None
    for module, weights, activations in items:
        if weights == "none":
            continue
        if weights not in QUANTO_QTYPES:
            raise CheckpointError(
                f"{qmap_path}: {module} has quanto weights {weights!r}; wanstudio reads "
                f"{', '.join(QUANTO_QTYPES)}"
            )
        entry = data.get(module)
        if entry is not None and entry.dtype != QUANTO_QTYPES[weights]:
            raise CheckpointError(
                f"{path}: {module}.weight._data is {entry.dtype} but {qmap_path.name} says "
                f"{weights!r}: the map belongs to another file"
            )
        if activations != "none":
            log.warning(
                "%s: %s quantizes activations (%s); wanstudio runs weights only", path, module, activations
            )
    return True
