"""Notebook helpers: everything a studio notebook or panel does beyond one call lives here.

The notebooks stay thin (issue 9): they call these functions, and ``tests/test_widgets.py``
tests them. Four groups:

* **availability** — what each registry mode does on a device (runs, and through which kernel,
  or why not), for the dropdown labels and the load summary;
* **weights** — :class:`WeightPaths` and :func:`find_weights`: real checkpoints named by the
  ``WANSTUDIO_WEIGHTS`` environment variable or a ``wanstudio.toml`` / ``.json`` file;
* **loading and measuring** — :func:`load_pipeline` (tiny preset or real files),
  :func:`summarize` (parameters, bytes per dtype, memory, kernel paths),
  :func:`compare_quant_modes` (memory and SQNR of every quantization mode);
* **layout incidents** — :func:`misalign`, :func:`strict_forward_error`, :func:`hidden_copy_cost`:
  the misaligned-weight incident reproduced, strict mode naming the layer, a hidden copy timed.

Calls into parts of wanstudio that other modules own (quantization, attention, block swap,
the inspector, media) go through one small adapter each (``_part``), so a build that lacks a
part says so plainly.
"""

from __future__ import annotations

import contextlib
import copy
import html
import importlib
import json
import math
import os
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
from torch import nn

from .config import PRESETS, WanConfig
from .errors import ConfigError, LayoutError, UnsupportedModeError, WanstudioError
from .options import AttentionMode, BasePrecision, QuantMode, parse_option

TINY_PRESET = "tiny-infinitetalk"
WEIGHTS_ENV = "WANSTUDIO_WEIGHTS"  # a folder of checkpoints, or a wanstudio.toml / .json file
OUTPUT_ENV = "WANSTUDIO_OUTPUT"  # where notebooks and panels write videos (default ./outputs)
CONFIG_NAMES = ("wanstudio.toml", "wanstudio.json")


def config_search_path() -> list[Path]:
    """Where :func:`find_weights` looks for a config file when the variable is not set."""
    home = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "wanstudio"
    return [Path.cwd() / n for n in CONFIG_NAMES] + [home / n for n in CONFIG_NAMES]


class PartMissingError(WanstudioError, RuntimeError):
    """A part of wanstudio a helper needs is not in this build (or not importable)."""


def _part(module: str, name: str):
    """``wanstudio.<module>.<name>``, or a PartMissingError that says which part is missing."""
    try:
        mod = importlib.import_module(f"wanstudio.{module}")
    except ImportError as e:
        raise PartMissingError(f"wanstudio.{module} is not available in this build ({e})") from None
    fn = getattr(mod, name, None)
    if fn is None:
        raise PartMissingError(f"wanstudio.{module}.{name} is not available in this build")
    return fn


def _has_part(module: str, name: str) -> bool:
    try:
        _part(module, name)
    except PartMissingError:
        return False
    return True


# --- availability -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModeStatus:
    """Whether a mode runs on a device; ``kernel`` says what runs, ``reason`` why it cannot."""

    available: bool
    reason: str = ""
    kernel: str = ""

    def __str__(self) -> str:
        return (self.kernel or "available") if self.available else f"unavailable: {self.reason}"


def attention_availability(device: torch.device | str = "cpu") -> dict[AttentionMode, ModeStatus]:
    """Every AttentionMode on ``device``: the kernel it runs, or the reason it cannot."""
    device = torch.device(device)
    try:
        found = _part("attention", "available_attention_modes")(device)
        items = found.items()
    except PartMissingError:
        try:
            registry = importlib.import_module("wanstudio.attention_backends.registry")
            items = [(m, registry.availability(m, device)) for m in AttentionMode]
        except ImportError:
            items = [
                (
                    m,
                    ModeStatus(
                        m == AttentionMode.SDPA,
                        "" if m == AttentionMode.SDPA else "attention backends are not in this build",
                        "torch SDPA",
                    ),
                )
                for m in AttentionMode
            ]
    out = {}
    for mode, a in items:
        out[parse_option(AttentionMode, mode)] = ModeStatus(
            bool(a.available), str(getattr(a, "reason", "") or ""), str(getattr(a, "kernel", "") or "")
        )
    return {m: out.get(m, ModeStatus(False, "no backend registered")) for m in AttentionMode}


def quant_kernel_path(mode: QuantMode | str, device: torch.device | str = "cpu") -> str:
    """What runs the matmul of a quantization mode on ``device`` (MODES.md, as one line)."""
    mode = parse_option(QuantMode, mode)
    device = torch.device(device)
    try:
        spec = _part("quant.spec", "spec_for")(mode)
        spec_mod = importlib.import_module("wanstudio.quant.spec")
    except (PartMissingError, ImportError):
        return ""
    if spec.storage is None:
        return "F.linear at base precision"
    cuda = device.type == "cuda"
    triton = cuda and _has_triton()
    if spec.matmul == spec_mod.SCALED_MM:
        where = "fp8 tensor cores" if cuda else "torch's CPU implementation"
        quant = "fused Triton" if triton else "eager"
        return f"torch._scaled_mm on {where}; per-token e4m3 activations ({quant} quantize)"
    if spec.matmul == spec_mod.FP4_NATIVE:
        if cuda and spec_mod.fp4_native_available(device):
            return "native FP4 torch._scaled_mm (Blackwell tensor cores)"
        how = "fused Triton dequantize" if triton else "dequantize per layer"
        return f"{how}, then base-precision F.linear ({'no FP4 tensor cores' if cuda else 'emulated'})"
    how = "fused Triton dequantize" if triton and spec.storage != "fp8" else "dequantize"
    return f"{spec.storage.upper()} weights: {how}, then base-precision F.linear"


def _has_triton() -> bool:
    try:
        return bool(importlib.import_module("wanstudio.quant.kernels").HAS_TRITON)
    except ImportError:
        return False


