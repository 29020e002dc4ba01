"""wanstudio: Wan2.1 and InfiniteTalk from a notebook."""

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
from .options import ATTENTION_MODES, QUANT_MODES, AttentionMode, BasePrecision, QuantMode, parse_option

__version__ = "0.1.0"
