"""Loading a pipeline the way the load panel describes it, and what it costs.

:class:`LoadSettings` is what the panel asks for (preset, weights, device, the
:class:`~wanstudio.modes.RuntimeModes`); :func:`load_pipeline` builds the pipeline (tiny preset
or real files) and measures per-layer quantization accuracy on the way; :func:`summarize` gives
the parameters, bytes per dtype, memory and the kernel each chosen mode runs.
"""

from __future__ import annotations

import contextlib
import html
import os
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from torch import nn

from ..checkpoints import load_model
from ..config import PRESETS
from ..errors import ConfigError
from ..media import asset_path
from ..model import WanModel
from ..modes import RuntimeModes
from ..modes import apply_modes as apply_runtime_modes
from ..offload import check_blocks_to_swap
from ..options import AttentionMode, BasePrecision, EncoderOffload, QuantMode, TextEncoderDevice, parse_option
from ..pipeline import InfiniteTalkPipeline
from ..pipeline.memory import check_budget_gb
from ..quant import QuantMix, quantized_layers
from ..quant import quant_report as measure_quant_report
from ..quant.spec import counted_text
from ._format import dtype_name, gib
from .availability import (
    attention_availability,
    default_device,
    default_precision,
    precision_availability,
    quant_availability,
    quant_kernel_path,
    swap_availability,
)
from .inputs import example_inputs
from .weights import TINY_PRESET, WeightPaths

OUTPUT_ENV = "WANSTUDIO_OUTPUT"  # where notebooks and panels write videos (default ./outputs)


def pipeline_presets() -> list[str]:
    """Presets the studio can load: InfiniteTalk configs (tiny first)."""
    names = [n for n, c in PRESETS.items() if c.audio and c.is_i2v]
    return sorted(names, key=lambda n: (not n.startswith("tiny"), n))


