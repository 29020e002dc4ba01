"""Step caches: TeaCache and MagCache per guidance condition, at the model seam.

A sampling step makes one DiT call per guidance condition (InfiniteTalk: cond, drop-text,
uncond). Per call, a cache runs the blocks or reuses that condition's last *residual* (tokens
out of the last block minus tokens into block 0): ``embed`` and the head always run; a skipped
call returns ``run_head(tokens + residual[key])`` and runs no block (block swap copies nothing).

The pipeline hook (one cache per generation, ``reset()`` at every clip)::

    check_cache_for_steps(mode, steps)                 # before anything expensive
    cache = make_cache(mode, threshold, size_class=size_class)
    for each clip: cache.reset(); then per step i and condition c:
        velocity_c = cache.forward(model, ModelInputs(...for c...), c, i, steps)
    print(cache.summary())                             # DiT calls computed / skipped per condition

``forward`` calls ``model(**inputs)`` with ``model.run_blocks`` replaced on the instance for
that call only, so the model's forward stays the entry point: block swap's step hooks, strict
layout, compiled blocks and every quantization mode see an ordinary forward. A wrapper already
on the instance (sequence parallelism) is wrapped in turn: the cache decides on the whole
sequence, once for all ranks.

What is skipped, honestly:

* TeaCache with ``e0`` / ``e`` (the published Wan indicators): both depend on the timestep only,
  so the skip pattern follows the schedule, the same for every condition and clip. ``modulated``
  (block 0's modulated input, the TeaCache paper's signal) looks at the latents, but no Wan
  polynomial is published for it, and the conditions of a step share their latents (text and
  audio enter later), so they still skip together, each with its own residual.
* MagCache's ratios were measured by its authors on Wan2.1 i2v (their script: UniPC, shift 3 at
  480p); its skip pattern is fixed by the step count. No InfiniteTalk ratios are published.
* Both always run the first steps and the last step (the published code may skip the last).
* When block 0 itself is swapped, block swap's model pre-hook starts its copy before the cache
  decides; on a skipped step that one copy goes unused.

Sources (numbers only; the code is ours): TeaCache coefficients from MeiGen-AI/InfiniteTalk
``wan/modules/multitalk_model.py`` ``teacache_init`` (``infinitetalk-480`` / ``-720``; the ``e``
ones also in ali-vilab/TeaCache ``TeaCache4Wan2.1`` for I2V-14B-480P / 720P). MagCache ratios
and defaults from Zehong-Ma/MagCache ``MagCache4Wan2.1/magcache_generate.py`` (480P / 720P
``mag_ratios``; ``--magcache_thresh 0.12 --magcache_K 2 --retention_ratio 0.2``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .errors import PipelineError
from .model import ModelInputs, StepState, WanModel
from .options import CacheMode, SizeClass, TeaCacheIndicator, parse_option

# --- published numbers -------------------------------------------------------------------------
# TeaCache rescale polynomials, highest power first (np.poly1d order), for Wan2.1 i2v 14B.
# E0: fitted on the relative L1 change of e0 ("use_ret_steps=True", 5 retained steps);
# E: fitted on e (no retained steps). Source: InfiniteTalk teacache_init / TeaCache4Wan2.1.
_E0, _E, _480, _720 = TeaCacheIndicator.E0, TeaCacheIndicator.E, SizeClass.P480, SizeClass.P720
TEACACHE_COEFFICIENTS: dict[tuple[TeaCacheIndicator, SizeClass], tuple[float, ...]] = {
    (_E0, _480): (2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01),
    (_E0, _720): (8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02),
    (_E, _480): (-3.02331670e02, 2.23948934e02, -5.25463970e01, 5.87348440e00, -2.01973289e-01),
    (_E, _720): (-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683),
}  # fmt: skip
# the first step TeaCache may skip: the published ret_steps (5 with e0, 1 without)
TEACACHE_START_STEP = {TeaCacheIndicator.E0: 5, TeaCacheIndicator.E: 1, TeaCacheIndicator.MODULATED: 1}

# MagCache mean residual-magnitude ratios ||r_i|| / ||r_{i-1}||, Wan2.1 I2V 14B, 40 steps, in the
# published order (cond, uncond) for steps 1 .. 39; the published list starts with a [1.0, 1.0]
# pad for step 0, which has no previous step.
MAGCACHE_CALIBRATION_STEPS = 40
MAGCACHE_RATIOS: dict[SizeClass, tuple[float, ...]] = {
    SizeClass.P480: (
        0.98783, 0.98993, 0.97559, 0.97593, 0.98311, 0.98319, 0.98202, 0.98225, 0.9888, 0.98878,
        0.98762, 0.98759, 0.98957, 0.98971, 0.99052, 0.99043, 0.99383, 0.99384, 0.98857, 0.9886,
        0.99065, 0.99068, 0.98845, 0.98847, 0.99057, 0.99057, 0.98957, 0.98961, 0.98601, 0.9861,
        0.98823, 0.98823, 0.98756, 0.98759, 0.98808, 0.98814, 0.98721, 0.98724, 0.98571, 0.98572,
        0.98543, 0.98544, 0.98157, 0.98165, 0.98411, 0.98413, 0.97952, 0.97953, 0.98149, 0.9815,
        0.9774, 0.97742, 0.97825, 0.97826, 0.97355, 0.97361, 0.97085, 0.97087, 0.97056, 0.97055,
        0.96588, 0.96587, 0.96113, 0.96124, 0.9567, 0.95681, 0.94961, 0.94969, 0.93973, 0.93988,
        0.93217, 0.93224, 0.91878, 0.91896, 0.90955, 0.90954, 0.92617, 0.92616,
    ),
    SizeClass.P720: (
        0.99428, 0.99498, 0.98588, 0.98621, 0.98273, 0.98281, 0.99018, 0.99023, 0.98911, 0.98917,
        0.98646, 0.98652, 0.99454, 0.99456, 0.9891, 0.98909, 0.99124, 0.99127, 0.99102, 0.99103,
        0.99215, 0.99212, 0.99515, 0.99515, 0.99576, 0.99572, 0.99068, 0.99072, 0.99097, 0.99097,
        0.99166, 0.99169, 0.99041, 0.99042, 0.99201, 0.99198, 0.99101, 0.99101, 0.98599, 0.98603,
        0.98845, 0.98844, 0.98848, 0.98851, 0.98862, 0.98857, 0.98718, 0.98719, 0.98497, 0.98497,
        0.98264, 0.98263, 0.98389, 0.98393, 0.97938, 0.9794, 0.97535, 0.97536, 0.97498, 0.97499,
        0.973, 0.97301, 0.96827, 0.96828, 0.96261, 0.96263, 0.95335, 0.9534, 0.94649, 0.94655,
        0.93397, 0.93414, 0.91636, 0.9165, 0.89088, 0.89109, 0.8679, 0.86768,
    ),
}  # fmt: skip

# Below this many steps caching is refused (see check_cache_for_steps).
MIN_CACHE_STEPS = 10


def rescale(coefficients: tuple[float, ...], x: float) -> float:
    """The polynomial ``coefficients`` (highest power first, as np.poly1d) at x, by Horner."""
    y = 0.0
    for c in coefficients:
        y = y * x + c
    return y


def mag_ratios_for(steps: int, size_class: SizeClass | str = SizeClass.P480) -> tuple[tuple[float, ...], ...]:
    """The published MagCache ratios mapped to ``steps`` steps: (cond series, uncond series).

    Each series has ``steps`` entries, entry 0 = 1.0 (no previous step); at 40 steps the
    published numbers. Otherwise the ratio between our steps k-1 and k is the product of the
    published ratios they span: the cumulative log-magnitude curve, interpolated linearly in the
    sampling progress u = step / (steps - 1) (same u, same timestep, for one shift). The
    published code picks the nearest single-step ratio instead (at 20 steps: half the change).
    """
    return _mapped(MAGCACHE_RATIOS[parse_option(SizeClass, size_class)], steps)


def _mapped(interleaved: tuple[float, ...], steps: int) -> tuple[tuple[float, ...], ...]:
    """(cond, uncond) for ``steps`` steps from 40-step ratios of steps 1 .. 39, interleaved."""
    out = []
    for series in (interleaved[0::2], interleaved[1::2]):  # (39,) each: steps 1 .. 39 of 40
        if steps == MAGCACHE_CALIBRATION_STEPS:
            out.append((1.0, *series))
            continue
        grid = np.linspace(0.0, 1.0, MAGCACHE_CALIBRATION_STEPS)  # u of the 40 calibration steps
        curve = np.concatenate([[0.0], np.cumsum(np.log(series))])  # log ||r|| relative to step 0
        logs = np.interp(np.linspace(0.0, 1.0, steps), grid, curve)  # (steps,)
        out.append((1.0, *(float(v) for v in np.exp(np.diff(logs)))))
    return tuple(out)


def check_cache_for_steps(mode: CacheMode | str, steps: int) -> None:
    """Refuse a step cache for fewer than :data:`MIN_CACHE_STEPS` steps (PipelineError): the
    distilled 4-step setting (and FusionX's 8) has nothing safe to skip (the message says why)."""
    mode = parse_option(CacheMode, mode)
    if mode is not CacheMode.NONE and steps < MIN_CACHE_STEPS:
        raise PipelineError(
            f"cache={mode.value!r} needs at least {MIN_CACHE_STEPS} sampling steps, got {steps}: "
            f"with so few steps (a step/CFG-distilled LoRA's 4, FusionX's 8) each step moves the "
            f"timestep a long way, so consecutive outputs are far apart; the published TeaCache "
            f"coefficients and MagCache ratios were calibrated on 40-step schedules; and the first "
            f"steps and the last step always run, which leaves nothing (at 4 steps) or one step to "
            f"skip. Use cache='none' with distilled settings."
        )


# --- what a cache reports ----------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    """One DiT call: whether the blocks ran, and why; ``value`` is the accumulated quantity
    compared with the threshold (TeaCache: rescaled distance; MagCache: ratio error) or None."""

    key: Hashable
    step: int
    computed: bool
    value: float | None
    reason: str


def _label(key: Hashable) -> str:
    return str(getattr(key, "name", key)).lower()


@dataclass(frozen=True)
class CacheSummary:
    """DiT calls computed vs skipped.

    Attributes:
        mode / threshold / detail: the cache and its settings, in words.
        clips: clips (resets with at least one call) seen since the cache was made.
        computed / skipped: calls per key that ran the blocks / reused the residual, all clips.
        decisions: every call of the current clip, in order.
        content_dependent: False when the skip pattern depends on the step schedule only.
    """

    mode: CacheMode
    threshold: float
    detail: str
    clips: int
    computed: dict[Hashable, int]
    skipped: dict[Hashable, int]
    decisions: tuple[Decision, ...]
    content_dependent: bool

    @property
    def calls(self) -> int:
        return sum(self.computed.values()) + sum(self.skipped.values())

    @property
    def skipped_calls(self) -> int:
        return sum(self.skipped.values())

    def skipped_steps(self, key: Hashable) -> tuple[int, ...]:
        """The steps of the current clip where ``key``'s call skipped the blocks."""
        return tuple(d.step for d in self.decisions if d.key == key and not d.computed)

    def __str__(self) -> str:
        n, s = self.calls, self.skipped_calls
        share = f" ({100 * s / n:.0f}%)" if n else ""
        per_key = ", ".join(
            f"{_label(k)} {self.computed.get(k, 0)}/{self.skipped.get(k, 0)}"
            for k in dict.fromkeys([*self.computed, *self.skipped])
        )
        text = f"{self.mode.value} ({self.detail}): {n - s} of {n} DiT calls computed, {s} skipped{share}"
        if per_key:
            text += f"; computed/skipped per condition: {per_key}"
        if self.mode is not CacheMode.NONE and not self.content_dependent:
            text += "; the skip pattern follows the step schedule only"
        return text


@runtime_checkable
class StepCache(Protocol):
    """What the pipeline calls: see the module docstring for the hook."""

    mode: CacheMode
    threshold: float

    def forward(
        self, model: WanModel, inputs: ModelInputs, key: Hashable, step: int, steps: int
    ) -> torch.Tensor:
        """One DiT call for condition ``key`` at step ``step`` (0-based) of ``steps``."""

    def reset(self) -> None:
        """Start a new clip: forget every residual and accumulator."""

    def summary(self) -> CacheSummary:
        """DiT calls computed / skipped so far, per condition."""


# --- the shared machinery ----------------------------------------------------------------------
@dataclass
class _KeyState:
    """Per condition: where it is in the clip, its residual and its accumulators."""

    steps: int
    last_step: int = -1
    residual: torch.Tensor | None = None  # [B, L, D] in the tokens' dtype
    previous: torch.Tensor | None = None  # TeaCache: last indicator
    accumulated: float = 0.0  # TeaCache: rescaled distance; MagCache: ratio error
    ratio: float = 1.0  # MagCache: product of ratios since the last computed step
    run: int = 0  # MagCache: steps accumulated since the last computed step


@contextmanager
def _run_blocks_replaced(model: WanModel, make: Callable[[Callable], Callable]) -> Iterator[None]:
    """``model.run_blocks`` = ``make(current run_blocks)`` on the instance, for one call."""
    attrs = model.__dict__
    had, before = "run_blocks" in attrs, attrs.get("run_blocks")
    attrs["run_blocks"] = make(model.run_blocks)
    try:
        yield
    finally:
        if had:
            attrs["run_blocks"] = before
        else:
            attrs.pop("run_blocks", None)


class _Cache:
    """Bookkeeping shared by the caches: call checks, the run_blocks wrapper, the summary."""

    mode = CacheMode.NONE
    content_dependent = False

    def __init__(self, threshold: float):
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not 0 <= threshold < math.inf
        ):
            raise PipelineError(f"cache threshold must be a finite number >= 0, got {threshold!r}")
        self.threshold = float(threshold)
        self._keys: dict[Hashable, _KeyState] = {}
        self._decisions: list[Decision] = []
        self._totals: tuple[dict, dict] = ({}, {})  # calls per key: (computed, skipped), all clips
        self._clips = 0

    # subclasses: whether this call wants to skip (accumulating as it goes), and resets
    def _decide(
        self, model, ks: _KeyState, key, tokens, state: StepState, step: int
    ) -> tuple[bool, float | None, str]:
        return False, None, "no cache"

    def _computed(self, ks: _KeyState) -> None:
        """A call ran the blocks: restart the accumulators."""

    @property
    def detail(self) -> str:
        return "off"

    def reset(self) -> None:
        """Start a new clip: residuals, accumulators and this clip's decisions are dropped
        (the totals in :meth:`summary` keep counting)."""
        self._keys.clear()
        self._decisions.clear()

    def summary(self) -> CacheSummary:
        """Calls computed / skipped per key (all clips) and this clip's decisions."""
        return CacheSummary(
            self.mode,
            self.threshold,
            self.detail,
            self._clips,
            dict(self._totals[0]),
            dict(self._totals[1]),
            tuple(self._decisions),
            self.content_dependent,
        )

    def _check_call(self, key: Hashable, step: int, steps: int) -> None:
        for name, value in (("steps", steps), ("step", step)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise PipelineError(f"{name} must be an integer, got {value!r}")
        if not 0 <= step < steps:
            raise PipelineError(f"step must be in [0, steps) = [0, {steps}), got {step}")
        if self.mode is not CacheMode.NONE:
            check_cache_for_steps(self.mode, steps)
        ks = self._keys.get(key)
        if ks is not None and (ks.steps != steps or step <= ks.last_step):
            raise PipelineError(
                f"cache call for {_label(key)} at step {step} of {steps} after step {ks.last_step} of "
                f"{ks.steps}: within a clip each condition's steps run forward. Call cache.reset() "
                f"before every clip."
            )

    def forward(
        self, model: WanModel, inputs: ModelInputs, key: Hashable, step: int, steps: int
    ) -> torch.Tensor:
        """``model(**inputs)``, its blocks run or skipped for condition ``key`` at step ``step``.

        Returns the velocity [B, out_dim, F, H, W] fp32, as ``WanModel.forward``. Raises
        PipelineError for a step that does not move forward within a clip (call :meth:`reset`
        at every clip) or a step count below :data:`MIN_CACHE_STEPS`.
        """
        self._check_call(key, step, steps)
        decided = []

        def wrap(inner):
            def run_blocks(tokens, state, start=0, stop=None):
                if start != 0 or stop is not None:  # a part of the blocks: not a whole step
                    return inner(tokens, state, start, stop)
                decided.append(True)
                return self._step(model, inner, tokens, state, key, step, steps)

            return run_blocks

        with _run_blocks_replaced(model, wrap):
            out = model(**inputs.as_kwargs())
        if not decided:
            raise PipelineError(
                f"{type(model).__name__}.forward never called run_blocks: a step cache needs a "
                "WanModel (embed -> run_blocks -> run_head)"
            )
        return out

    def _step(self, model, inner, tokens: torch.Tensor, state: StepState, key, step: int, steps: int):
        if not self._keys and not self._decisions:
            self._clips += 1
        ks = self._keys.setdefault(key, _KeyState(steps))
        skip, value, reason = self._decide(model, ks, key, tokens, state, step)
        usable = ks.residual is not None and ks.residual.shape == tokens.shape
        if skip and not usable:
            skip, reason = False, "no residual of this shape cached yet"
        ks.last_step = step
        if skip:
            out = tokens + ks.residual
        else:
            out = inner(tokens, state)
            if self.threshold > 0:  # threshold 0 never skips: keep nothing
                ks.residual = out - tokens
            self._computed(ks)
        tally = self._totals[skip]
        tally[key] = tally.get(key, 0) + 1
        self._decisions.append(Decision(key, step, not skip, value, reason))
        return out


# --- the caches ----------------------------------------------------------------------------------
class NoCache(_Cache):
    """Every call runs every block (``cache='none'``); still counts calls for the summary."""

    def __init__(self):
        super().__init__(0.0)


def _relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """mean |current - previous| / mean |previous| (fp32 accumulation), as a Python float."""
    d = (current - previous).abs().mean(dtype=torch.float32).item()
    b = previous.abs().mean(dtype=torch.float32).item()
    if b == 0:
        return 0.0 if d == 0 else math.inf
    return d / b


class TeaCache(_Cache):
    """TeaCache (Liu et al. 2024) per condition key.

    Each call computes its indicator's relative L1 change since that key's previous call,
    rescales it with the polynomial and adds it to the key's accumulator: under ``threshold``
    the call reuses the key's residual; otherwise it runs the blocks and the accumulator restarts
    at 0. Steps before ``start_step`` and the last step always run (accumulator 0). The
    indicator's previous value is updated on every call, skipped or not (as published).

    Args:
        threshold: default 0.2 (InfiniteTalk's). 0 never skips.
        indicator: ``e0`` (default; the published coefficients with ``use_ret_steps``), ``e``,
            or ``modulated`` (block 0's LN(x)(1 + scale) + shift; no published polynomial, so
            the raw relative L1 accumulates unless ``coefficients`` are given).
        size_class: "480" or "720": which published polynomial.
        start_step: the first step that may be skipped (default 5 for e0, else 1).
        coefficients: a polynomial to use instead (highest power first).
    """

    mode = CacheMode.TEACACHE

    def __init__(
        self,
        threshold: float = CacheMode.TEACACHE.default_threshold,
        *,
        indicator: TeaCacheIndicator | str = TeaCacheIndicator.E0,
        size_class: SizeClass | str = SizeClass.P480,
        start_step: int | None = None,
        coefficients: tuple[float, ...] | None = None,
    ):
        super().__init__(threshold)
        self.indicator = parse_option(TeaCacheIndicator, indicator)
        self.size_class = parse_option(SizeClass, size_class)
        self.start_step = TEACACHE_START_STEP[self.indicator] if start_step is None else start_step
        if isinstance(self.start_step, bool) or not isinstance(self.start_step, int) or self.start_step < 0:
            raise PipelineError(f"start_step must be an integer >= 0, got {start_step!r}")
        if coefficients is None:
            coefficients = TEACACHE_COEFFICIENTS.get((self.indicator, self.size_class), (1.0, 0.0))
        self.coefficients = tuple(float(c) for c in coefficients)
        self.content_dependent = self.indicator is TeaCacheIndicator.MODULATED

    @property
    def detail(self) -> str:
        s = self
        return (
            f"{s.indicator.value}, {s.size_class.value}p, threshold {s.threshold:g}, from step {s.start_step}"
        )

    def indicator_of(self, model: WanModel, tokens: torch.Tensor, state: StepState) -> torch.Tensor:
        """The compared signal: e0 [B, 6, D], e [B, D] (fp32), or block 0's modulated input
        [B, L, D] in the tokens' dtype (bit for bit what block 0's self-attention receives)."""
        if self.indicator is TeaCacheIndicator.E0:
            return state.e0
        if self.indicator is TeaCacheIndicator.E:
            return state.e
        block = model.blocks[0]
        # block 0's own arithmetic (WanBlock.forward); its modulation may sit on the host (swapped)
        mod = block.modulation.float().to(state.e0.device) + state.e0  # (B, 6, D)
        return block.norm1.modulate(tokens, mod[:, 0:1], mod[:, 1:2])  # shift, scale (B, 1, D)

    def _decide(self, model, ks, key, tokens, state, step):
        if self.threshold <= 0:
            return False, None, "threshold 0"
        current = self.indicator_of(model, tokens, state)
        previous, ks.previous = ks.previous, current
        if step < self.start_step:
            return False, None, f"step < start_step {self.start_step}"
        if step == ks.steps - 1:
            return False, None, "last step"
        if previous is None or previous.shape != current.shape:
            return False, None, "no previous call of this shape"
        value = rescale(self.coefficients, _relative_l1(current, previous))
        if not math.isfinite(value):
            return False, None, "indicator change not finite"
        ks.accumulated += value
        skip = ks.accumulated < self.threshold
        sign = "<" if skip else ">="
        return skip, ks.accumulated, f"accumulated {ks.accumulated:.4g} {sign} {self.threshold:g}"

    def _computed(self, ks):
        ks.accumulated = 0.0


class MagCache(_Cache):
    """MagCache (Ma et al. 2025) per condition key.

    From step ``ceil(retention_ratio * steps)`` on, each call multiplies the key's ratio by the
    step's published magnitude ratio, adds ``|1 - ratio|`` to its error and counts the step:
    while the error is under ``threshold`` and at most ``max_skip_steps`` steps were counted,
    the call reuses the residual; otherwise it runs the blocks and ratio, error and count
    restart (1, 0, 0). The last step always runs.

    Ratios per condition: the first key called after a reset (the pipeline's COND) reads the
    published conditional series, every other key (drop-text, uncond, drop-audio) the
    unconditional one (``cond_key`` names it explicitly). Steps: :func:`mag_ratios_for`.

    Args:
        threshold: default 0.12; max_skip_steps: default 2 (K); retention_ratio: default 0.2
            (MagCache4Wan2.1's argparse defaults; its README's i2v 480p demo runs 0.24 / K 6).
        size_class: "480" or "720": which published ratios.
        ratios: (cond, uncond) ratios per step for 40 steps, instead of the published ones
            (e.g. measured on InfiniteTalk), each 40 long with entry 0 = 1.
    """

    mode = CacheMode.MAGCACHE

    def __init__(
        self,
        threshold: float = CacheMode.MAGCACHE.default_threshold,
        *,
        max_skip_steps: int = 2,
        retention_ratio: float = 0.2,
        size_class: SizeClass | str = SizeClass.P480,
        ratios: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
        cond_key: Hashable | None = None,
    ):
        super().__init__(threshold)
        if isinstance(max_skip_steps, bool) or not isinstance(max_skip_steps, int) or max_skip_steps < 0:
            raise PipelineError(f"max_skip_steps must be an integer >= 0, got {max_skip_steps!r}")
        if isinstance(retention_ratio, bool) or not 0 <= retention_ratio <= 1:
            raise PipelineError(f"retention_ratio must be in [0, 1], got {retention_ratio!r}")
        self.max_skip_steps, self.retention_ratio = max_skip_steps, float(retention_ratio)
        self.size_class = parse_option(SizeClass, size_class)
        if ratios is not None:
            if len(ratios) != 2 or any(len(r) != MAGCACHE_CALIBRATION_STEPS for r in ratios):
                raise PipelineError(f"ratios must be (cond, uncond), each {MAGCACHE_CALIBRATION_STEPS} long")
            ratios = tuple(tuple(float(v) for v in r) for r in ratios)
        self._ratios = ratios
        self._cond_key, self._explicit_cond = cond_key, cond_key is not None
        self._series: dict[int, tuple[tuple[float, ...], ...]] = {}

    @property
    def detail(self) -> str:
        s = self
        return (
            f"{s.size_class.value}p, threshold {s.threshold:g}, K {s.max_skip_steps}, R {s.retention_ratio:g}"
        )

    def first_skippable_step(self, steps: int) -> int:
        """The first step that may be skipped, ``ceil(retention_ratio * steps)``; earlier ones compute."""
        return math.ceil(self.retention_ratio * steps - 1e-9)

    def ratios_for(self, steps: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(cond, uncond) ratio per step for ``steps`` steps (see :func:`mag_ratios_for`)."""
        if steps not in self._series:
            if self._ratios is None:
                self._series[steps] = mag_ratios_for(steps, self.size_class)
            else:  # the given 40-step ratios, mapped like the published ones
                given = tuple(v for pair in zip(self._ratios[0][1:], self._ratios[1][1:]) for v in pair)
                self._series[steps] = _mapped(given, steps)
        return self._series[steps]

    def reset(self) -> None:
        """As :meth:`_Cache.reset`; a conditional key not given explicitly is learnt again next clip."""
        super().reset()
        if not self._explicit_cond:
            self._cond_key = None

    def _decide(self, model, ks, key, tokens, state, step):
        if self._cond_key is None:
            self._cond_key = key
        if self.threshold <= 0:
            return False, None, "threshold 0"
        if step < self.first_skippable_step(ks.steps):
            return False, None, f"retained step (retention_ratio {self.retention_ratio:g})"
        if step == ks.steps - 1:
            return False, None, "last step"
        cond, uncond = self.ratios_for(ks.steps)
        ks.ratio *= (cond if key == self._cond_key else uncond)[step]
        ks.run += 1
        ks.accumulated += abs(1.0 - ks.ratio)
        under = ks.accumulated < self.threshold
        why = f"error {ks.accumulated:.4g} {'<' if under else '>='} {self.threshold:g}"
        return (
            under and ks.run <= self.max_skip_steps,
            ks.accumulated,
            f"{why}, run {ks.run} (K {self.max_skip_steps})",
        )

    def _computed(self, ks):
        ks.ratio, ks.accumulated, ks.run = 1.0, 0.0, 0


def make_cache(mode: CacheMode | str, threshold: float | None = None, **options) -> StepCache:
    """The cache for ``mode`` (a :class:`~wanstudio.options.CacheMode` or its name).

    ``threshold`` None takes ``mode.default_threshold``; ``options`` go to :class:`TeaCache`
    (indicator, size_class, start_step, coefficients) or :class:`MagCache` (max_skip_steps,
    retention_ratio, size_class, ratios, cond_key). ``cache='none'`` takes no options.
    """
    mode = parse_option(CacheMode, mode)
    if mode is CacheMode.NONE:
        if options:
            raise PipelineError(f"cache='none' takes no options, got {sorted(options)}")
        return NoCache()
    threshold = mode.default_threshold if threshold is None else threshold
    kind = TeaCache if mode is CacheMode.TEACACHE else MagCache
    try:
        return kind(threshold, **options)
    except TypeError as e:
        raise PipelineError(f"cache={mode.value!r}: {e}") from None
