"""The Wan2.1 / InfiniteTalk DiT."""

from .inputs import ModelInputs
from .wan import StepState, WanModel

__all__ = ["ModelInputs", "StepState", "WanModel"]