@dataclass(frozen=True, init=False)
class LoadSettings:
    """Everything the load panel asks for. Validated when made, before anything loads.

    Args:
        preset: an InfiniteTalk preset; tiny: no files (the shipped tiny weights); others: from ``weights``.
        weights: the real files (required unless the preset is tiny).
        device: where the model runs.
        modes: the runtime modes (default: fp32, no quantization, sdpa, no block swap).
        precision, quantization, attention, blocks_to_swap, prefetch: the same choices as
            keywords; one given wins over the field of ``modes``. Each is also a read-only
            property, so ``LoadSettings(quantization="fp8_e4m3fn", blocks_to_swap=2)`` works
            and ``settings.quantization`` reads it back.
        accuracy: measure the per-layer quantization accuracy (base weights needed).
        seed: of the tiny preset's random parts (the shipped trained weights replace them).
        offload_encoders, text_encoder_device, text_encoder_quantization, vram_budget_gb: where
            the encoders live and the device memory the pipeline may use (README 'Small
            cards'; ``from_files``). The tiny preset (on the CPU) honours only the text encoder's
            storage. ``blocks_to_swap="auto"`` plans the DiT for ``vram_budget_gb``.

    The modes are validated once, by :class:`~wanstudio.modes.RuntimeModes`; here only what
    depends on the preset (its block count) and on the weights is checked.
    """

    preset: str
    weights: WeightPaths | None
    device: str
    modes: RuntimeModes
    accuracy: bool
    seed: int
    offload_encoders: EncoderOffload
    text_encoder_device: TextEncoderDevice
    text_encoder_quantization: QuantMode
    vram_budget_gb: float | None

    def __init__(
        self,
        preset: str = TINY_PRESET,
        weights: WeightPaths | None = None,
        device: torch.device | str = "cpu",
        *,
        modes: RuntimeModes | None = None,
        precision: BasePrecision | str | torch.dtype | None = None,
        quantization: QuantMode | str | None = None,
        attention: AttentionMode | str | None = None,
        blocks_to_swap: int | None = None,
        prefetch: int | None = None,
        loras=None,
        accuracy: bool = True,
        seed: int = 0,
        offload_encoders: EncoderOffload | str = EncoderOffload.AUTO,
        text_encoder_device: TextEncoderDevice | str = TextEncoderDevice.AUTO,
        text_encoder_quantization: QuantMode | str = QuantMode.DISABLED,
        vram_budget_gb: float | None = None,
    ) -> None:
        modes = RuntimeModes.merge(
            modes if modes is not None else RuntimeModes(precision=BasePrecision.FP32),
            precision=precision,
            quantization=quantization,
            attention=attention,
            blocks_to_swap=blocks_to_swap,
            prefetch=prefetch,
            loras=loras,
        )
        set_ = object.__setattr__  # frozen
        for name, value in (
            ("preset", preset),
            ("weights", weights),
            ("device", str(torch.device(device))),
            ("modes", modes),
            ("accuracy", accuracy),
            ("seed", seed),
            ("offload_encoders", parse_option(EncoderOffload, offload_encoders)),
            ("text_encoder_device", parse_option(TextEncoderDevice, text_encoder_device)),
            ("text_encoder_quantization", parse_option(QuantMode, text_encoder_quantization)),
            ("vram_budget_gb", check_budget_gb(vram_budget_gb)),
        ):
            set_(self, name, value)
        if preset not in pipeline_presets():
            raise ConfigError(
                f"preset {preset!r} is not an InfiniteTalk preset ({', '.join(pipeline_presets())})"
            )
        if not self.is_tiny and weights is None:
            raise ConfigError(
                f"preset {preset!r} loads real weights: give their paths (or pick {TINY_PRESET!r})"
            )
        if modes.blocks_to_swap != "auto":
            check_blocks_to_swap(modes.blocks_to_swap, PRESETS[preset].num_layers)

    @property
    def precision(self) -> BasePrecision:
        return self.modes.precision

    @property
    def quantization(self) -> QuantMode:
        return self.modes.quantization

    @property
    def attention(self) -> AttentionMode:
        return self.modes.attention

    @property
    def blocks_to_swap(self) -> int | str:
        """A count, or "auto" (planned for ``vram_budget_gb`` when the pipeline loads)."""
        return self.modes.blocks_to_swap

    def memory_kwargs(self) -> dict:
        """The memory keywords of ``InfiniteTalkPipeline.from_files``."""
        quant = self.text_encoder_quantization
        return dict(
            offload_encoders=self.offload_encoders.setting,
            text_encoder_device=self.text_encoder_device.setting,
            text_encoder_quantization=None if quant is QuantMode.DISABLED else quant.value,
            vram_budget_gb=self.vram_budget_gb,
        )

    @property
    def prefetch(self) -> int:
        """Blocks copied ahead (0: each copy when its block is reached)."""
        return self.modes.prefetch

    @property
    def is_tiny(self) -> bool:
        return self.preset.startswith("tiny")

    @property
    def dtype(self) -> torch.dtype:
        return self.modes.dtype

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
    if "modes" not in changes:
        changes.setdefault("precision", default_precision(device))
    return LoadSettings(preset=changes.pop("preset", preset), weights=weights, device=device, **changes)


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


def quant_report(model: nn.Module, mode: QuantMode | str, inputs: Mapping):
    """``wanstudio.quant_report`` (per-layer SQNR and bytes) on :func:`example_inputs`-style inputs."""
    return measure_quant_report(model, parse_option(QuantMode, mode), inputs)


def apply_settings(model: nn.Module, settings: LoadSettings, inputs: Mapping | None = None):
    """Measure the per-layer quantization accuracy when asked, then configure the model with
    :func:`wanstudio.modes.apply_modes` (quantize, attention, block swap).

    Returns the quantization report or None. The model must hold base-precision weights.
    """
    report = None
    if settings.quantization is not QuantMode.DISABLED and settings.accuracy:
        if inputs is None:
            inputs = example_inputs(model.config, device=model.device, dtype=model.dtype)
        report = quant_report(model, settings.quantization, inputs)
    apply_runtime_modes(model, settings.modes)
    return report