def quant_availability(device: torch.device | str = "cpu") -> dict[QuantMode, ModeStatus]:
    """Every QuantMode on ``device``: its kernel path, or why it cannot run (UnsupportedModeError)."""
    device = torch.device(device)
    try:
        check = _part("quant.spec", "check_device")
    except PartMissingError:
        return {
            m: ModeStatus(
                m == QuantMode.DISABLED,
                "" if m == QuantMode.DISABLED else "quantization is not in this build",
            )
            for m in QuantMode
        }
    out = {}
    for mode in QuantMode:
        try:
            check(mode, device)
        except UnsupportedModeError as e:
            out[mode] = ModeStatus(False, _first_sentence(str(e)))
            continue
        out[mode] = ModeStatus(True, "", quant_kernel_path(mode, device))
    return out


def _first_sentence(text: str) -> str:
    """'quantization 'x' needs ... ; cuda:0 is a ... . Modes that work: ...' -> the requirement."""
    text = text.split(". ")[0]
    return text.split(" needs ", 1)[1] if " needs " in text else text


def precision_availability(device: torch.device | str = "cpu") -> dict[BasePrecision, ModeStatus]:
    device = torch.device(device)
    out = {}
    for p in BasePrecision:
        if p == BasePrecision.FP16_FAST and device.type != "cuda":
            out[p] = ModeStatus(False, "needs a CUDA GPU (fp16 accumulation)")
        elif p == BasePrecision.BF16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            out[p] = ModeStatus(False, "needs an Ampere or newer GPU")
        else:
            out[p] = ModeStatus(True, "", f"torch {_dtype_name(dtype_of(p))}")
    return out


