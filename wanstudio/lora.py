"""LoRA files mapped to the DiT's official names; merged while streaming, or applied to a
loaded model and removed exactly.

Formats read (one validating safetensors reader, headers first; key examples for the layer
``blocks.0.self_attn.q``):

* kijai / lightx2v / ComfyUI / official InfiniteTalk: ``diffusion_model.blocks.0.self_attn.q``
  + ``.lora_down.weight`` / ``.lora_up.weight`` (or ``.lora_A`` / ``.lora_B``), optional
  ``.alpha``; full differences ``.diff`` (of the weight, or of a bare parameter such as
  ``blocks.0.modulation``) and ``.diff_b`` (of the bias); lightx2v's ``blocks.0.diff_m`` is the
  modulation's difference. The prefix may be ``diffusion_model.``, ``model.diffusion_model.``
  or absent.
* diffusers / PEFT: ``transformer.blocks.0.attn1.to_q.lora_A.weight`` (``base_model.model.``
  prefix, ``.default.`` adapter names) mapped with the same table as diffusers checkpoints
  (:mod:`wanstudio.model.keys`).
* kohya / musubi: ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` + ``.alpha``; the
  underscored path is matched against the model's own module names (names such as
  ``cross_attn.k_img`` hold underscores themselves).

A low-rank pair changes ``W [out, in]`` by ``strength * alpha / rank * up @ down`` (``alpha``
read from the file; without one, or with ``use_alpha=False`` as the official InfiniteTalk code
does, the factor is ``strength``); a ``.diff`` adds ``strength * diff``. Every LoRA of a set is
summed in fp32 and the weight is rounded once, to its own dtype.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError, LoraError
from .model.keys import diffusers_to_official
from .weights import SafetensorsFile, TensorEntry, read_tensor

_FLOAT = (torch.float32, torch.bfloat16, torch.float16)
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "pipe.dit.")
_KOHYA = "lora_unet_"
# tensor-name suffix -> what the tensor is (longest suffixes first)
_KINDS = (
    (".lora_down.weight", "down"),
    (".lora.down.weight", "down"),
    (".lora_A.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora.up.weight", "up"),
    (".lora_B.weight", "up"),
    (".alpha", "alpha"),
    (".diff_b", "diff_b"),
    (".diff_m", "diff_m"),
    (".diff", "diff"),
)
# dim -> model, for "this LoRA was made for another model" hints
_MODEL_DIMS = {1536: "Wan2.1 1.3B", 5120: "Wan2.1 / InfiniteTalk 14B", 3072: "Wan2.2 5B"}


@dataclass(frozen=True)
class LoRA:
    """One LoRA file and how strongly to apply it.

    Args:
        path: the ``.safetensors`` file.
        strength: multiplier of the file's change (1 = as trained; 0 = no change; may be < 0).
        use_alpha: scale low-rank pairs by ``alpha / rank`` where the file stores ``alpha``;
            False ignores ``alpha`` (the official InfiniteTalk loader does).
    """

    path: Path
    strength: float = 1.0
    use_alpha: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, os.PathLike)):
            raise LoraError(f"LoRA path must be a file path, got {self.path!r}")
        path = Path(self.path)
        object.__setattr__(self, "path", path)
        if not path.is_file():
            raise LoraError(f"LoRA {path}: no such file (expected a .safetensors LoRA)")
        s = self.strength
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise LoraError(f"LoRA {path.name}: strength must be a finite number, got {s!r}")
        object.__setattr__(self, "strength", float(s))
        if not isinstance(self.use_alpha, bool):
            raise LoraError(f"LoRA {path.name}: use_alpha must be True or False, got {self.use_alpha!r}")

    @classmethod
    def of(cls, value: LoRA | str | os.PathLike | tuple, strength: float | None = None) -> LoRA:
        """A LoRA from a LoRA, a path, or a ``(path, strength)`` pair; ``strength`` overrides."""
        if isinstance(value, LoRA):
            lora = value
        elif isinstance(value, tuple) and len(value) == 2:
            lora = cls(value[0], value[1])
        else:
            lora = cls(value)
        if strength is not None:
            lora = cls(lora.path, strength, lora.use_alpha)
        return lora


@dataclass(frozen=True)
class _Patch:
    """One file's change to one parameter: a low-rank pair or a full difference."""

    scale: float  # strength * alpha / rank, or strength
    down: TensorEntry | None = None  # [rank, in, *kernel]
    up: TensorEntry | None = None  # [out, rank, *1]
    diff: TensorEntry | None = None  # the parameter's shape


