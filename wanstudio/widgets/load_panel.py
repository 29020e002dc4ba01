"""LoadPanel: choose weights and modes, load the pipeline, see what it costs and what runs."""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path

import ipywidgets as widgets

from .. import studio
from ..config import PRESETS
from ..errors import ConfigError
from ..options import AttentionMode, EncoderOffload, QuantMode, TextEncoderDevice
from ..pipeline.tiny_weights import tiny_weights_note
from ..studio import LoadResult, LoadSettings, WeightPaths
from . import choices
from .common import (
    STYLE,
    error_html,
    fit_layout,
    format_traceback,
    heading,
    set_options,
    slider_layout,
    status_html,
    table_style,
)

# what the DiT fields accept (the placeholder and the fields' tooltip)
DIT_FORMATS = (
    "safetensors bf16 / fp16 / fp8 (e4m3fn, e5m2), scaled fp8 (kijai, ComfyUI), "
    "GGUF (.gguf: Q8_0, K-quants, Q4_0, F16), quanto int8 / fp8 (its .json map beside it)"
)

# field -> (label, placeholder, required)
PATH_FIELDS: dict[str, tuple[str, str, bool]] = {
    "dit": (
        "DiT (Wan2.1-I2V-14B)",
        "…/Wan2.1-I2V-14B-480P/diffusion_pytorch_model.safetensors.index.json "
        f"(one path per line: shards' index json, their folder, or single files; {DIT_FORMATS})",
        True,
    ),
    "infinitetalk": (
        "InfiniteTalk",
        "…/InfiniteTalk/single/infinitetalk.safetensors (or an fp8 / .gguf file of it)",
        False,
    ),
    "vae": ("VAE", "…/Wan2.1-I2V-14B-480P/Wan2.1_VAE.pth", True),
    "text_encoder": ("text encoder (umT5)", "…/models_t5_umt5-xxl-enc-bf16.pth", True),
    "tokenizer": ("tokenizer", "…/Wan2.1-I2V-14B-480P/google/umt5-xxl (folder)", False),
    "clip": ("image encoder (CLIP)", "…/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", True),
    "wav2vec": ("audio encoder", "…/chinese-wav2vec2-base (folder)", True),
}