def load_pipeline(settings: LoadSettings | None = None, **kw) -> LoadResult:
    """Build the InfiniteTalk pipeline the settings describe.

    The tiny preset is built at base precision, measured, then quantized (so the accuracy
    report compares against the same weights). Real weights are quantized while they stream
    from disk (``from_files``), so the base-precision model never exists and there is no
    per-layer report; notebook 01 measures the modes on a model loaded with ``disabled``.
    """
    settings = settings or LoadSettings(**kw)
    t0 = time.perf_counter()
    report, note = None, ""
    if settings.is_tiny:
        pipe = InfiniteTalkPipeline.tiny(seed=settings.seed, device=settings.device, dtype=settings.dtype)
        report = apply_settings(pipe.model, settings)
        if settings.text_encoder_quantization is not QuantMode.DISABLED:
            pipe.text_encoder.quantize(settings.text_encoder_quantization.value)
    else:
        pipe = InfiniteTalkPipeline.from_files(
            **settings.weights.as_kwargs(),
            config=settings.preset,
            device=settings.device,
            modes=settings.modes,
            **settings.memory_kwargs(),
        )
        if settings.quantization is not QuantMode.DISABLED and settings.accuracy:
            note = (
                "real weights are quantized while they load, so there is no base-precision copy "
                "to compare against: measure the modes in notebook 01 (load with 'disabled')"
            )
    if report is None and not note:
        note = (
            "no quantization: every layer runs at base precision"
            if settings.quantization is QuantMode.DISABLED
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
    the real one (``load_model`` of ``dit`` + ``infinitetalk``); quantized as asked, at the
    device's default precision."""
    device = device or default_device()
    modes = RuntimeModes(quantization=quantization, precision=default_precision(device))
    if weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = WanModel(PRESETS[TINY_PRESET]).to(device=device, dtype=modes.dtype)
        model.eval().requires_grad_(False)
        return apply_runtime_modes(model, modes)
    paths = list(weights.dit) + ([weights.infinitetalk] if weights.infinitetalk else [])
    return load_model(paths, device=device, modes=modes).eval().requires_grad_(False)


# --- summary ----------------------------------------------------------------------------------------
@dataclass
class ComponentMemory:
    """Elements and bytes of one part of a pipeline, per dtype and per device."""

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
        by_dtype[dtype_name(t.dtype)] += nbytes
        by_device[str(t.device) + (" (pinned)" if t.device.type == "cpu" and _pinned(t) else "")] += nbytes
    return ComponentMemory(name, count, dict(by_dtype), dict(by_device))


def _pinned(t: torch.Tensor) -> bool:
    try:
        return t.is_pinned()
    except RuntimeError:
        return False


def _as_module(component) -> nn.Module | None:
    """The nn.Module inside an encoder adapter (or the component itself)."""
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
        """Lines of text: each component's elements and bytes per dtype, memory, and kernel paths."""
        lines = []
        for c in self.components:
            dt = ", ".join(f"{k} {gib(v)}" for k, v in sorted(c.bytes_by_dtype.items()))
            lines.append(f"{c.name}: {c.parameters:,} elements, {gib(c.bytes)} [{dt}]")
        mem = [f"host RSS {gib(self.host_rss)}"] if self.host_rss is not None else []
        if self.vram_allocated is not None:
            mem.append(
                f"VRAM {gib(self.vram_allocated)} allocated, {gib(self.vram_peak)} peak on {self.device}"
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
                f"<td>{gib(c.bytes_by_dtype[d]) if d in c.bytes_by_dtype else ''}</td>" for d in dtypes
            )
            where = ", ".join(f"{k}: {gib(v)}" for k, v in sorted(c.bytes_by_device.items()))
            rows.append(
                f"<tr><td>{html.escape(c.name)}</td><td>{c.parameters:,}</td>{cells}"
                f"<td>{gib(c.bytes)}</td><td>{html.escape(where)}</td></tr>"
            )
        table = (
            f"<table class='wanstudio-summary'><tr><th>part</th><th>elements</th>{head}"
            f"<th>total</th><th>where</th></tr>{''.join(rows)}</table>"
        )
        mem = [f"host RSS <b>{gib(self.host_rss)}</b>"] if self.host_rss is not None else []
        if self.vram_allocated is not None:
            mem.append(
                f"VRAM <b>{gib(self.vram_allocated)}</b> allocated, "
                f"<b>{gib(self.vram_peak)}</b> peak on {html.escape(self.device)}"
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


def quant_paths(model: nn.Module) -> Counter:
    """What the quantized Linears run (``QuantizedLinear.path``), counted; empty if none."""
    return Counter(layer.path for layer in quantized_layers(model).values())


def kernel_paths(model: nn.Module, settings: LoadSettings) -> list[tuple[str, str, str]]:
    """(setting, mode, what runs) for base precision, quantization, attention and block swap."""
    q, a = settings.quantization, settings.attention
    counted = quant_paths(model)
    qpath = counted_text(counted.most_common()) if counted else quant_kernel_path(q, settings.device)
    stored = getattr(model, "quantization", None) if q is QuantMode.DISABLED else None
    qrow = ("quantization", q.value, qpath or q.description)
    if isinstance(stored, QuantMix):  # 'disabled' on a mixed file: each layer as its file stores it
        mix = counted_text((m.value, n) for m, n in stored.counts)
        qrow = ("quantization", f"{q.value}: mixed, as stored", f"{mix} ({qpath})")
    elif isinstance(stored, QuantMode) and stored is not QuantMode.DISABLED:
        qrow = ("quantization", f"{q.value}: {stored.value}, as stored", qpath)
    astatus = attention_availability(settings.device)[a]
    rows = [
        ("base precision", settings.precision.value, f"{dtype_name(settings.dtype)} weights and compute"),
        qrow,
        ("attention", a.value, astatus.kernel or astatus.reason or a.description),
    ]
    swapped = getattr(getattr(model, "modes", None), "blocks_to_swap", settings.blocks_to_swap)
    swap = (
        f"{swapped} of {model.config.num_layers} blocks in pinned host memory, prefetch {settings.prefetch}"
        if swapped
        else "off: every block resident"
    )
    plan = getattr(model, "memory_plan", None)
    if settings.blocks_to_swap == "auto":
        budget = f"{settings.vram_budget_gb:g} GiB" if settings.vram_budget_gb else "the free memory"
        swap = f"auto for {budget}: {swap}" + (f" ({plan.summary().splitlines()[0]})" if plan else "")
    rows.append(("block swap", str(settings.blocks_to_swap), swap))
    return rows


def checkpoint_rows(model: nn.Module) -> list[tuple[str, str, str]]:
    """(what, kind, detail) for the files real weights came from (``model.checkpoint_info``):
    each file and its format, and the weights per stored format; empty for the tiny preset."""
    info = getattr(model, "checkpoint_info", None)
    if info is None:
        return []
    files = ", ".join(f"{p.name} ({fmt})" for p, fmt in zip(info.files, info.formats))
    counts = sorted(info.storage.items(), key=lambda kv: -kv[1])
    stored = counted_text(counts) or "no weights"
    kind = "mixed" if len(counts) > 1 else counts[0][0] if counts else "-"
    return [
        ("checkpoint", ", ".join(dict.fromkeys(info.formats)), f"{gib(info.bytes)} in {files}"),
        ("weights stored as", kind, stored),
    ]


def memory_rows(pipeline, settings: LoadSettings) -> list[tuple[str, str, str]]:
    """(setting, choice, what it does here) for the encoders' placement and the VAE."""
    runner = getattr(pipeline, "encoders", None)
    rows = [
        (
            "encoders",
            settings.offload_encoders.value,
            runner.describe() if runner is not None else settings.offload_encoders.description,
        ),
        ("text encoder", settings.text_encoder_device.value, settings.text_encoder_device.description),
    ]
    if settings.text_encoder_quantization is not QuantMode.DISABLED:
        rows.append(("text encoder storage", settings.text_encoder_quantization.value, "umT5 block Linears"))
    return rows


def summarize(pipeline, settings: LoadSettings, seconds: float | None = None) -> ModelSummary:
    """Memory per part (DiT, encoders, VAE), process memory, the checkpoint's files and storage
    (real weights), and what each chosen mode runs."""
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
    with contextlib.suppress(psutil.Error, OSError):  # some sandboxes hide process memory
        rss = psutil.Process().memory_info().rss
    device = torch.device(settings.device)
    alloc = peak = None
    if device.type == "cuda" and torch.cuda.is_available():
        alloc, peak = torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
    return ModelSummary(
        components,
        checkpoint_rows(pipeline.model)
        + kernel_paths(pipeline.model, settings)
        + memory_rows(pipeline, settings),
        rss,
        alloc,
        peak,
        str(device),
        seconds,
    )


# --- output ------------------------------------------------------------------------------------------
def output_path(name: str = "infinitetalk.mp4") -> Path:
    """``$WANSTUDIO_OUTPUT/<name>`` (default ``./outputs/<name>``), the folder created."""
    folder = Path(os.environ.get(OUTPUT_ENV, "outputs"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def sample_media() -> tuple[Path, Path]:
    """The shipped portrait and speech clip (``wanstudio.media.asset_path``)."""
    return Path(asset_path("portrait.png")), Path(asset_path("speech.wav"))