def swap_availability(device: torch.device | str = "cpu") -> ModeStatus:
    """Block swap streams blocks from pinned host memory to a GPU: meaningless on the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return ModeStatus(False, "needs a CUDA GPU (on the CPU every block is already in host memory)")
    return ModeStatus(True, "", "pinned host copies, side-stream prefetch")


def default_precision(device: torch.device | str) -> BasePrecision:
    """fp32 on the CPU (the tiny preset's dtype), bf16 on a GPU (what the real weights are)."""
    return BasePrecision.BF16 if torch.device(device).type == "cuda" else BasePrecision.FP32


def default_device() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def dtype_of(precision: BasePrecision | str) -> torch.dtype:
    precision = parse_option(BasePrecision, precision)
    return {
        BasePrecision.FP32: torch.float32,
        BasePrecision.BF16: torch.bfloat16,
        BasePrecision.FP16: torch.float16,
        BasePrecision.FP16_FAST: torch.float16,
    }[precision]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# --- real weights -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightPaths:
    """The files of a real InfiniteTalk set-up (``InfiniteTalkPipeline.from_files`` arguments).

    Args:
        dit: Wan2.1-I2V-14B DiT: the shards' ``*.safetensors.index.json``, their folder, or one
            file (several entries are merged in order).
        vae: ``Wan2.1_VAE.pth`` (or a bf16 safetensors). text_encoder: umT5-XXL
            (``models_t5_umt5-xxl-enc-bf16.pth`` or an HF folder); tokenizer: its tokenizer folder.
        clip: CLIP ViT-H/14 (``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``).
        wav2vec: the ``chinese-wav2vec2-base`` folder.
        infinitetalk: ``single/infinitetalk.safetensors`` (None when ``dit`` already holds it).
        source: where these paths came from (shown to the user).
    """

    dit: tuple[str, ...]
    vae: str
    text_encoder: str
    clip: str
    wav2vec: str
    infinitetalk: str | None = None
    tokenizer: str | None = None
    source: str = ""

    REQUIRED = ("dit", "vae", "text_encoder", "clip", "wav2vec")
    OPTIONAL = ("infinitetalk", "tokenizer")

    def __post_init__(self) -> None:
        dit = (self.dit,) if isinstance(self.dit, (str, os.PathLike)) else tuple(self.dit)
        object.__setattr__(self, "dit", tuple(str(p) for p in dit))
        for name in ("vae", "text_encoder", "clip", "wav2vec", "infinitetalk", "tokenizer"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, str(value))
        empty = [n for n in self.REQUIRED if not getattr(self, n)]
        if empty:
            raise ConfigError(f"weights{_from(self.source)}: no path for {', '.join(empty)}")

    @classmethod
    def from_mapping(
        cls, data: Mapping, base: str | os.PathLike | None = None, source: str = ""
    ) -> WeightPaths:
        """From a config's ``[weights]`` table; relative paths are relative to ``base``."""
        data = dict(data.get("weights", data))
        known = {f.name for f in fields(cls)} - {"source"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"weights{_from(source)}: unknown entries {unknown}; known: {', '.join(sorted(known))}"
            )

        def resolve(p):
            p = Path(os.path.expandvars(os.path.expanduser(str(p))))
            return str(p if p.is_absolute() or base is None else Path(base) / p)

        kw = {}
        for k, v in data.items():
            if v in (None, ""):
                continue
            kw[k] = tuple(resolve(x) for x in v) if k == "dit" and not isinstance(v, str) else resolve(v)
        missing = [n for n in cls.REQUIRED if n not in kw]
        if missing:
            raise ConfigError(f"weights{_from(source)}: no path for {', '.join(missing)}")
        return cls(**kw, source=source)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> WeightPaths:
        """A ``.toml`` or ``.json`` file with a ``weights`` table (see docs/README_studio.md)."""
        path = Path(path)
        text = path.read_text()
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            try:
                import tomllib
            except ImportError:  # Python 3.10
                raise ConfigError(f"{path}: reading TOML needs Python >= 3.11; use a .json file") from None
            data = tomllib.loads(text)
        return cls.from_mapping(data, base=path.parent, source=str(path))

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> WeightPaths:
        """Find the files in a download folder (the layouts of the official repositories)."""
        folder = Path(folder)
        for name in CONFIG_NAMES:
            if (folder / name).is_file():
                return cls.from_file(folder / name)
        found, missing = {}, []
        for part, patterns in _WEIGHT_PATTERNS.items():
            hit = _search(folder, patterns)
            if hit is not None:
                found[part] = str(hit)
            elif part in cls.REQUIRED:
                missing.append(f"{part} ({patterns[0]})")
        if missing:
            raise ConfigError(
                f"{folder}: cannot find {', '.join(missing)}. Put a wanstudio.toml in the folder "
                f"naming each file (docs/README_studio.md shows one)"
            )
        found["dit"] = (found["dit"],)
        return cls(**found, source=str(folder))

    def missing(self) -> list[str]:
        """'<part>: <path>' for every named path that does not exist."""
        out = [f"dit: {p}" for p in self.dit if not Path(p).exists()]
        for name in ("vae", "text_encoder", "clip", "wav2vec", "infinitetalk", "tokenizer"):
            value = getattr(self, name)
            if value is not None and not Path(value).exists():
                out.append(f"{name}: {value}")
        return out

    def as_kwargs(self) -> dict:
        """Keyword arguments of ``InfiniteTalkPipeline.from_files``."""
        return dict(
            dit=list(self.dit),
            infinitetalk=self.infinitetalk,
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            clip=self.clip,
            wav2vec=self.wav2vec,
        )


def _from(source: str) -> str:
    return f" from {source}" if source else ""


# file patterns per component, most specific first (official repo layouts, then ComfyUI names)
_WEIGHT_PATTERNS: dict[str, tuple[str, ...]] = {
    "dit": (
        "diffusion_pytorch_model.safetensors.index.json",
        "*wan2.1*i2v*14b*.safetensors",
        "*wan2_1*i2v*14b*.safetensors",
    ),
    "infinitetalk": (
        "single/infinitetalk.safetensors",
        "infinitetalk.safetensors",
        "*infinitetalk*.safetensors",
    ),
    "vae": ("Wan2.1_VAE.pth", "*wan*2.1*vae*.safetensors", "*wan*vae*.safetensors"),
    "text_encoder": ("models_t5_umt5-xxl-enc-bf16.pth", "*umt5*xxl*.safetensors", "*umt5*xxl*.pth"),
    "tokenizer": ("google/umt5-xxl/",),
    "clip": (
        "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
        "*clip*vit*huge*.pth",
        "*clip*vision*h*.safetensors",
    ),
    "wav2vec": ("chinese-wav2vec2-base/",),
}


def _search(folder: Path, patterns: Iterable[str], depth: int = 4) -> Path | None:
    """First match of any pattern under ``folder`` (patterns ending in '/' match folders)."""
    for pattern in patterns:
        want_dir = pattern.endswith("/")
        pattern = pattern.rstrip("/")
        for level in range(depth + 1):
            glob = "/".join(["*"] * level + [pattern])
            hits = sorted(p for p in folder.glob(glob) if p.is_dir() == want_dir)
            if not hits and not want_dir:  # case-insensitive retry (ComfyUI names vary in case)
                low = pattern.lower()
                hits = sorted(
                    p
                    for p in folder.glob("/".join(["*"] * level + ["*"]))
                    if p.is_file() and _fnmatch(p, low)
                )
            if hits:
                return hits[0]
    return None


def _fnmatch(path: Path, pattern_lower: str) -> bool:
    import fnmatch

    tail = "/".join(path.parts[-(pattern_lower.count("/") + 1) :]).lower()
    return fnmatch.fnmatch(tail, pattern_lower)


def find_weights(
    environ: Mapping[str, str] | None = None, search: Iterable[str | os.PathLike] | None = None
) -> WeightPaths | None:
    """The real weights the user pointed at, or None (then the notebooks use the tiny preset).

    Looks at ``$WANSTUDIO_WEIGHTS`` (a folder of checkpoints or a config file), then at
    ``wanstudio.toml`` / ``wanstudio.json`` in the working folder and in
    ``~/.config/wanstudio/``. A path that is named but wrong raises ConfigError (never a
    silent fall back to random weights).
    """
    environ = os.environ if environ is None else environ
    named = environ.get(WEIGHTS_ENV, "").strip()
    if named:
        path = Path(os.path.expanduser(named))
        if path.is_dir():
            return WeightPaths.from_folder(path)
        if path.is_file():
            return WeightPaths.from_file(path)
        raise ConfigError(f"${WEIGHTS_ENV} is {named!r}, which is neither a folder nor a file")
    for candidate in config_search_path() if search is None else search:
        candidate = Path(candidate)
        if candidate.is_file():
            return WeightPaths.from_file(candidate)
    return None


def describe_weights(weights: WeightPaths | None) -> str:
    """One paragraph for the notebook: what will be loaded and from where."""
    if weights is None:
        return (
            f"No real weights configured: using the {TINY_PRESET!r} preset (random weights, "
            f"the video is noise). Set ${WEIGHTS_ENV} or write a wanstudio.toml to use real ones."
        )
    lines = [f"Real weights from {weights.source or 'the given paths'}:"]
    for name in ("dit", "infinitetalk", "vae", "text_encoder", "tokenizer", "clip", "wav2vec"):
        value = getattr(weights, name)
        if value:
            lines.append(f"  {name}: {', '.join(value) if isinstance(value, tuple) else value}")
    missing = weights.missing()
    if missing:
        lines.append("  MISSING: " + "; ".join(missing))
    return "\n".join(lines)


# --- example inputs -------------------------------------------------------------------------------
def example_inputs(
    cfg: WanConfig,
    *,
    frames: int = 2,
    height: int = 4,
    width: int = 4,
    text_tokens: int = 8,
    speakers: int = 1,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Small seeded keyword inputs for ``WanModel.forward`` (latent frames x height x width).

    Used by the inspector, the quantization report and the comparison: a few tokens exercise
    every layer and kernel of any config, the 14B ones included.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    inputs = dict(
        x=randn(1, cfg.out_dim, frames, height, width),
        t=torch.tensor([500.0], device=device),
        context=randn(1, text_tokens, cfg.text_dim),
    )
    if cfg.is_i2v:
        inputs["y"] = randn(1, cfg.cond_dim, frames, height, width)
        inputs["clip_fea"] = randn(1, 5, cfg.clip_dim)
    if cfg.audio:
        f_video = cfg.vae_scale * (frames - 1) + 1
        inputs["audio"] = randn(1, speakers, f_video, cfg.audio_window, cfg.audio_layers, cfg.audio_dim)
        if speakers == 2:
            ph, pw = cfg.patch_size[1:]
            masks = torch.zeros(3, height * 8, width * 8, device=device)
            masks[0, :, : width * 4] = 1
            masks[1, :, width * 4 :] = 1
            masks[2] = 1 - masks[0] - masks[1]
            inputs["ref_target_masks"] = masks
    return inputs


def forward(model: nn.Module, inputs: Mapping) -> torch.Tensor:
    """``model(x, t, context, **rest)`` from a dict made by :func:`example_inputs`."""
    rest = {k: v for k, v in inputs.items() if k not in ("x", "t", "context")}
    with torch.no_grad():
        return model(inputs["x"], inputs["t"], inputs["context"], **rest)


# --- loading ----------------------------------------------------------------------------------------
def pipeline_presets() -> list[str]:
    """Presets the studio can load: InfiniteTalk configs (tiny first)."""
    names = [n for n, c in PRESETS.items() if c.audio and c.is_i2v]
    return sorted(names, key=lambda n: (not n.startswith("tiny"), n))


@dataclass(frozen=True)
class LoadSettings:
    """Everything the load panel asks for. Validated here, before anything loads."""

    preset: str = TINY_PRESET  # tiny: random weights, no files; others: from ``weights``
    weights: WeightPaths | None = None
    device: str = "cpu"
    precision: BasePrecision | str = BasePrecision.FP32
    quantization: QuantMode | str = QuantMode.DISABLED
    attention: AttentionMode | str = AttentionMode.SDPA
    blocks_to_swap: int = 0
    prefetch: int = 1  # blocks copied ahead (0: each copy when its block is reached)
    accuracy: bool = True  # measure the per-layer quantization accuracy (base weights needed)
    seed: int = 0  # of the tiny preset's random weights

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", parse_option(BasePrecision, self.precision))
        object.__setattr__(self, "quantization", parse_option(QuantMode, self.quantization))
        object.__setattr__(self, "attention", parse_option(AttentionMode, self.attention))
        object.__setattr__(self, "device", str(torch.device(self.device)))
        problems = []
        if self.preset not in pipeline_presets():
            problems.append(
                f"preset {self.preset!r} is not an InfiniteTalk preset ({', '.join(pipeline_presets())})"
            )
        elif not self.is_tiny and self.weights is None:
            problems.append(
                f"preset {self.preset!r} loads real weights: give their paths (or pick {TINY_PRESET!r})"
            )
        layers = PRESETS[self.preset].num_layers if self.preset in PRESETS else 0
        if (
            isinstance(self.blocks_to_swap, bool)
            or not isinstance(self.blocks_to_swap, int)
            or not 0 <= self.blocks_to_swap <= layers
        ):
            problems.append(
                f"blocks_to_swap must be an integer in [0, {layers}], got {self.blocks_to_swap!r}"
            )
        if isinstance(self.prefetch, bool) or not isinstance(self.prefetch, int) or self.prefetch < 0:
            problems.append(f"prefetch must be an integer >= 0, got {self.prefetch!r}")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def is_tiny(self) -> bool:
        return self.preset.startswith("tiny")

    @property
    def dtype(self) -> torch.dtype:
        return dtype_of(self.precision)

    def problems(self) -> list[str]:
        """Why these settings cannot run on this machine (empty when they can)."""
        out = []
        for what, statuses, mode in (
            ("quantization", quant_availability(self.device), self.quantization),
            ("attention", attention_availability(self.device), self.attention),
            ("precision", precision_availability(self.device), self.precision),
        ):
            status = statuses[mode]
            if not status.available:
                out.append(f"{what} {mode.value!r}: {status.reason}")
        if self.blocks_to_swap and not swap_availability(self.device).available:
            out.append(f"blocks_to_swap: {swap_availability(self.device).reason}")
        if self.weights is not None and not self.is_tiny:
            out += [f"missing file: {m}" for m in self.weights.missing()]
        return out


def default_settings(weights: WeightPaths | None = None, **changes) -> LoadSettings:
    """Tiny preset on the CPU without weights; the 14B InfiniteTalk preset with them, on the GPU
    if there is one, at the precision that fits the device. ``changes`` override any field."""
    device = changes.pop("device", default_device())
    preset = TINY_PRESET if weights is None else "infinitetalk-14b"
    return LoadSettings(
        preset=changes.pop("preset", preset),
        weights=weights,
        device=device,
        precision=changes.pop("precision", default_precision(device)),
        **changes,
    )


@dataclass
class LoadResult:
    """What :func:`load_pipeline` returns: the pipeline and what was measured on the way."""

    pipeline: object
    settings: LoadSettings
    seconds: float
    report: object | None = None  # the per-layer quantization report (quant_report)
    report_note: str = ""  # why there is no report

    @property
    def model(self) -> nn.Module:
        return self.pipeline.model


def _pipeline_class():
    return _part("pipeline", "InfiniteTalkPipeline")


def apply_modes(model: nn.Module, settings: LoadSettings, inputs: Mapping | None = None):
    """Quantize (measuring accuracy first when asked), set attention, enable block swap.

    Returns the quantization report or None. The model must hold base-precision weights.
    """
    report = None
    if settings.quantization != QuantMode.DISABLED:
        if settings.accuracy:
            if inputs is None:
                inputs = example_inputs(model.config, device=model.device, dtype=model.dtype)
            report = quant_report(model, settings.quantization, inputs)
        _part("quant", "quantize")(model, settings.quantization)
    if settings.attention != AttentionMode.SDPA:
        _part("attention", "set_attention")(model, settings.attention)
    if settings.blocks_to_swap:
        _part("offload", "enable_block_swap")(
            model, blocks_to_swap=settings.blocks_to_swap, prefetch=settings.prefetch
        )
    return report


def quant_report(model: nn.Module, mode: QuantMode | str, inputs: Mapping):
    """``wanstudio.quant_report`` (per-layer SQNR and bytes) on :func:`example_inputs`-style inputs."""
    return _part("quant", "quant_report")(model, parse_option(QuantMode, mode), inputs)


def load_pipeline(settings: LoadSettings | None = None, **kw) -> LoadResult:
    """Build the InfiniteTalk pipeline the settings describe.

    The tiny preset is built at base precision, measured, then quantized (so the accuracy
    report compares against the same weights). Real weights are quantized while they stream
    from disk (``from_files``), so the base-precision model never exists and there is no
    per-layer report; notebook 01 measures the modes on a model loaded with ``disabled``.
    """
    settings = settings or LoadSettings(**kw)
    t0 = time.perf_counter()
    cls = _pipeline_class()
    report, note = None, ""
    if settings.is_tiny:
        pipe = cls.tiny(seed=settings.seed, device=settings.device, dtype=settings.dtype)
        report = apply_modes(pipe.model, settings)
        pipe.settings.update(
            quantization=settings.quantization.value,
            attention=settings.attention.value,
            blocks_to_swap=settings.blocks_to_swap,
        )
    else:
        pipe = cls.from_files(
            **settings.weights.as_kwargs(),
            config=settings.preset,
            quantization=settings.quantization,
            attention=settings.attention,
            blocks_to_swap=settings.blocks_to_swap,
            device=settings.device,
            dtype=settings.dtype,
        )
        if settings.blocks_to_swap and settings.prefetch != 1:  # from_files swaps with prefetch 1
            _part("offload", "disable_block_swap")(pipe.model)
            _part("offload", "enable_block_swap")(
                pipe.model, blocks_to_swap=settings.blocks_to_swap, prefetch=settings.prefetch
            )
        if settings.quantization != QuantMode.DISABLED and settings.accuracy:
            note = (
                "real weights are quantized while they load, so there is no base-precision copy "
                "to compare against: measure the modes in notebook 01 (load with 'disabled')"
            )
    if report is None and not note:
        note = (
            "no quantization: every layer runs at base precision"
            if settings.quantization == QuantMode.DISABLED
            else "accuracy measurement was off"
        )
    return LoadResult(pipe, settings, time.perf_counter() - t0, report, note)


def load_dit(
    weights: WeightPaths | None = None,
    *,
    quantization: QuantMode | str = QuantMode.DISABLED,
    device: str | None = None,
    seed: int = 0,
) -> nn.Module:
    """The DiT alone, for inspection: the seeded tiny InfiniteTalk model without weights, else
    the real one (``load_model`` of ``dit`` + ``infinitetalk``); then quantized."""
    device = device or default_device()
    dtype = dtype_of(default_precision(device))
    if weights is None:
        from .model import WanModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = WanModel(PRESETS[TINY_PRESET]).to(device=device, dtype=dtype)
    else:
        from .checkpoints import load_model

        paths = list(weights.dit) + ([weights.infinitetalk] if weights.infinitetalk else [])
        model = load_model(paths, device=device, dtype=dtype)
    model.eval().requires_grad_(False)
    if parse_option(QuantMode, quantization) != QuantMode.DISABLED:
        _part("quant", "quantize")(model, quantization)
    return model


# --- summary ----------------------------------------------------------------------------------------
@dataclass
class ComponentMemory:
    name: str
    parameters: int  # elements of parameters + buffers (a packed fp4 byte counts once)
    bytes_by_dtype: dict[str, int]
    bytes_by_device: dict[str, int]

    @property
    def bytes(self) -> int:
        return sum(self.bytes_by_dtype.values())


def module_memory(name: str, module: nn.Module) -> ComponentMemory:
    """Elements and bytes of every parameter and buffer (shared storage counted once)."""
    by_dtype, by_device, seen, count = Counter(), Counter(), set(), 0
    for t in (*module.parameters(), *module.buffers()):
        if t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        count += t.numel()
        nbytes = t.numel() * t.element_size()
        by_dtype[_dtype_name(t.dtype)] += nbytes
        by_device[str(t.device) + (" (pinned)" if t.device.type == "cpu" and _pinned(t) else "")] += nbytes
    return ComponentMemory(name, count, dict(by_dtype), dict(by_device))


def _pinned(t: torch.Tensor) -> bool:
    try:
        return t.is_pinned()
    except RuntimeError:
        return False


def _as_module(component) -> nn.Module | None:
    if isinstance(component, nn.Module):
        return component
    for attr in ("model", "module", "encoder", "vae"):
        inner = getattr(component, attr, None)
        if isinstance(inner, nn.Module):
            return inner
    return None


@dataclass
class ModelSummary:
    """Parameters, bytes per dtype, memory and the kernel path each chosen mode runs."""

    components: list[ComponentMemory]
    kernel_paths: list[tuple[str, str, str]]  # (setting, mode, what runs)
    host_rss: int | None
    vram_allocated: int | None = None
    vram_peak: int | None = None
    device: str = "cpu"
    seconds: float | None = None

    def to_text(self) -> str:
        lines = []
        for c in self.components:
            dt = ", ".join(f"{k} {_gib(v)}" for k, v in sorted(c.bytes_by_dtype.items()))
            lines.append(f"{c.name}: {c.parameters:,} elements, {_gib(c.bytes)} [{dt}]")
        mem = [f"host RSS {_gib(self.host_rss)}"] if self.host_rss is not None else []
        if self.vram_allocated is not None:
            mem.append(
                f"VRAM {_gib(self.vram_allocated)} allocated, {_gib(self.vram_peak)} peak on {self.device}"
            )
        lines.append("memory: " + ", ".join(mem))
        for what, mode, path in self.kernel_paths:
            lines.append(f"{what} {mode}: {path}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        dtypes = sorted({d for c in self.components for d in c.bytes_by_dtype})
        head = "".join(f"<th>{html.escape(d)}</th>" for d in dtypes)
        rows = []
        for c in self.components:
            cells = "".join(
                f"<td>{_gib(c.bytes_by_dtype[d]) if d in c.bytes_by_dtype else ''}</td>" for d in dtypes
            )
            where = ", ".join(f"{k}: {_gib(v)}" for k, v in sorted(c.bytes_by_device.items()))
            rows.append(
                f"<tr><td>{html.escape(c.name)}</td><td>{c.parameters:,}</td>{cells}"
                f"<td>{_gib(c.bytes)}</td><td>{html.escape(where)}</td></tr>"
            )
        table = (
            f"<table class='wanstudio-summary'><tr><th>part</th><th>elements</th>{head}"
            f"<th>total</th><th>where</th></tr>{''.join(rows)}</table>"
        )
        mem = [f"host RSS <b>{_gib(self.host_rss)}</b>"] if self.host_rss is not None else []
        if self.vram_allocated is not None:
            mem.append(
                f"VRAM <b>{_gib(self.vram_allocated)}</b> allocated, "
                f"<b>{_gib(self.vram_peak)}</b> peak on {html.escape(self.device)}"
            )
        paths = "".join(
            f"<tr><td>{html.escape(w)}</td><td><code>{html.escape(m)}</code></td>"
            f"<td>{html.escape(p)}</td></tr>"
            for w, m, p in self.kernel_paths
        )
        took = f" Loaded in {self.seconds:.1f} s." if self.seconds is not None else ""
        return (
            f"{table}<p>Memory: {', '.join(mem)}.{took}</p>"
            f"<table class='wanstudio-kernels'><tr><th>setting</th><th>mode</th><th>what runs</th>"
            f"</tr>{paths}</table>"
        )


def _gib(n: int | None) -> str:
    if n is None:
        return "?"
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB"


def _quantized_layers(model: nn.Module) -> dict:
    try:
        return _part("quant", "quantized_layers")(model)
    except PartMissingError:
        return {}


def _quant_paths_in(model: nn.Module) -> Counter:
    """What the quantized Linears run (``QuantizedLinear.path``), counted; empty if none."""
    return Counter(layer.path for layer in _quantized_layers(model).values())


def kernel_paths(model: nn.Module, settings: LoadSettings) -> list[tuple[str, str, str]]:
    q, a = settings.quantization, settings.attention
    counted = _quant_paths_in(model)
    qpath = (
        "; ".join(f"{p} x {n}" for p, n in counted.most_common())
        if counted
        else quant_kernel_path(q, settings.device)
    )
    astatus = attention_availability(settings.device)[a]
    rows = [
        ("base precision", settings.precision.value, f"{_dtype_name(settings.dtype)} weights and compute"),
        ("quantization", q.value, qpath or q.description),
        ("attention", a.value, astatus.kernel or astatus.reason or a.description),
    ]
    swap = (
        f"{settings.blocks_to_swap} of {model.config.num_layers} blocks in pinned host memory, "
        f"prefetch {settings.prefetch}"
        if settings.blocks_to_swap
        else "off: every block resident"
    )
    rows.append(("block swap", str(settings.blocks_to_swap), swap))
    return rows


def summarize(pipeline, settings: LoadSettings, seconds: float | None = None) -> ModelSummary:
    """Memory per part (DiT, encoders, VAE), process memory, and what each chosen mode runs."""
    parts = [("DiT", pipeline.model)]
    for attr, name in (
        ("text_encoder", "text encoder"),
        ("image_encoder", "image encoder"),
        ("audio_encoder", "audio encoder"),
        ("vae", "VAE"),
    ):
        module = _as_module(getattr(pipeline, attr, None))
        if module is not None:
            parts.append((name, module))
    components = [module_memory(n, m) for n, m in parts]
    rss = None
    with contextlib.suppress(Exception):
        import psutil

        rss = psutil.Process().memory_info().rss
    device = torch.device(settings.device)
    alloc = peak = None
    if device.type == "cuda" and torch.cuda.is_available():
        alloc, peak = torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
    return ModelSummary(
        components, kernel_paths(pipeline.model, settings), rss, alloc, peak, str(device), seconds
    )


def modes_table(device: torch.device | str = "cpu") -> str:
    """HTML: every quantization and attention mode on this device — what runs, or why not."""
    rows = []
    for title, statuses in (
        ("quantization", quant_availability(device)),
        ("attention", attention_availability(device)),
    ):
        for mode, s in statuses.items():
            what = (
                html.escape(s.kernel or mode.description)
                if s.available
                else f"<span style='color:#b00'>cannot run: {html.escape(s.reason)}</span>"
            )
            rows.append(f"<tr><td>{title}</td><td><code>{mode.value}</code></td><td>{what}</td></tr>")
    return (
        "<table class='wanstudio-modes'><tr><th>setting</th><th>mode</th>"
        f"<th>on {html.escape(str(device))}</th></tr>{''.join(rows)}</table>"
    )


# --- quantization modes compared ------------------------------------------------------------------
@dataclass(frozen=True)
class QuantRow:
    mode: QuantMode
    available: bool
    reason: str = ""
    linear_bytes: int = 0  # bytes of the quantizable Linear weights in this mode (scales included)
    ratio: float = float("nan")  # linear_bytes / their base-precision bytes
    model_bytes: int = 0  # the whole DiT in this mode
    sqnr_db: float = float("nan")  # whole-model output vs base precision
    worst_layer: str = ""  # the layer with the lowest SQNR (keep-list candidate)
    worst_sqnr_db: float = float("nan")
    paths: str = ""  # matmul paths, counted ('scaled_mm x12')


def _db_text(v: float) -> str:
    return "" if math.isnan(v) else "inf" if math.isinf(v) else f"{v:.1f}"


@dataclass
class QuantComparison:
    """One row per quantization mode: memory of the Linear weights and of the whole DiT, whole-model
    SQNR and the worst layer; ``reports`` holds each mode's per-layer :class:`QuantReport`."""

    rows: list[QuantRow]
    base_linear_bytes: int
    base_model_bytes: int
    device: str
    reports: dict = field(default_factory=dict, repr=False)

    COLUMNS = ("mode", "Linear weights", "x base", "DiT total", "SQNR dB", "worst layer (dB)", "matmul")

    def row(self, mode: QuantMode | str) -> QuantRow:
        mode = parse_option(QuantMode, mode)
        return next(r for r in self.rows if r.mode == mode)

    def _cells(self, r: QuantRow) -> tuple[str, ...]:
        if not r.available:
            return (r.mode.value, "", "", "", "", "", f"cannot run here: {r.reason}")
        worst = f"{r.worst_layer} ({_db_text(r.worst_sqnr_db)})" if r.worst_layer else ""
        return (
            r.mode.value,
            _gib(r.linear_bytes),
            f"{r.ratio:.2f}",
            _gib(r.model_bytes),
            _db_text(r.sqnr_db),
            worst,
            r.paths,
        )

    def to_markdown(self) -> str:
        lines = ["| " + " | ".join(self.COLUMNS) + " |", "|" + "---|" * len(self.COLUMNS)]
        lines += ["| " + " | ".join(self._cells(r)) + " |" for r in self.rows]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{c}</th>" for c in self.COLUMNS)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in self._cells(r)) + "</tr>"
            for r in self.rows
        )
        return f"<table class='wanstudio-quant'><tr>{head}</tr>{body}</table>"

    def __str__(self) -> str:
        return self.to_markdown()

    def figure(self):
        """Memory against SQNR, one point per mode (a matplotlib Figure)."""
        from .widgets.plots import quant_comparison_figure

        return quant_comparison_figure(self)

    def plot(self):
        """:meth:`figure` as a PNG image, which every notebook front end displays."""
        from IPython.display import Image

        from .widgets.plots import png_bytes

        return Image(data=png_bytes(self.figure()))


def truncated(model: nn.Module, blocks: int) -> nn.Module:
    """A view of ``model`` with only its first ``blocks`` blocks (weights shared, not copied):
    measure the modes on a slice of a 14B model when the whole one is too slow."""
    view = copy.copy(model)
    view._modules = dict(model._modules)
    view._modules["blocks"] = nn.ModuleList(list(model.blocks)[:blocks])
    view.config = model.config.replace(num_layers=min(blocks, model.config.num_layers))
    view._rope_cache = {}
    return view


def compare_quant_modes(
    model: nn.Module, modes: Iterable[QuantMode | str] | None = None, inputs: Mapping | None = None
) -> QuantComparison:
    """Measure every mode on ``model`` (base-precision weights, left unchanged): Linear and DiT
    bytes, whole-model SQNR, worst layer, matmul paths. Modes that cannot run on the model's
    device get a row with the reason. Uses :func:`wanstudio.quant.quant_report`, which holds
    one quantized copy of the Linear layers at a time.
    """
    if _quantized_layers(model):
        raise UnsupportedModeError(
            "compare_quant_modes needs base-precision weights, but this model is "
            "already quantized: load it with quantization='disabled'"
        )
    device = model.device
    modes = [parse_option(QuantMode, m) for m in (modes if modes is not None else QuantMode)]
    if inputs is None:
        inputs = example_inputs(model.config, device=device, dtype=model.dtype)
    total = module_memory("DiT", model).bytes
    statuses = quant_availability(device)
    rows, reports, base_linear = [], {}, 0
    for mode in modes:
        status = statuses[mode]
        if not status.available:
            rows.append(QuantRow(mode, False, status.reason))
            continue
        report = quant_report(model, mode, inputs)
        reports[mode] = report
        if mode == QuantMode.DISABLED:
            rows.append(
                QuantRow(mode, True, model_bytes=total, sqnr_db=math.inf, ratio=1.0, paths="base precision")
            )
            continue
        base_linear = report.base_bytes
        worst = report.worst(1)
        rows.append(
            QuantRow(
                mode,
                True,
                "",
                report.quant_bytes,
                report.quant_bytes / report.base_bytes if report.base_bytes else math.nan,
                total - report.base_bytes + report.quant_bytes,
                report.model_sqnr_db,
                worst[0].name if worst else "",
                worst[0].sqnr_db if worst else math.nan,
                ", ".join(f"{p} x{n}" for p, n in report.paths().items()),
            )
        )
    rows = [replace(r, linear_bytes=base_linear) if r.mode == QuantMode.DISABLED else r for r in rows]
    return QuantComparison(rows, base_linear, total, str(device), reports)


# --- layout incidents (notebook 03) ------------------------------------------------------------------
def _set_tensor(module: nn.Module, attr: str, tensor: torch.Tensor) -> None:
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        setattr(module, attr, tensor)


def misalign(model: nn.Module, layer: str, attr: str = "weight") -> torch.Tensor:
    """Move ``<layer>.<attr>`` into a storage that starts one element late: its data_ptr() is
    no longer 16-byte aligned, exactly like a weight sliced out of a packed / merged tensor.

    Values, shape and strides are unchanged; only the address moves. Returns the new tensor.
    """
    module = model.get_submodule(layer)
    t = getattr(module, attr)
    storage = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)  # (1 + N*K,)
    moved = storage[1:].view(t.shape)  # (N, K), storage offset 1
    moved.copy_(t.detach())
    _set_tensor(module, attr, moved)
    return moved


def realign(model: nn.Module, layer: str, attr: str = "weight") -> torch.Tensor:
    """Undo :func:`misalign`: one fresh (aligned) allocation."""
    module = model.get_submodule(layer)
    fixed = getattr(module, attr).detach().clone()
    _set_tensor(module, attr, fixed)
    return fixed


def contract_layers(model: nn.Module, inputs: Mapping, operand: str = "") -> list[tuple[str, str, str]]:
    """(module, kernel, operand) of every layout-contract check one forward makes."""
    from .layout import listen

    seen: dict[tuple[str, str, str], None] = {}

    def record(event) -> None:
        seen[(event.where, event.kernel, event.operand.name)] = None

    with listen(record):
        forward(model, inputs)
    return [k for k in seen if not operand or k[2] == operand]


def fast_linear_layers(model: nn.Module, inputs: Mapping) -> list[str]:
    """Modules whose weight reaches ``torch._scaled_mm`` (the kernel with an alignment rule)."""
    names = []
    for where, kernel, _operand in contract_layers(model, inputs):
        if "scaled_mm" in kernel and where not in names:
            names.append(where)
    return names


def strict_forward_error(model: nn.Module, inputs: Mapping) -> LayoutError | None:
    """Run one forward under ``strict_layout()``; the LayoutError it raises, or None."""
    from .layout import strict_layout

    try:
        with strict_layout():
            forward(model, inputs)
    except LayoutError as e:
        return e
    return None


@dataclass(frozen=True)
class CopyCost:
    """What a layout violation costs outside strict mode (the contract copies, every call)."""

    copies_per_forward: int
    bytes_per_forward: int
    ms_violating: float
    ms_clean: float
    copied: tuple[str, ...]  # 'module: kernel operand' of each hidden copy

    @property
    def overhead(self) -> float:
        return self.ms_violating / self.ms_clean - 1 if self.ms_clean else float("nan")

    def __str__(self) -> str:
        return (
            f"{self.copies_per_forward} hidden cop{'y' if self.copies_per_forward == 1 else 'ies'} "
            f"per forward ({_gib(self.bytes_per_forward)}): {', '.join(self.copied) or 'none'}\n"
            f"forward {self.ms_violating:.2f} ms with the violation, {self.ms_clean:.2f} ms without "
            f"({self.overhead:+.0%})"
        )


def _time_ms(model: nn.Module, inputs: Mapping, repeats: int) -> float:
    forward(model, inputs)  # warm-up
    best = math.inf
    for _ in range(repeats):
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        t0 = time.perf_counter()
        forward(model, inputs)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        best = min(best, (time.perf_counter() - t0) * 1000)
    return best


def hidden_copy_cost(
    model: nn.Module, inputs: Mapping, layer: str, attr: str = "weight", repeats: int = 5
) -> CopyCost:
    """Misalign ``<layer>.<attr>``, count and time the copies the contracts then make on every
    forward (outside strict mode), realign, time again. The model is left aligned."""
    from .layout import listen

    misalign(model, layer, attr)
    copied: dict[str, int] = {}

    def record(event) -> None:
        if event.copied:
            key = f"{event.where}: {event.kernel} {event.operand.name}"
            copied[key] = event.tensor.numel() * event.tensor.element_size()

    try:
        with listen(record):
            forward(model, inputs)
        slow = _time_ms(model, inputs, repeats)
    finally:
        realign(model, layer, attr)
    fast = _time_ms(model, inputs, repeats)
    return CopyCost(len(copied), sum(copied.values()), slow, fast, tuple(copied))


# --- the inspector -------------------------------------------------------------------------------------
def inspect_model(model: nn.Module, inputs: Mapping, *, strict: bool = False):
    """``wanstudio.inspect_layout`` on :func:`example_inputs`-style inputs, under strict mode if asked.

    In strict mode a violated contract raises LayoutError (naming the layer) instead of a report.
    """
    from .layout import strict_layout

    inspect_layout = _part("inspector", "inspect_layout")
    with strict_layout(strict):
        return inspect_layout(model, dict(inputs))


def report_rows(report) -> list:
    rows = getattr(report, "rows", report)
    return list(rows() if callable(rows) else rows)


def row_field(row, name: str, default=""):
    """A field of an inspector row (a LayoutRow attribute, or a key of a mapping row)."""
    if isinstance(row, Mapping):
        return row.get(name, default)
    return getattr(row, name, default)


# --- block swap timeline -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Span:
    unit: str  # 'blocks.39'
    kind: str  # 'copy' (side stream), 'wait' (compute waiting for the copy) or 'compute'
    start: float  # ms from the forward's start
    end: float


def swap_timeline(stats) -> list[Span]:
    """The last forward of ``model.block_swap_stats`` as copy / wait / compute spans (ms)."""
    if stats is None:
        return []
    spans = []
    for e in getattr(stats, "timeline", ()) or ():
        spans.append(Span(e.unit, "copy", e.copy_start, e.copy_end))
        if e.compute_start > e.compute_ready:
            spans.append(Span(e.unit, "wait", e.compute_ready, e.compute_start))
        spans.append(Span(e.unit, "compute", e.compute_start, e.compute_end))
    return spans


def block_swap(model: nn.Module, blocks_to_swap: int, *, prefetch: int = 1) -> nn.Module:
    """Block swap for real on a CUDA model; on the CPU, :func:`simulated_block_swap`."""
    if model.device.type == "cuda":
        return _part("offload", "enable_block_swap")(model, blocks_to_swap, prefetch=prefetch)
    return simulated_block_swap(model, blocks_to_swap, prefetch=prefetch)


def simulated_block_swap(
    model: nn.Module,
    blocks_to_swap: int,
    *,
    prefetch: int = 1,
    copy_gb_per_s: float = 25.0,
    compute_ms: float = 1.0,
) -> nn.Module:
    """Block swap on the CPU with a simulated device (``offload.FakeTransferBackend``): the
    bookkeeping and the timeline are real, the clock is virtual. For CPU notebooks and tests."""
    backend_cls = _part("offload", "FakeTransferBackend")
    backend = backend_cls(copy_bytes_per_ms=copy_gb_per_s * 1e6, compute_ms=compute_ms)
    return _part("offload", "enable_block_swap")(model, blocks_to_swap, prefetch=prefetch, backend=backend)


# --- output ------------------------------------------------------------------------------------------
def output_path(name: str = "infinitetalk.mp4") -> Path:
    """``$WANSTUDIO_OUTPUT/<name>`` (default ``./outputs/<name>``), the folder created."""
    folder = Path(os.environ.get(OUTPUT_ENV, "outputs"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def sample_media() -> tuple[Path, Path]:
    """The shipped portrait and speech clip (``wanstudio.media.asset_path``)."""
    asset_path = _part("media", "asset_path")
    return Path(asset_path("portrait.png")), Path(asset_path("speech.wav"))


def with_settings(settings: LoadSettings, **changes) -> LoadSettings:
    return replace(settings, **changes)
