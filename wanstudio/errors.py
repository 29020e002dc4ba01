"""Exception types. Every error wanstudio raises on purpose is one of these.

Messages follow one pattern: what was wanted, what was found, what to do.
"""

from __future__ import annotations


class WanstudioError(Exception):
    """Base class of every error raised on purpose by wanstudio."""


class UnknownOptionError(WanstudioError, ValueError):
    """A user-facing option string is not a known mode name."""


class ConfigError(WanstudioError, ValueError):
    """A WanConfig (or a config inferred from a checkpoint) is inconsistent."""


class ShapeError(WanstudioError, ValueError):
    """An input tensor has the wrong shape for the model or pipeline."""


class CheckpointError(WanstudioError):
    """A checkpoint file is missing, corrupt, of the wrong kind, or does not fit the model."""


class LoraError(CheckpointError):
    """A LoRA file is not a LoRA, is in a format wanstudio cannot map, or does not fit the model."""


class UnsupportedModeError(WanstudioError, RuntimeError):
    """A quantization / precision mode cannot run on this device."""


class BackendUnavailableError(WanstudioError, RuntimeError):
    """An attention backend cannot run here (package missing, GPU too old, dtype, ...)."""


class LayoutError(WanstudioError, RuntimeError):
    """A tensor violates the layout contract of the kernel it is about to reach."""


class BlockSwapError(WanstudioError, RuntimeError):
    """Block swap was asked for something it cannot do here."""


class MediaError(WanstudioError, ValueError):
    """An image / audio / video file cannot be read or written as asked."""


class PipelineError(WanstudioError, RuntimeError):
    """Generation cannot start or cannot continue (bad inputs, NaN latents, OOM)."""
