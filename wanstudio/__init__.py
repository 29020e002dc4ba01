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
from .encoders import VAE, AudioEncoder, ImageEncoder, TextEncoder, audio_windows
from .errors import (
    BackendUnavailableError,
    BlockSwapError,
    CheckpointError,
    ConfigError,
    LayoutError,
    MediaError,
    PipelineError,
    ShapeError,
    UnknownOptionError,
    UnsupportedModeError,
    WanstudioError,
)
from .inspector import LayoutReport, LayoutRow, inspect_layout
from .layout import LayoutContract, Operand, StrideRule, is_strict_layout, set_strict_layout, strict_layout
from .media import (
    VideoWriter,
    asset_path,
    choose_bucket,
    load_audio,
    load_image,
    loudness_normalize,
    mix_speakers,
    probe_media,
    resize_and_crop,
    write_video,
)
from .model import WanModel
from .offload import BlockSwapStats, disable_block_swap, enable_block_swap, plan_block_swap, swap_placement
from .options import ATTENTION_MODES, QUANT_MODES, AttentionMode, BasePrecision, QuantMode, parse_option
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
