"""Loading Wan2.1 / InfiniteTalk DiT checkpoints from local safetensors and GGUF files.

Accepted: one file; a sharded set (its ``*.index.json``, or the folder holding it); a list of
any of these merged in order (Wan base shards, then InfiniteTalk's ``infinitetalk.safetensors``
on top). Keys may carry ComfyUI's ``model.diffusion_model.`` / ``diffusion_model.`` prefix or
use diffusers' names; both are mapped to the official names. Every check that can fail
(files, headers, key sets, shapes) runs on headers alone *before* any tensor is read, so a
failed load never returns a half-loaded model. Tensors then stream one at a time to their
final dtype and device into a meta-initialised model.

Storage formats, per tensor (a model may mix them): bf16 / fp16 / fp32; fp8 e4m3fn / e5m2,
plain or scaled (``scale_weight`` / ``weight_scale``, kijai's and ComfyUI's files); GGUF
(``gguf_file.py``: F16 / F32 / BF16, Q8_0, Q4_0 / Q4_1 / Q5_0 / Q5_1 and the K-quants); and
optimum-quanto files (InfiniteTalk's ``quant_models``: ``<layer>.weight._data`` int8 or fp8,
``.weight._scale`` per output row, ``.input_scale`` / ``.output_scale``, a JSON map beside).
With ``quantization="disabled"`` each quantizable layer runs in the mode its file gave it
(``storage.storage_mode``); a requested mode converts every layer to it, from the weight the file
means (dequantized, then quantized in that mode).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import WanConfig
from .errors import CheckpointError, ConfigError, LoraError
from .gguf_file import GGUFEntry, GGUFFile, describe_type, is_gguf, read_blocks
from .gguf_file import dequantize as dequantize_gguf
from .layout import assign_layout_names
from .lora import LoraSet, record_merged_loras
from .model.keys import diffusers_to_official
from .modes import RuntimeModes, apply_modes
from .options import AttentionMode, BasePrecision, QuantMode
from .storage import QUANTO_LEAVES, check_quanto, storage_mode, stored_label
from .weights import (
    FP8_DTYPES,
    SafetensorsFile,
    TensorEntry,
    check_stored_dtypes,
    dequantize_fp8,
    read_tensor,
    resolve_files,
    scale_key,
    trim_host_heap,
)

log = logging.getLogger(__name__)

PREFIXES = ("model.diffusion_model.", "diffusion_model.")

_DIFFUSERS_MARKERS = ("condition_embedder.", ".attn1.to_q.", "scale_shift_table", "proj_out.")

# what other components' files look like (for "you passed the wrong file" diagnoses)
_FOREIGN_COMPONENTS = (
    (
        "a VAE",
        (
            "encoder.downsamples.",
            "decoder.upsamples.",
            "encoder.conv1.",
            "encoder.down_blocks.",
            "decoder.up_blocks.",
            "quant_conv.",
            "post_quant_conv.",
        ),
    ),
    (
        "a umT5 text encoder",
        ("token_embedding.weight", "shared.weight", "encoder.block.", ".attn.q.weight", "ffn.gate."),
    ),
    ("a CLIP image encoder", ("visual.transformer.", "vision_model.", "textual.")),
    ("a wav2vec2 audio encoder", ("feature_extractor.conv_layers.", "encoder.layers.0.attention.")),
)
_AUDIO_KEYS = ("audio_proj.", ".audio_cross_attn.", ".norm_x.")
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale", ".scale_input", ".input_scale", ".output_scale")


def official_key(key: str, diffusers_format: bool) -> str:
    """The official name of a file's key (prefix stripped, diffusers / quanto names mapped)."""
    for suffix, leaf in QUANTO_LEAVES:
        if key.endswith(suffix):
            return official_key(key[: -len(suffix)] + ".weight", diffusers_format)[: -len(".weight")] + leaf
    for prefix in PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
            break
    return diffusers_to_official(key) if diffusers_format else key


