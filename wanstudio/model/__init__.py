"""The Wan2.1 / InfiniteTalk DiT."""

from .wan import WanModel

__all__ = ["WanModel"]
