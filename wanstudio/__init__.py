"""wanstudio: Wan2.1 and InfiniteTalk from a notebook."""

from .attention import (
    Availability,
    available_attention_modes,
    model_attention_modes,
    rerouted_attention_calls,
    sdpa_kernel_choice,
    set_attention,
)
from .checkpoints import CheckpointInfo, load_model
from .config import PRESETS, WanConfig
from .errors import (
    BackendUnavailableError,
    BlockSwapError,
    CheckpointError,
    ConfigError,
    LayoutError,
    LoraError,
    MediaError,
    PipelineError,
    ShapeError,
    UnknownOptionError,
    UnsupportedModeError,
    WanstudioError,
)
from .fusion import compile_blocks, uncompile_blocks
from .inspector import LayoutReport, LayoutRow, inspect_layout
from .layout import LayoutContract, Operand, StrideRule, is_strict_layout, set_strict_layout, strict_layout
from .lora import LoRA, LoraSet, applied_loras, apply_lora, remove_lora
from .model import ModelInputs, WanModel
from .modes import RuntimeModes, apply_modes
from .offload import BlockSwapStats, disable_block_swap, enable_block_swap, plan_block_swap, swap_placement
from .options import ATTENTION_MODES, QUANT_MODES, AttentionMode, BasePrecision, QuantMode, parse_option
from .pipeline import GeneratedVideo, InfiniteTalkPipeline, ProgressEvent, TqdmProgress, read_input_json
from .quant import (
    DEFAULT_KEEP,
    QuantizedLinear,
    QuantReport,
    dequantize,
    quant_report,
    quantize,
    quantize_weight,
    storage_mode_for,
)

__version__ = "0.1.0"

# Encoders and media pull in transformers / diffusers / ffmpeg: imported on first use, so
# `import wanstudio` (and the CLI's doctor) stays light and GPU boxes without ffmpeg still work.
_LAZY = {
    "TextEncoder": "encoders",
    "ImageEncoder": "encoders",
    "AudioEncoder": "encoders",
    "VAE": "encoders",
    "audio_windows": "encoders",
    "VideoReader": "media",
    "VideoWriter": "media",
    "asset_path": "media",
    "choose_bucket": "media",
    "load_audio": "media",
    "load_image": "media",
    "loudness_normalize": "media",
    "mix_speakers": "media",
    "probe_media": "media",
    "resize_and_crop": "media",
    "write_video": "media",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'wanstudio' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