# --- the merged view of all files ------------------------------------------------------------------
@dataclass
class CheckpointInfo:
    """What was found in the files (shown by the load panel and logged)."""

    files: list[Path]
    formats: list[str]  # per file: 'official' | 'comfy-prefixed' | 'diffusers' | 'gguf' | 'quanto'
    dtypes: dict[str, int] = field(default_factory=dict)  # dtype name -> tensor count
    fp8_weights: int = 0
    scale_keys: list[str] = field(default_factory=list)  # official names of stored scales
    scaled_fp8_marker: bool = False
    tensors: int = 0
    bytes: int = 0
    # weights (2-D+ ``.weight`` tensors) per storage format as stored: a dtype name, an fp8
    # storage mode ('fp8_e5m2_scaled'), 'gguf Q4_K', 'quanto qint8'
    storage: dict[str, int] = field(default_factory=dict)
    scaled_fp8_files: set[Path] = field(default_factory=set)  # files with a 'scaled_fp8' marker

    @property
    def has_fp8(self) -> bool:
        return self.fp8_weights > 0

    def summary(self) -> str:
        """One line: tensors, GiB, files, dtypes, fp8 weights / scales and storage formats."""
        dt = ", ".join(f"{k}: {v}" for k, v in sorted(self.dtypes.items()))
        fp8 = f"; fp8 weights: {self.fp8_weights}, scales: {len(self.scale_keys)}" if self.has_fp8 else ""
        mix = ", ".join(f"{k}: {v}" for k, v in sorted(self.storage.items(), key=lambda kv: -kv[1]))
        return (
            f"{self.tensors} tensors, {self.bytes / 2**30:.2f} GiB in {len(self.files)} file(s) [{dt}]{fp8}"
            f"; weights stored as {mix or 'nothing'}"
        )


def scan_checkpoint(paths) -> tuple[dict[str, TensorEntry], CheckpointInfo]:
    """Headers of every file, keys mapped to official names; later files override earlier ones."""
    files = resolve_files(paths)
    entries: dict[str, TensorEntry] = {}
    info = CheckpointInfo(files=files, formats=[])
    for path in files:
        st = GGUFFile(path) if is_gguf(path) else SafetensorsFile(path)
        keys = st.keys()
        diffusers_format = any(m in k for k in keys for m in _DIFFUSERS_MARKERS)
        prefixed = any(k.startswith(PREFIXES) for k in keys)
        kind = "diffusers" if diffusers_format else "comfy-prefixed" if prefixed else "official"
        if isinstance(st, GGUFFile) or check_quanto(path, st):
            kind = "gguf" if isinstance(st, GGUFFile) else "quanto"
        info.formats.append(kind)
        if any(k.endswith("scaled_fp8") for k in keys):
            info.scaled_fp8_marker = True
            info.scaled_fp8_files.add(path)
        source: dict[str, str] = {}  # official name -> this file's key
        for key, entry in st.entries.items():
            name = official_key(key, diffusers_format)
            if name.endswith("scaled_fp8"):
                continue
            if name in source:  # one would silently replace the other
                raise CheckpointError(
                    f"{path}: keys {source[name]!r} and {key!r} both name the tensor {name!r}; "
                    f"keep one of them (a file merged from two sources?)"
                )
            source[name] = key
            entries[name] = entry
    file_format = dict(zip(files, info.formats))
    for name, entry in entries.items():
        dname = (
            describe_type(entry) if isinstance(entry, GGUFEntry) else str(entry.dtype).replace("torch.", "")
        )
        info.dtypes[dname] = info.dtypes.get(dname, 0) + 1
        info.fp8_weights += entry.dtype in FP8_DTYPES
        if name.endswith(_SCALE_SUFFIXES):
            info.scale_keys.append(name)
        info.bytes += entry.nbytes
    for name, entry in entries.items():
        if name.endswith(".weight") and len(entry.shape) >= 2:
            label = stored_label(entries, name, info.scaled_fp8_files, file_format[entry.path])
            info.storage[label] = info.storage.get(label, 0) + 1
    info.tensors = len(entries)
    return entries, info