def check_path(text: str, required: bool) -> tuple[bool | None, str]:
    """(ok, message) for one path field: None when an optional field is empty."""
    entries = [line.strip() for line in text.splitlines() if line.strip()]
    if not entries:
        return (False, "required") if required else (None, "optional")
    notes = []
    for entry in entries:
        p = Path(entry).expanduser()
        if not p.exists():
            return False, f"not found: {entry}"
        if p.is_dir():
            notes.append("folder")
        else:
            size = p.stat().st_size
            notes.append(f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB")
    return True, ", ".join(notes)


def _html_of(obj) -> str:
    if obj is None:
        return ""
    to_html = getattr(obj, "_repr_html_", None)
    return to_html() if callable(to_html) else f"<pre>{html.escape(str(obj))}</pre>"


class LoadPanel(widgets.VBox):
    """Pick weights (tiny preset or real files), precision, quantization, attention and block
    swap; Load; then see parameters, bytes per dtype, memory, the kernel path each mode runs
    and the per-layer quantization accuracy.

    Args:
        weights: real weight paths to fill in (default: :func:`wanstudio.studio.find_weights`).
            With weights the panel starts on the real preset, else on the tiny one.
        loader: ``loader(LoadSettings) -> LoadResult`` (default :func:`studio.load_pipeline`;
            tests pass a fake).
        device: the initial device (default: the first GPU, else the CPU).
    """

    def __init__(
        self,
        *,
        weights: WeightPaths | None = None,
        loader: Callable[[LoadSettings], LoadResult] | None = None,
        device: str | None = None,
        find: bool = True,
    ):
        if weights is None and find:
            try:
                weights = studio.find_weights()
            except ConfigError:
                weights = None  # a broken config shows up as path errors, not as a crash
        self.loader = loader or studio.load_pipeline
        self.result: LoadResult | None = None
        self.summary: studio.ModelSummary | None = None
        self.last_error: BaseException | None = None
        self.last_traceback = ""
        self._callbacks: list[Callable[[LoadResult], None]] = []
        device = device or studio.default_device()
        if device == "cuda":
            device = "cuda:0"

        presets = studio.pipeline_presets()
        self.preset = widgets.Dropdown(
            options=[
                (
                    f"{p} (no files: {tiny_weights_note()})"
                    if p.startswith("tiny")
                    else f"{p} (real weights)",
                    p,
                )
                for p in presets
            ],
            value=next((p for p in presets if not p.startswith("tiny")), presets[0])
            if weights
            else presets[0],
            description="preset",
            style=STYLE,
            layout=widgets.Layout(width="60%"),
        )
        self.paths: dict[str, widgets.Text | widgets.Textarea] = {}
        self.path_status: dict[str, widgets.HTML] = {}
        for name, (label, placeholder, _) in PATH_FIELDS.items():
            cls = widgets.Textarea if name == "dit" else widgets.Text
            box = cls(
                description=label,
                placeholder=placeholder,
                tooltip=f"accepted: {DIT_FORMATS}" if name in ("dit", "infinitetalk") else None,
                style=STYLE,
                layout=widgets.Layout(width="70%", height="52px" if name == "dit" else None),
            )
            box.observe(lambda _c, n=name: self._check_path(n), "value")
            self.paths[name] = box
            self.path_status[name] = widgets.HTML(layout=widgets.Layout(width="28%"))
        if weights is not None:
            self.set_weights(weights)

        self.device = widgets.Dropdown(options=choices.device_choices(), description="device", style=STYLE)
        if device in [v for _, v in self.device.options]:
            self.device.value = device
        self.precision = widgets.Dropdown(
            options=choices.precision_choices(self.device.value),
            value=studio.default_precision(self.device.value).value,
            description="base precision",
            style=STYLE,
        )
        self.quantization = widgets.Dropdown(
            options=choices.quant_choices(self.device.value),
            value=QuantMode.DISABLED.value,
            description="quantization",
            style=STYLE,
            layout=widgets.Layout(width="60%"),
        )
        self.attention = widgets.Dropdown(
            options=choices.attention_choices(self.device.value),
            value=AttentionMode.SDPA.value,
            description="attention",
            style=STYLE,
            layout=widgets.Layout(width="60%"),
        )
        self.blocks_to_swap = widgets.IntSlider(
            value=0,
            min=0,
            max=PRESETS[self.preset.value].num_layers,
            description="blocks to swap",
            style=STYLE,
            layout=slider_layout(),
        )
        self.prefetch = widgets.IntSlider(
            value=1, min=0, max=4, description="prefetch", style=STYLE, layout=slider_layout()
        )
        self.swap_auto = widgets.Checkbox(
            value=False,
            description="blocks to swap: as many as the VRAM budget needs",
            indent=True,
            style=STYLE,
            layout=fit_layout(),
        )
        self.vram_budget = widgets.BoundedFloatText(
            value=0.0, min=0.0, max=4096.0, step=0.5, description="VRAM budget GiB (0: free)", style=STYLE
        )
        self.offload_encoders = widgets.Dropdown(
            options=list(EncoderOffload.names()),
            value=EncoderOffload.AUTO.value,
            description="encoders",
            style=STYLE,
        )
        self.text_encoder_device = widgets.Dropdown(
            options=list(TextEncoderDevice.names()),
            value=TextEncoderDevice.AUTO.value,
            description="text encoder runs on",
            style=STYLE,
        )
        self.text_encoder_quantization = widgets.Dropdown(
            options=choices.quant_choices(self.device.value),
            value=QuantMode.DISABLED.value,
            description="text encoder storage",
            style=STYLE,
            layout=widgets.Layout(width="60%"),
        )
        self.memory_notes = widgets.HTML()
        self.loras = widgets.Textarea(
            value="",
            placeholder="one LoRA per line: path.safetensors[:strength]  (merged before quantization)",
            description="LoRAs",
            style=STYLE,
            layout=widgets.Layout(width="90%", height="4em"),
        )
        self.accuracy = widgets.Checkbox(
            value=True,
            description="measure per-layer quantization accuracy",
            indent=True,
            style=STYLE,
            layout=fit_layout(),
        )
        self.load_button = widgets.Button(description="Load", button_style="primary", icon="download")
        self.mode_notes = widgets.HTML()
        self.status = widgets.HTML()
        self.summary_html = widgets.HTML()
        self.report_html = widgets.HTML(layout=widgets.Layout(max_height="420px", overflow="auto"))
        self.modes_html = widgets.HTML()
        modes = widgets.Accordion(children=[self.modes_html], titles=("Every mode on this device",))
        modes.selected_index = None

        self.load_button.on_click(lambda _b: self.load())
        memory = (
            self.swap_auto,
            self.vram_budget,
            self.offload_encoders,
            self.text_encoder_device,
            self.text_encoder_quantization,
        )
        for w in (
            self.precision,
            self.quantization,
            self.attention,
            self.blocks_to_swap,
            self.prefetch,
            *memory,
        ):
            w.observe(lambda _c: self._validate(), "value")
        self.swap_auto.observe(lambda _c: self._swap_auto_changed(), "value")
        self.offload_encoders.observe(lambda _c: self._memory_notes(), "value")
        self.text_encoder_device.observe(lambda _c: self._memory_notes(), "value")
        self.device.observe(lambda _c: self._device_changed(), "value")
        self.preset.observe(lambda _c: self._preset_changed(), "value")

        path_rows = [widgets.HBox([self.paths[n], self.path_status[n]]) for n in PATH_FIELDS]
        self.paths_box = widgets.VBox(path_rows)
        super().__init__(
            [
                heading("Weights"),
                self.preset,
                self.paths_box,
                heading("Modes"),
                self.device,
                self.precision,
                self.quantization,
                self.attention,
                self.blocks_to_swap,
                self.prefetch,
                self.loras,
                heading("Memory"),
                self.swap_auto,
                self.vram_budget,
                self.offload_encoders,
                self.text_encoder_device,
                self.text_encoder_quantization,
                self.memory_notes,
                self.accuracy,
                self.mode_notes,
                widgets.HBox([self.load_button]),
                self.status,
                heading("Loaded model"),
                self.summary_html,
                heading("Quantization accuracy per layer"),
                self.report_html,
                modes,
                table_style("wanstudio-load-panel"),
            ],
            layout=widgets.Layout(width="100%"),
        )
        self.add_class("wanstudio-load-panel")
        self._preset_changed()
        self._device_changed()

    # --- state --------------------------------------------------------------------------------------
    @property
    def pipeline(self):
        """The loaded pipeline (None before a successful load)."""
        return None if self.result is None else self.result.pipeline

    @property
    def model(self):
        return None if self.result is None else self.result.pipeline.model

    def on_loaded(self, callback: Callable[[LoadResult], None]) -> None:
        """Call ``callback(result)`` after every successful load (other panels listen here)."""
        self._callbacks.append(callback)

    def set_weights(self, weights: WeightPaths) -> None:
        """Fill the path fields from ``weights`` (a tuple one path per line, None empty)."""
        for name in PATH_FIELDS:
            value = getattr(weights, name)
            self.paths[name].value = "\n".join(value) if isinstance(value, tuple) else (value or "")

    def weights(self) -> WeightPaths | None:
        """The real weight paths typed in, or None for the tiny preset."""
        if self.preset.value.startswith("tiny"):
            return None
        values = {n: self.paths[n].value.strip() for n in PATH_FIELDS}
        values["dit"] = tuple(line.strip() for line in values["dit"].splitlines() if line.strip())
        return WeightPaths(
            **{k: (v or None) if k in WeightPaths.OPTIONAL else v for k, v in values.items()},
            source="the load panel",
        )

    def settings(self) -> LoadSettings:
        """The settings the controls describe (raises ConfigError when incomplete)."""
        return LoadSettings(
            preset=self.preset.value,
            weights=self.weights(),
            device=self.device.value,
            precision=self.precision.value,
            quantization=self.quantization.value,
            attention=self.attention.value,
            blocks_to_swap="auto" if self.swap_auto.value else self.blocks_to_swap.value,
            prefetch=self.prefetch.value,
            loras=parse_loras(self.loras.value),
            accuracy=self.accuracy.value,
            vram_budget_gb=self.vram_budget.value or None,
            offload_encoders=self.offload_encoders.value,
            text_encoder_device=self.text_encoder_device.value,
            text_encoder_quantization=self.text_encoder_quantization.value,
        )

    # --- reactions ------------------------------------------------------------------------------------
    def _check_path(self, name: str) -> None:
        ok, message = check_path(self.paths[name].value, PATH_FIELDS[name][2])
        kind = "ok" if ok else "info" if ok is None else "error"
        mark = "✓ " if ok else "" if ok is None else "✗ "
        self.path_status[name].value = status_html(mark + message, kind)
        self._validate()

    def _preset_changed(self) -> None:
        tiny = self.preset.value.startswith("tiny")
        for box in self.paths.values():
            box.disabled = tiny
        self.paths_box.layout.display = "none" if tiny else None
        self.blocks_to_swap.max = PRESETS[self.preset.value].num_layers
        for name in PATH_FIELDS:
            self._check_path(name)

    def _device_changed(self) -> None:
        device = self.device.value
        set_options(self.precision, choices.precision_choices(device))
        set_options(self.quantization, choices.quant_choices(device))
        set_options(self.attention, choices.attention_choices(device))
        set_options(self.text_encoder_quantization, choices.quant_choices(device))
        swap = studio.swap_availability(device)
        if not swap.available:
            self.blocks_to_swap.value = 0
            self.swap_auto.value = False
        self.swap_auto.disabled = self.prefetch.disabled = not swap.available
        self._swap_auto_changed()
        self._memory_notes()
        self.modes_html.value = studio.modes_table(device)
        self._validate()

    def _swap_auto_changed(self) -> None:
        self.blocks_to_swap.disabled = self.swap_auto.value or self.swap_auto.disabled

    def _memory_notes(self) -> None:
        """What the two placement choices mean, from the registry."""
        offload = EncoderOffload(self.offload_encoders.value)
        text = TextEncoderDevice(self.text_encoder_device.value)
        self.memory_notes.value = status_html(
            f"encoders {offload.value}: {offload.description}; text encoder {text.value}: {text.description}",
            "info",
        )

    def problems(self) -> list[str]:
        """Why Load would fail now (incomplete paths, modes that cannot run here)."""
        try:
            settings = self.settings()
        except ConfigError as e:
            return [str(e)]
        return settings.problems()

    def _validate(self) -> None:
        if not hasattr(self, "mode_notes"):
            return
        problems = self.problems()
        notes = []
        if not studio.swap_availability(self.device.value).available:
            notes.append(f"block swap: {studio.swap_availability(self.device.value).reason}")
        self.mode_notes.value = "".join(
            [status_html(p, "error") for p in problems] + [status_html(n, "info") for n in notes]
        )
        self.load_button.disabled = bool(problems)
        self.load_button.tooltip = "; ".join(problems) if problems else "Load the pipeline"

    # --- loading -------------------------------------------------------------------------------------
    def load(self) -> LoadResult | None:
        """Load with the current settings (what the Load button does). Errors are shown in the
        panel and kept in ``last_error`` / ``last_traceback``; returns None then."""
        self.load_button.disabled = True
        self.status.value = status_html("Loading…", "busy")
        try:
            settings = self.settings()
            problems = settings.problems()
            if problems:
                raise ConfigError("cannot load with these settings:\n- " + "\n- ".join(problems))
            result = self.loader(settings)
            summary = studio.summarize(result.pipeline, settings, result.seconds)
        except Exception as e:  # shown in the panel: the kernel and the notebook stay usable
            self.last_error, self.last_traceback = e, format_traceback(e)
            self.status.value = error_html(e, "Load failed")
            return None
        finally:
            self._validate()
        self.last_error, self.last_traceback = None, ""
        self.result, self.summary = result, summary
        self.status.value = status_html(f"Loaded {settings.preset} in {result.seconds:.1f} s.", "ok")
        self.summary_html.value = summary._repr_html_()
        self.report_html.value = _html_of(result.report) or status_html(result.report_note or "no report")
        for callback in self._callbacks:
            callback(result)
        return result


def parse_loras(text: str) -> tuple:
    """The LoRA box: one ``path[:strength]`` per line -> :class:`~wanstudio.LoRA` (checked)."""
    from ..lora import LoRA

    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        head, sep, tail = line.rpartition(":")
        try:
            out.append(LoRA(head, float(tail)) if sep and head else LoRA(line))
        except ValueError:  # a ':' inside the path, no strength
            out.append(LoRA(line))
    return tuple(out)
