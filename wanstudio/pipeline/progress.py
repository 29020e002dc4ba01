"""Progress reporting for long generations: one event per sampling step and per finished clip.

A callback receives :class:`ProgressEvent` objects. The default, :class:`TqdmProgress`, draws a
``tqdm.auto`` bar (a widget in notebooks, text in a terminal). Pass ``progress=False`` to stay
silent, or any callable to route events elsewhere (a widget, a log, a test).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

EventKind = Literal["start", "step", "clip", "done"]


@dataclass(frozen=True)
class ProgressEvent:
    """Where a generation stands.

    ``clip`` and ``step`` are 1-based ("clip 2 of 5, step 7 of 40"); ``step`` is 0 in "start"
    and "clip" events. ``elapsed`` counts seconds since the call started; ``eta`` estimates the
    seconds left from the steps run so far in this call (None until one step has run).
    """

    kind: EventKind
    clip: int
    clips: int
    step: int
    steps: int
    elapsed: float
    eta: float | None
    frames_done: int = 0  # output frames finished (written) so far
    frames_total: int = 0
    resumed_clips: int = 0  # clips loaded from the work folder instead of generated

    def __str__(self) -> str:
        eta = "?" if self.eta is None else _hms(self.eta)
        where = f"clip {self.clip}/{self.clips}"
        if self.kind == "step":
            where += f", step {self.step}/{self.steps}"
        return (
            f"[{self.kind}] {where}, {self.frames_done}/{self.frames_total} frames, "
            f"elapsed {_hms(self.elapsed)}, eta {eta}"
        )


ProgressCallback = Callable[[ProgressEvent], None]


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class ProgressClock:
    """Turns "step done" / "clip done" into events with elapsed time and an ETA."""

    def __init__(
        self,
        callback: ProgressCallback | None,
        clips: int,
        steps: int,
        frames_total: int,
        resumed_clips: int = 0,
    ):
        self.callback = callback
        self.clips, self.steps, self.frames_total = clips, steps, frames_total
        self.resumed = resumed_clips
        self.start = time.perf_counter()
        self.steps_run = 0  # in this call (resumed clips cost nothing)
        self.frames_done = 0

    def _eta(self, clip: int, step: int) -> float | None:
        if self.steps_run == 0:
            return None
        left = (self.clips - clip) * self.steps + (self.steps - step)
        return (time.perf_counter() - self.start) / self.steps_run * left

    def _emit(self, kind: EventKind, clip: int, step: int, eta: float | None) -> None:
        if self.callback is not None:
            self.callback(
                ProgressEvent(
                    kind=kind,
                    clip=clip,
                    clips=self.clips,
                    step=step,
                    steps=self.steps,
                    elapsed=time.perf_counter() - self.start,
                    eta=eta,
                    frames_done=self.frames_done,
                    frames_total=self.frames_total,
                    resumed_clips=self.resumed,
                )
            )

    def started(self) -> None:
        """Emit "start" (at the first clip still to generate, after any resumed ones)."""
        self._emit("start", min(self.resumed + 1, self.clips), 0, None)

    def step(self, clip: int, step: int) -> None:
        """Emit "step": sampling step ``step`` of clip ``clip`` (both 1-based) has run."""
        self.steps_run += 1
        self._emit("step", clip, step, self._eta(clip, step))

    def clip(self, clip: int, frames_done: int) -> None:
        """Emit "clip": clip ``clip`` (1-based) is finished, ``frames_done`` output frames so far."""
        self.frames_done = frames_done
        self._emit("clip", clip, 0, self._eta(clip, self.steps))

    def done(self) -> None:
        """Emit "done": the whole generation has finished."""
        self._emit("done", self.clips, self.steps, 0.0)


class TqdmProgress:
    """Default callback: a ``tqdm.auto`` bar over all steps of all clips."""

    def __init__(self, desc: str = "InfiniteTalk", **tqdm_kwargs):
        self.desc, self.kwargs = desc, tqdm_kwargs
        self.bar = None

    def __call__(self, event: ProgressEvent) -> None:
        if event.kind == "start":
            from tqdm.auto import tqdm

            self.close()
            self.bar = tqdm(
                total=event.clips * event.steps,
                desc=self.desc,
                unit="step",
                initial=event.resumed_clips * event.steps,
                **self.kwargs,
            )
        if self.bar is None:
            return
        if event.kind == "step":
            self.bar.update(1)
        self.bar.set_postfix_str(
            f"clip {event.clip}/{event.clips}, {event.frames_done}/{event.frames_total} frames", refresh=False
        )
        if event.kind == "done":
            self.close()

    def close(self) -> None:
        """Close the bar, if one is open."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def resolve_progress(progress) -> ProgressCallback | None:
    """``None`` -> a fresh :class:`TqdmProgress`; ``False`` -> silent; a callable -> itself."""
    if progress is None or progress is True:
        return TqdmProgress()
    if progress is False:
        return None
    if not callable(progress):
        raise TypeError(f"progress must be a callable, None or False, got {type(progress).__name__}")
    return progress
