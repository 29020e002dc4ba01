"""Timing shared by the benchmark scripts (one implementation, in ``wanstudio.bench``)."""

from wanstudio.bench import Timer, time_ms

__all__ = ["Timer", "time_ms"]