# --- what a file is ------------------------------------------------------------------------------
def _group(name: str) -> str:
    """The tensor group a name belongs to: 'blocks.*.self_attn', 'audio_proj', 'head', ..."""
    parts = name.split(".")
    if parts[0] == "blocks" and len(parts) > 3:
        return f"blocks.*.{parts[2]}"
    return parts[0]


def describe_checkpoint(paths) -> str:
    """What checkpoint file(s) hold, from their headers alone (``wanstudio doctor --file``):
    the format of each file, how the weights of each tensor group are stored, the model they
    belong to (the config inferred from the shapes) and the mode each quantizable layer runs
    in with ``quantization="disabled"``. Raises :class:`CheckpointError` for unreadable files."""
    from .config import PRESETS
    from .model import WanModel
    from .quant import QuantMix

    entries, info = scan_checkpoint(paths)
    lines = [f"{path}: {fmt}" for path, fmt in zip(info.files, info.formats)]
    for path in info.files:
        if is_gguf(path):
            meta = GGUFFile(path).metadata
            lines.append(
                "  gguf metadata: "
                + ", ".join(f"{k}={v}" for k, v in meta.items() if k.startswith("general."))
            )
    lines.append(f"{info.tensors} tensors, {info.bytes / 2**30:.2f} GiB")
    groups: dict[str, dict[str, int]] = {}
    file_format = dict(zip(info.files, info.formats))
    for name, entry in entries.items():
        if name.endswith(".weight") and len(entry.shape) >= 2:
            label = stored_label(entries, name, info.scaled_fp8_files, file_format[entry.path])
            counts = groups.setdefault(_group(name), {})
            counts[label] = counts.get(label, 0) + 1
    lines.append("weights stored as:")
    for group, counts in groups.items():
        lines.append(f"  {group}: " + ", ".join(f"{n} {label}" for label, n in counts.items()))
    try:
        cfg = WanConfig.from_state_dict({k: e.shape for k, e in entries.items()})
    except ConfigError as e:
        hint = _diagnose([], sorted(entries), WanConfig(), info).removeprefix("\nDiagnosis: ")
        lines.append(f"model: not a whole DiT ({e}){'; ' + hint if hint else ''}")
        return "\n".join(lines)
    preset = next((name for name, p in PRESETS.items() if p == cfg), None)
    kind = f"{cfg.model_type}{' + InfiniteTalk audio' if cfg.audio else ''}"
    lines.append(
        f"model: {preset or 'no preset'} ({kind}, {cfg.num_layers} blocks, dim {cfg.dim}, ffn {cfg.ffn_dim})"
    )
    modes = _layer_modes(WanModel(cfg, device="meta"), QuantMode.DISABLED, entries, info)
    lines.append(f"quantization='disabled' runs its quantizable layers as: {QuantMix.of(modes)}")
    return "\n".join(lines)


# --- diagnosis -----------------------------------------------------------------------------------------
def _diagnose(missing: list[str], unexpected: list[str], cfg: WanConfig, info: CheckpointInfo) -> str:
    hints = []
    keys = unexpected or missing
    for label, markers in _FOREIGN_COMPONENTS:
        if any(m in k for k in unexpected for m in markers):
            hints.append(
                f"these keys belong to {label}, not the DiT: pass that file to the matching "
                f"encoder / VAE loader instead"
            )
            break
    if missing and all(any(a in k for a in _AUDIO_KEYS) for k in missing):
        hints.append(
            "audio_proj.* / audio_cross_attn.* missing: pass the InfiniteTalk weights "
            "(infinitetalk.safetensors) after the Wan base shards"
        )
    if unexpected and all(any(a in k for a in _AUDIO_KEYS) for k in unexpected):
        hints.append(
            "the files hold InfiniteTalk audio weights but the config has no audio modules: "
            "use the 'infinitetalk-14b' config (or config=None to infer it)"
        )
    if any(m in k for k in keys for m in _DIFFUSERS_MARKERS):
        hints.append("this looks like a diffusers-format file with names wanstudio does not map")
    if (
        missing
        and any(k.startswith("blocks.") for k in missing)
        and not any(k.startswith("blocks.") for k in unexpected)
    ):
        hints.append("block weights are missing: is a shard of a sharded checkpoint left out?")
    return ("\nDiagnosis: " + "; ".join(hints)) if hints else ""