@dataclass
class _Parsed:
    fmt: str
    patches: dict[str, _Patch] = field(default_factory=dict)  # parameter name -> patch


def _kind(key: str) -> tuple[str | None, str]:
    key = key.replace(".default.", ".")  # PEFT adapter name
    for suffix, kind in _KINDS:
        if key.endswith(suffix):
            return kind, key[: -len(suffix)]
    return None, key


def _file_format(keys: Sequence[str]) -> str:
    if any(k.startswith(_KOHYA) for k in keys):
        return "kohya / musubi (lora_unet_* underscored names)"
    if any(
        k.startswith(("transformer.", "base_model.model.")) or ".attn1." in k or ".attn2." in k for k in keys
    ):
        return "diffusers / PEFT (transformer.* names)"
    if any(k.startswith(("diffusion_model.", "model.diffusion_model.")) for k in keys):
        return "kijai / lightx2v / ComfyUI (diffusion_model.* names)"
    return "official names without a prefix"


def _examples(keys: Iterable[str], n: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _size_hint(found: int, expected: int) -> str:
    if found in _MODEL_DIMS and found != expected:
        return f" (width {found}: a LoRA for {_MODEL_DIMS[found]}, not for this model of width {expected})"
    return ""


class LoraSet:
    """LoRA files checked against a model's parameter shapes, ready to merge tensor by tensor.

    Args:
        loras: LoRA objects, paths or ``(path, strength)`` pairs, summed in this order.
        shapes: the model's parameter names -> shapes, as a (meta) model's ``state_dict()``
            gives them with plain Linear layers, e.g. ``{"blocks.0.self_attn.q.weight":
            (5120, 5120), ...}``.

    Every check (file headers, key mapping, ranks, shapes, alpha values) runs here, so a bad
    LoRA fails before any weight is read. Nothing is cached but the headers: each merge reads
    that parameter's LoRA tensors from disk, so merging a whole model holds one layer's delta
    at a time.
    """

    def __init__(
        self, loras: Sequence[LoRA | str | os.PathLike | tuple], shapes: Mapping[str, Sequence[int]]
    ):
        if isinstance(loras, (LoRA, str, os.PathLike)):
            loras = [loras]
        self.loras: tuple[LoRA, ...] = tuple(LoRA.of(x) for x in loras)
        self.shapes: dict[str, tuple[int, ...]] = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
        self._bases = self._known_bases()
        self._underscored = self._underscored_bases()
        self.formats: list[str] = []
        self._patches: dict[str, list[_Patch]] = {}
        for lora in self.loras:
            parsed = self._parse(lora)
            self.formats.append(parsed.fmt)
            for name, patch in parsed.patches.items():
                self._patches.setdefault(name, []).append(patch)

    # --- names ----------------------------------------------------------------------------------
    def _known_bases(self) -> set[str]:
        """Module names (``blocks.0.self_attn.q``) and bare parameters (``blocks.0.modulation``)."""
        bases = set(self.shapes)
        for name in self.shapes:
            module, _, leaf = name.rpartition(".")
            if leaf in ("weight", "bias") and module:
                bases.add(module)
        return bases

    def _underscored_bases(self) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for base in self._bases:
            key = base.replace(".", "_")
            out[key] = None if key in out and out[key] != base else base  # None: ambiguous
        return out

    def _official_base(self, base: str) -> str | None:
        """The official module / parameter a LoRA base name means, or None."""
        if base.startswith(_KOHYA):
            return self._underscored.get(base[len(_KOHYA) :].lstrip("_"))
        for prefix in _PREFIXES:
            if base.startswith(prefix):
                base = base[len(prefix) :]
                break
        if base in self._bases:
            return base
        mapped = diffusers_to_official(base + ".weight")  # the table's patterns end in "."
        mapped = mapped[: -len(".weight")] if mapped != base + ".weight" else diffusers_to_official(base)
        return mapped if mapped in self._bases else None

    # --- parsing and validation (headers only) -----------------------------------------------------
    def _parse(self, lora: LoRA) -> _Parsed:
        try:
            st = SafetensorsFile(lora.path)
        except LoraError:
            raise
        except CheckpointError as e:
            raise LoraError(f"LoRA {e}") from None
        keys = st.keys()
        parsed = _Parsed(_file_format(keys))
        where = f"LoRA {lora.path.name} ({parsed.fmt})"
        groups: dict[str, dict[str, TensorEntry]] = {}
        foreign = []
        for key, entry in st.entries.items():
            kind, base = _kind(key)
            if kind is None:
                foreign.append(key)
                continue
            if kind == "diff_m":  # lightx2v: blocks.N.diff_m is blocks.N.modulation's difference
                kind, base = "diff", base + ".modulation"
            slot = groups.setdefault(base, {})
            if kind in slot:
                raise LoraError(
                    f"{where}: layer {base!r} has two {kind} tensors ({slot[kind].key!r} and {key!r}); "
                    f"the file mixes naming schemes for one layer"
                )
            slot[kind] = entry
        if not groups:
            shown = _examples(keys, 3) if keys else "no tensors"
            what = (
                "a model checkpoint" if any(k.endswith((".weight", ".bias")) for k in keys) else "not a LoRA"
            )
            raise LoraError(
                f"LoRA {lora.path}: this is {what}, not a LoRA: none of its {len(keys)} tensors "
                f"({shown}) is a lora_down / lora_up / lora_A / lora_B / alpha / diff tensor. "
                f"Load checkpoints as the model; pass LoRA files here."
            )
        if foreign:
            raise LoraError(
                f"{where}: {len(foreign)} tensors are of kinds wanstudio does not apply "
                f"(only lora_down/lora_up, lora_A/lora_B, alpha, diff, diff_b; DoRA, LoHa, LoKr and "
                f"Tucker factors are not supported): {_examples(foreign)}"
            )
        unmatched = []
        for base, slot in groups.items():
            official = self._official_base(base)
            if official is None:
                unmatched += [e.key for e in slot.values()]
                continue
            for name, patch in self._patches_of(lora, where, base, official, slot):
                if name in parsed.patches:
                    raise LoraError(f"{where}: two key sets change {name!r} (e.g. {base!r})")
                parsed.patches[name] = patch
        if unmatched:
            raise LoraError(
                f"{where}: {len(unmatched)} of {len(keys)} tensors match no layer of this model: "
                f"{_examples(unmatched)}. Is the LoRA for another model family (e.g. Wan2.2, "
                f"VACE modules) or in a naming scheme wanstudio does not map?"
            )
        return parsed

    def _patches_of(self, lora: LoRA, where: str, base: str, official: str, slot: dict[str, TensorEntry]):
        """The (parameter name, patch) pairs one layer's tensors make; every shape checked."""
        weight = official + ".weight" if official + ".weight" in self.shapes else None
        for entry in slot.values():
            if entry.dtype not in _FLOAT + (torch.float64, torch.float8_e4m3fn, torch.float8_e5m2):
                raise LoraError(f"{where}: {entry.key!r} has dtype {entry.dtype}; LoRA tensors are floats")
        if "down" in slot or "up" in slot:
            if "down" not in slot or "up" not in slot:
                have, miss = ("down", "up") if "down" in slot else ("up", "down")
                raise LoraError(
                    f"{where}: layer {official!r} has a lora_{have} tensor ({slot[have].key!r}) but "
                    f"no lora_{miss}: the file is incomplete"
                )
            if weight is None:
                raise LoraError(f"{where}: {base!r} names {official!r}, which has no weight to adapt")
            down, up = slot["down"], slot["up"]
            if len(down.shape) < 2 or len(up.shape) < 2 or down.shape[0] != up.shape[1]:
                raise LoraError(
                    f"{where}: layer {official!r}: lora_down {list(down.shape)} and lora_up "
                    f"{list(up.shape)} disagree on the rank (down is [rank, in], up is [out, rank]); "
                    f"the file is corrupt or mixes two LoRAs"
                )
            rank, w = down.shape[0], self.shapes[weight]
            fits = (
                up.shape[0] == w[0]
                and math.prod(down.shape[1:]) == math.prod(w[1:])
                and math.prod(up.shape[2:]) == 1
                and len(down.shape) in (2, len(w))
            )
            if not fits:
                found = [up.shape[0], *down.shape[1:]]
                raise LoraError(
                    f"{where}: layer {official!r}: the LoRA changes a weight of shape {found} but "
                    f"the model's weight is {list(w)}{_size_hint(down.shape[1], w[1] if len(w) > 1 else 0)}. "
                    f"Use a LoRA made for this model."
                )
            scale = lora.strength
            if "alpha" in slot and lora.use_alpha:
                scale *= self._alpha(where, official, slot["alpha"]) / rank
            yield weight, _Patch(scale, down=down, up=up)
        elif "alpha" in slot:
            raise LoraError(f"{where}: layer {official!r} has an alpha but no lora_down / lora_up pair")
        if "diff" in slot:
            name = weight if weight is not None else official
            self._check_diff(where, name, slot["diff"])
            yield name, _Patch(lora.strength, diff=slot["diff"])
        if "diff_b" in slot:
            name = official + ".bias"
            if name not in self.shapes:
                raise LoraError(f"{where}: {slot['diff_b'].key!r} changes a bias, but {official!r} has none")
            self._check_diff(where, name, slot["diff_b"])
            yield name, _Patch(lora.strength, diff=slot["diff_b"])

    def _check_diff(self, where: str, name: str, entry: TensorEntry) -> None:
        want = self.shapes[name]
        if tuple(entry.shape) != want:
            raise LoraError(
                f"{where}: {entry.key!r} has shape {list(entry.shape)} but the model's {name!r} is "
                f"{list(want)}{_size_hint(entry.shape[-1] if entry.shape else 0, want[-1] if want else 0)}. "
                f"Use a LoRA made for this model."
            )

    @staticmethod
    def _alpha(where: str, layer: str, entry: TensorEntry) -> float:
        if math.prod(entry.shape) != 1:
            raise LoraError(f"{where}: alpha of {layer!r} must be one number, got shape {list(entry.shape)}")
        alpha = float(read_tensor(entry).float().reshape(()))  # a scalar: cheap to read now
        if not math.isfinite(alpha):
            raise LoraError(f"{where}: alpha of {layer!r} is {alpha}")
        return alpha

    # --- merging ------------------------------------------------------------------------------------
    @property
    def targets(self) -> frozenset[str]:
        """Names of the parameters this set changes (``blocks.0.self_attn.q.weight``, ...)."""
        return frozenset(self._patches)

    def __contains__(self, name: str) -> bool:
        return name in self._patches

    def delta(self, name: str, *, device: torch.device | str | None = None) -> torch.Tensor | None:
        """The fp32 change of parameter ``name`` summed over the set (None if it is untouched).

        Reads this parameter's LoRA tensors from disk; computes on ``device`` (default CPU).
        """
        patches = self._patches.get(name)
        if not patches:
            return None
        shape = self.shapes[name]
        total = None
        for p in patches:
            if p.scale == 0:
                continue
            if p.diff is not None:
                d = read_tensor(p.diff).to(device=device, dtype=torch.float32) * p.scale
            else:
                down = read_tensor(p.down).to(device=device, dtype=torch.float32)
                up = read_tensor(p.up).to(device=device, dtype=torch.float32)
                rank = down.shape[0]
                up = up.reshape(up.shape[0], rank) * p.scale  # (out, rank); scaling the small factor
                d = (up @ down.reshape(rank, -1)).reshape(shape)  # (out, in) -> the weight's shape
            total = d if total is None else total.add_(d)
        return total if total is not None else torch.zeros(shape, dtype=torch.float32, device=device)

    def merge(self, name: str, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``tensor`` + the set's change to parameter ``name``, added in fp32 and rounded once to
        ``dtype`` (default: the tensor's). Untouched names return ``tensor`` itself; the input
        is never modified. fp8 / quantized storage: dequantize first (:meth:`merge_dequantized`).
        """
        if name not in self._patches:
            return tensor if dtype is None else tensor.to(dtype)
        if tensor.dtype not in _FLOAT + (torch.float64,):
            raise LoraError(
                f"{name}: cannot merge a LoRA into {tensor.dtype} storage; dequantize the weight "
                f"(real = stored * scale), merge_dequantized(), then quantize the result"
            )
        if tuple(tensor.shape) != self.shapes[name]:
            raise LoraError(
                f"{name}: got a tensor of shape {list(tensor.shape)}, expected {list(self.shapes[name])}"
            )
        out = tensor.float() + self.delta(name, device=tensor.device)
        return out.to(dtype or tensor.dtype)

    def merge_dequantized(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """For layers stored quantized (fp8, scaled fp8, fp4): the caller dequantizes ``weight``
        to a float tensor, this returns the merged weight in fp32, the caller quantizes it."""
        return self.merge(name, weight, dtype=torch.float32)

    def delta_for(
        self, module_name: str, weight_shape: Sequence[int], dtype: torch.dtype
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The changes ``(dW, db)`` of layer ``module_name`` in ``dtype`` (None where untouched)."""
        w, b = module_name + ".weight", module_name + ".bias"
        if w in self._patches and tuple(weight_shape) != self.shapes[w]:
            raise LoraError(
                f"{w}: asked for shape {list(weight_shape)}, the model has {list(self.shapes[w])}"
            )
        dw, db = self.delta(w), self.delta(b)
        return (dw.to(dtype) if dw is not None else None, db.to(dtype) if db is not None else None)

    def merge_into(
        self, module_name: str, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layer ``module_name``'s weight and bias with the set merged (fp32 sum, dtypes kept)."""
        weight = self.merge(module_name + ".weight", weight)
        return weight, (self.merge(module_name + ".bias", bias) if bias is not None else None)


# --- a loaded model -----------------------------------------------------------------------------
@dataclass
class _Applied:
    lora: LoRA
    originals: dict[str, torch.Tensor] | None  # parameter name -> its value before, on the CPU


def _stack(model: nn.Module) -> list[_Applied]:
    return model.__dict__.setdefault("_lora_stack", [])


def applied_loras(model: nn.Module) -> tuple[LoRA, ...]:
    """The LoRAs :func:`apply_lora` merged into ``model``, oldest first."""
    return tuple(a.lora for a in model.__dict__.get("_lora_stack", ()))


def _model_shapes(model: nn.Module) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Parameter shapes with every Linear at its logical [out, in] (quantized layers too), and
    the quantized layers' names -> their mode."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    quantized = {}
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if hasattr(module, "in_features") and not (isinstance(w, torch.Tensor) and w.dtype in _FLOAT):
            shapes[f"{name}.weight"] = (module.out_features, module.in_features)
            quantized[name] = str(getattr(module, "mode", "quantized"))
    return shapes, quantized


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    module, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(module) if module else model, leaf)


def apply_lora(
    model: nn.Module,
    lora: LoRA | str | os.PathLike,
    strength: float | None = None,
    *,
    keep_originals: bool = True,
) -> nn.Module:
    """Merge one LoRA into a loaded bf16 / fp16 / fp32 model, in place; returns the model.

    Args:
        model: a :class:`~wanstudio.WanModel` (block swap may be on: weights are edited in
            place, and swapped blocks are copied from their host master every forward).
        lora: a :class:`LoRA` or a path.
        strength: overrides ``lora.strength``.
        keep_originals: keep the touched parameters' values on the CPU so that
            :func:`remove_lora` restores them bit for bit. Restoring by subtracting the delta is
            not exact (``bf16(W + d) - d != W``), so the originals are the price of exactness:
            as many bytes as the layers the LoRA touches (a full-model LoRA on 14B in bf16:
            ~27 GiB of host memory). False saves that and makes the merge permanent.

    Quantized layers are refused: merge LoRAs while loading, before quantization.
    """
    lora = LoRA.of(lora, strength)
    shapes, quantized = _model_shapes(model)
    lset = LoraSet([lora], shapes)
    hit = sorted({t.rpartition(".")[0] for t in lset.targets} & set(quantized))
    if hit:
        modes = sorted({quantized[n] for n in hit})
        raise LoraError(
            f"LoRA {lora.path.name} changes {len(hit)} quantized layers ({', '.join(modes)}), e.g. "
            f"{_examples(hit, 3)}: merging into quantized weights would round twice. Merge LoRAs "
            f"while loading (before quantization), or apply the LoRA before quantize()."
        )
    for name in sorted(lset.targets):
        t = _tensor(model, name)
        if t.device.type == "meta" or t.dtype not in _FLOAT:
            raise LoraError(
                f"LoRA {lora.path.name}: {name} is {t.dtype} on {t.device}; apply LoRAs to a "
                f"loaded bf16 / fp16 / fp32 model"
            )
    originals: dict[str, torch.Tensor] = {}
    done: list[str] = []
    try:
        with torch.no_grad():
            for name in sorted(lset.targets):
                t = _tensor(model, name)
                if keep_originals:
                    originals[name] = t.detach().to("cpu", copy=True)
                merged = lset.merge(name, t.detach())
                t.copy_(merged)  # in place: block swap's host masters and compiled graphs see it
                done.append(name)
    except BaseException:
        with torch.no_grad():
            for name in done:
                if name in originals:
                    _tensor(model, name).copy_(originals[name])
        raise
    _stack(model).append(_Applied(lora, originals if keep_originals else None))
    return model


def record_merged_loras(model: nn.Module, loras: Sequence[LoRA]) -> None:
    """Note LoRAs the loader merged while streaming: :func:`applied_loras` lists them, and
    :func:`remove_lora` refuses them (the weights without them were never held)."""
    _stack(model).extend(_Applied(lora, None) for lora in loras)


def sync_loras(model: nn.Module, loras: Sequence[LoRA]) -> nn.Module:
    """Make ``model`` carry exactly ``loras`` (in order): remove the applied ones that are not
    wanted (or whose strength changed), apply the missing ones. ``apply_modes`` calls it."""
    wanted = tuple(loras)
    have = applied_loras(model)
    keep = 0
    while keep < min(len(have), len(wanted)) and have[keep] == wanted[keep]:
        keep += 1
    for lora in reversed(have[keep:]):
        remove_lora(model, lora)
    for lora in wanted[keep:]:
        apply_lora(model, lora)
    return model


def remove_lora(model: nn.Module, lora: LoRA | str | os.PathLike) -> nn.Module:
    """Undo :func:`apply_lora` of ``lora`` (matched by path; the latest if applied twice) exactly.

    LoRAs applied after it are taken off and merged again, so the model ends bit for bit as if
    ``lora`` had never been applied.
    """
    path = Path(lora.path if isinstance(lora, LoRA) else lora).resolve()
    stack = _stack(model)
    idx = next((i for i in range(len(stack) - 1, -1, -1) if stack[i].lora.path.resolve() == path), None)
    if idx is None:
        applied = ", ".join(a.lora.path.name for a in stack) or "none"
        raise LoraError(f"LoRA {path.name} is not applied to this model (applied: {applied})")
    undo = stack[idx:]
    if any(a.originals is None for a in undo):
        raise LoraError(
            f"cannot remove LoRA {path.name}: it (or a LoRA applied after it) was merged while "
            f"loading or applied with keep_originals=False, so the weights without it were never "
            f"kept; reload the model without it"
        )
    with torch.no_grad():
        for applied in reversed(undo):
            for name, value in applied.originals.items():
                _tensor(model, name).copy_(value)
    del stack[idx:]
    for applied in undo[1:]:
        apply_lora(model, applied.lora)
    return model
