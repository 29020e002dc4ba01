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
    MediaError,
    PipelineError,
    ShapeError,
    UnknownOptionError,
    UnsupportedModeError,
    WanstudioError,
)
from .layout import strict_layout
from .model import WanModel
from .offload import BlockSwapStats, disable_block_swap, enable_block_swap, plan_block_swap, swap_placement
from .options import ATTENTION_MODES, QUANT_MODES, AttentionMode, BasePrecision, QuantMode, parse_option

__version__ = "0.1.0"