def _examples(keys: Iterable[str], n: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _files_of(names: Iterable[str], entries: dict[str, TensorEntry], info: CheckpointInfo) -> str:
    """The file(s) holding tensors ``names`` (every file when none of them is a tensor's)."""
    paths = sorted({str(entries[n].path) for n in names if n in entries}) or [str(p) for p in info.files]
    return " and ".join(paths[:2]) + (f" (and {len(paths) - 2} more)" if len(paths) > 2 else "")


def check_keys(
    model_shapes: dict[str, tuple[int, ...]],
    entries: dict[str, TensorEntry],
    cfg: WanConfig,
    info: CheckpointInfo,
    allowed_extra: set[str] = frozenset(),
    inferred: bool = False,
) -> None:
    """Raise CheckpointError (naming the files, with counts, examples and a diagnosis) unless
    keys and shapes match; ``inferred``: ``cfg`` came from these files' shapes."""
    file_keys = set(entries) - allowed_extra
    missing = sorted(set(model_shapes) - file_keys)
    unexpected = sorted(file_keys - set(model_shapes))
    if missing or unexpected:
        lines = [
            f"{_files_of(unexpected, entries, info)}: the checkpoint does not match the "
            f"{cfg.model_type}{' + audio' if cfg.audio else ''} model ({cfg.num_layers} layers, "
            f"dim {cfg.dim}){' inferred from it' if inferred else ''}:"
        ]
        if missing:
            lines.append(f"  {len(missing)} missing keys, e.g. {_examples(missing)}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected keys, e.g. {_examples(unexpected)}")
        hint = _diagnose(missing, unexpected, cfg, info)
        fix = "pass config=None to infer the config from the files, or the files that hold these keys"
        if inferred:
            fix = "rename or remove the unexpected keys, or add the files that hold the missing ones"
        raise CheckpointError("\n".join(lines) + (hint or f"\nTo fix: {fix}."))
    bad = [(k, model_shapes[k], entries[k]) for k in model_shapes if model_shapes[k] != entries[k].shape]
    if bad:
        rows = "\n".join(
            f"  {k}: expected {tuple(want)}, found {tuple(e.shape)} (key {e.key!r} in {e.path})"
            for k, want, e in bad[:8]
        )
        fix = "pass config=None to infer the config from the files, or the matching preset"
        if inferred:  # the config came from the file's other shapes
            fix = (
                "the file's tensors disagree with each other: it is corrupt or was edited; download it again"
            )
        raise CheckpointError(
            f"{_files_of([k for k, _, _ in bad], entries, info)}: {len(bad)} tensors have the wrong "
            f"shape for the {'inferred ' if inferred else ''}config:\n{rows}\nTo fix: {fix}."
        )


# --- loading -----------------------------------------------------------------------------------------
def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from a dtype or a base precision name (``"bf16"``)."""
    return BasePrecision.of(dtype).dtype


def assign_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace a (meta) parameter or buffer by ``tensor`` without copying it again."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = tensor
    else:
        raise CheckpointError(f"model has no tensor {name!r}")


def load_model(
    paths,
    *,
    config: WanConfig | str | None = None,
    device: torch.device | str = "cpu",
    modes: RuntimeModes | None = None,
    dtype: torch.dtype | str | None = None,
    quantization: QuantMode | str | None = None,
    attention: AttentionMode | str | None = None,
    blocks_to_swap: int | None = None,
    prefetch: int | None = None,
    strict_layout: bool | None = None,
    compile_blocks: bool | None = None,
    loras=None,
):
    """Build a WanModel from checkpoint files, streaming tensors to ``device`` in their dtype.

    Args:
        paths: a .safetensors or .gguf file, an index json, a folder, or a list of these
            merged in order.
        config: a WanConfig, a preset name, or None to infer it from the tensors' shapes.
        device: where the weights live (swapped blocks: pinned host memory).
        modes: a :class:`~wanstudio.modes.RuntimeModes` (default bf16, no quantization, sdpa).
        dtype, quantization, attention, blocks_to_swap, prefetch, strict_layout, compile_blocks:
            the same choices as keywords (``dtype`` is ``RuntimeModes.precision``,
            ``compile_blocks`` is ``compile``); one given wins over ``modes``.
        loras: LoRA files (:class:`~wanstudio.LoRA`, paths, or ``(path, strength)`` pairs),
            merged into each weight as it streams, before quantization (``RuntimeModes.loras``).

    Layers are quantized tensor by tensor while they stream (LoRAs merged into each weight
    first, in fp32), so the base-precision model never exists; :func:`~wanstudio.modes.apply_modes` then sets attention, block swap, strict layout
    and compilation.

    ``paths`` may mix formats (safetensors, GGUF, quanto; fp8 of either kind per tensor). With
    ``quantization="disabled"`` each quantizable layer runs in its weight's storage mode
    (``storage.storage_mode``); ``model.quantization`` is then one :class:`QuantMode`, or a
    :class:`~wanstudio.quant.QuantMix` when the layers differ. ``model.checkpoint_info`` is the
    :class:`CheckpointInfo` (its ``storage`` counts the weights per stored format).
    """
    from .model import WanModel
    from .quant import QuantMix

    modes = RuntimeModes.merge(
        modes,
        precision=dtype,
        quantization=quantization,
        attention=attention,
        blocks_to_swap=blocks_to_swap,
        prefetch=prefetch,
        strict_layout=strict_layout,
        compile=compile_blocks,
        loras=loras,
    )
    device = torch.device(device)
    modes.check_device(device)  # bad names and unsupported modes fail before any file is read
    dtype = modes.dtype
    entries, info = scan_checkpoint(paths)
    if config is None:
        try:
            cfg = WanConfig.from_state_dict({k: e.shape for k, e in entries.items()})
        except ConfigError as e:
            problem = str(e).removeprefix("cannot infer the config: ")
            named = re.findall(r"[^\s'\",:()\[\]]+", problem)  # the tensors it names
            raise CheckpointError(
                f"{_files_of(named, entries, info)}: cannot infer the model config: {problem}"
                + _diagnose([], sorted(entries), WanConfig(), info)
            ) from None
    else:
        cfg = WanConfig.preset(config) if isinstance(config, str) else config

    model = WanModel(cfg, device="meta", dtype=dtype)
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_keys(model_shapes, entries, cfg, info, allowed_extra=set(info.scale_keys), inferred=config is None)
    check_stored_dtypes([n for n in model_shapes if not isinstance(entries[n], GGUFEntry)], entries)
    layer_modes = _layer_modes(model, modes.quantization, entries, info)
    swap_at_load = modes.blocks_to_swap
    if swap_at_load == "auto":  # every block to the host while loading; apply_modes plans the rest
        swap_at_load = cfg.num_layers if device.type == "cuda" else 0
    placement = _placement(model, device, swap_at_load)
    loras = LoraSet(modes.loras, model_shapes) if modes.loras else None  # checked before reading
    quantized = _swap_in_quantized_layers(model, layer_modes, dtype)
    for name in model_shapes:
        layer, _, leaf = name.rpartition(".")
        if layer in quantized:
            if leaf == "weight":  # the layer's tensors arrive together (bias read alongside)
                _load_quantized(
                    quantized[layer],
                    layer,
                    entries,
                    layer_modes[layer],
                    device,
                    host=placement.get(name) == "cpu_pinned",
                    dtype=dtype,
                    loras=loras,
                )
            continue
        target = torch.device("cpu") if placement.get(name) == "cpu_pinned" else device
        tensor = _real_tensor(entries, name)
        if loras is not None and name in loras:
            tensor = loras.merge(name, tensor, dtype=dtype)
            trim_host_heap()
        assign_tensor(model, name, tensor.to(device=target, dtype=dtype))
    if modes.loras:
        record_merged_loras(model, modes.loras)
    model.checkpoint_info = info
    model.quantization = QuantMix.of(layer_modes)  # a QuantMode, or the mix of a mixed file
    log.info("loaded %s; quantization %s", info.summary(), model.quantization)
    return apply_modes(model, modes, device=device)


def _scale_entry(entries: dict[str, TensorEntry], weight_name: str) -> TensorEntry | None:
    key = scale_key(weight_name, entries)
    return entries[key] if key is not None else None


def _real_tensor(entries: dict[str, TensorEntry], name: str) -> torch.Tensor:
    """A tensor as the checkpoint means it: a quantized weight outside the quantized layers (a
    keep-listed layer stored in fp8, a GGUF block type, quanto int8) is dequantized (fp32)."""
    entry = entries[name]
    if isinstance(entry, GGUFEntry):
        return dequantize_gguf(entry)
    tensor = read_tensor(entry)
    if tensor.dtype not in (*FP8_DTYPES, torch.int8):
        return tensor
    scale_entry = _scale_entry(entries, name)
    if scale_entry is None and tensor.dtype == torch.int8:
        raise CheckpointError(f"{entry.path}: {name}: int8 weight without a scale (quanto .weight._scale)")
    scale = read_tensor(scale_entry) if scale_entry is not None else None
    return dequantize_fp8(name, tensor, scale, source=entry.path)  # stored * scale, any 8-bit type


def _layer_modes(
    model: nn.Module, requested: QuantMode, entries: dict[str, TensorEntry], info: CheckpointInfo
) -> dict[str, QuantMode]:
    """The mode each quantizable layer runs in: ``requested``, or with ``disabled`` the storage
    mode of its own weight (a file may mix them: an e5m2 base with e4m3 audio layers)."""
    from .quant import QuantMix, quantizable_linears

    layers = [name for name, _ in quantizable_linears(model)]
    if requested is not QuantMode.DISABLED:
        stored = {storage_mode(entries, n + ".weight", info.scaled_fp8_files) for n in layers} - {
            QuantMode.DISABLED,
            requested,
        }
        if stored:
            log.info(
                "layers stored as %s are dequantized and quantized again in %s",
                ", ".join(sorted(m.value for m in stored)),
                requested.value,
            )
        return dict.fromkeys(layers, requested)
    out = {name: storage_mode(entries, name + ".weight", info.scaled_fp8_files) for name in layers}
    log.info("storage modes: %s", QuantMix.of(out))
    return out


def _swap_in_quantized_layers(
    model: nn.Module, modes: dict[str, QuantMode], dtype: torch.dtype
) -> dict[str, nn.Module]:
    """Replace the meta Linears that run quantized by empty QuantizedLinears (each in its own
    mode); returns them by name."""
    if all(m is QuantMode.DISABLED for m in modes.values()):
        return {}
    from .quant import QuantizedLinear, swap_linears

    def empty(name: str, linear: nn.Linear) -> nn.Module:
        bias = linear.bias is not None
        return QuantizedLinear.empty(
            linear.in_features, linear.out_features, modes[name], bias=bias, device="meta", dtype=dtype
        )

    layers = swap_linears(
        model, empty, lambda name, _: modes.get(name, QuantMode.DISABLED) is not QuantMode.DISABLED
    )
    assign_layout_names(model)  # the new layers report their own qualified names
    return layers


def _layer_tensors(
    entries: dict[str, TensorEntry], name: str, mode: QuantMode, device: torch.device
) -> dict[str, torch.Tensor]:
    """The tensors ``mode`` stores for weight ``name``, from whatever its file holds: kept as
    stored when the file's format is the mode's (fp8 of the mode's dtype, GGUF Q8_0, quanto int8
    with fp16-exact scales), else the weight the file means quantized in ``mode``."""
    from .quant import q8_0, quantize_weight

    entry = entries[name]
    if isinstance(entry, GGUFEntry):
        raw = read_blocks(entry)
        if entry.ggml_type == "Q8_0":  # split / dequantized on the device: fast there
            raw = raw.to(device)
            n, k = entry.shape
            if mode is QuantMode.GGUF_Q8_0 and k % q8_0.BLOCK == 0:
                q, d = q8_0.from_gguf_blocks(raw, n, k)  # exactly as stored
                return {"weight_q8": q, "weight_scale": d}
        return quantize_weight(dequantize_gguf(entry, raw).to(device), mode)
    scale_entry = _scale_entry(entries, name)
    weight = read_tensor(entry).to(device)
    scale = read_tensor(scale_entry).to(device) if scale_entry is not None else None
    if weight.dtype == torch.int8:  # quanto qint8: data * scale per row
        if scale is None:
            raise CheckpointError("int8 weight without a scale (quanto .weight._scale)")
        exact = q8_0.from_rowwise_int8(weight, scale) if mode is QuantMode.GGUF_Q8_0 else None
        if exact is not None:
            return exact
        weight, scale = dequantize_fp8(name, weight, scale, source=entry.path), None
    return quantize_weight(weight, mode, scale=scale)


def _load_quantized(
    layer,
    name: str,
    entries: dict[str, TensorEntry],
    mode: QuantMode,
    device: torch.device,
    *,
    host: bool,
    dtype: torch.dtype,
    loras: LoraSet | None = None,
) -> None:
    """Quantize one layer's weight on ``device`` (fast there) while streaming, LoRAs merged
    first; park it on the host when block swap will keep it there. Never holds more than this
    layer twice."""
    from .quant import quantize_weight

    try:
        if loras is not None and name + ".weight" in loras:
            # merged in fp32 on the weight as the file means it (an fp8 weight dequantized with
            # its scale), then quantized in ``mode`` like a float checkpoint: rounded once, not twice
            real = _real_tensor(entries, name + ".weight").to(device)
            weight = loras.merge_dequantized(name + ".weight", real)
            trim_host_heap()
            tensors = quantize_weight(weight, mode)
        else:
            tensors = _layer_tensors(entries, name + ".weight", mode, device)
        bias = read_tensor(entries[name + ".bias"]).to(device, dtype) if name + ".bias" in entries else None
        if loras is not None and bias is not None:
            bias = loras.merge(name + ".bias", bias, dtype=dtype)
        if host:
            tensors = {k: v.cpu() for k, v in tensors.items()}
            bias = bias.cpu() if bias is not None else None
        layer.set_quantized(tensors, bias=bias)
    except CheckpointError as e:  # a layer's tensors that do not fit its mode: name the file
        path = entries[name + ".weight"].path
        if isinstance(e, LoraError) or str(path) in str(e):  # a LoRA's error names its own file
            raise
        raise CheckpointError(f"{path}: {name}: {e}") from None


def _placement(model: nn.Module, device: torch.device, blocks_to_swap: int) -> dict[str, str]:
    """Which tensors are read to the host because block swap will pin them there (never the GPU)."""
    if not blocks_to_swap:
        return {}
    from .errors import BlockSwapError
    from .offload import swap_placement

    if device.type != "cuda":
        raise BlockSwapError(
            f"blocks_to_swap={blocks_to_swap} with device {device}: block swap moves blocks between "
            f"host memory and a CUDA GPU, so it is meaningless here; pass device='cuda' or blocks_to_swap=0"
        )
    return swap_placement(model, blocks_to_swap)
