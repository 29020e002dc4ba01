"""Timing shared by the benchmark scripts: CUDA events on a GPU, perf_counter elsewhere."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """One call of ``fn``, in milliseconds (device time on CUDA: events around the call)."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


class Timer:
    """Median of ``repeats`` (at least ``min_repeats``) calls after ``warmup`` untimed ones."""

    def __init__(self, device: torch.device, warmup: int = 1, repeats: int = 5, min_repeats: int = 3):
        self.device, self.warmup, self.repeats = torch.device(device), warmup, max(min_repeats, repeats)

    def median_ms(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return statistics.median(time_ms(fn, self.device) for _ in range(self.repeats))
