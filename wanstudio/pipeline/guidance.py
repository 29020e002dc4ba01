"""Text + audio classifier-free guidance for InfiniteTalk (docs/WAN_SPEC.md §6), optional APG.

Three model calls per step (text scale s_t != 1)::

    v = v(¬T,¬A) + s_t [v(T,A) - v(¬T,A)] + s_a [v(¬T,A) - v(¬T,¬A)]

two calls when s_t == 1::

    v = v(T,¬A) + s_a [v(T,A) - v(T,¬A)]

one call when s_t == s_a == 1 (the distilled setting: a step/CFG-distill LoRA was trained to
predict the guided velocity itself)::

    v = v(T,A)

``¬T`` is the negative-prompt embedding, ``¬A`` all-zero audio features. APG (adaptive projected
guidance, arXiv 2410.02416) replaces each guidance difference by its momentum-averaged,
norm-clipped component orthogonal to the conditional prediction.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch

from ..errors import PipelineError


class Condition(Enum):
    """Which conditions a model call sees: (text, audio) on or off."""

    COND = (True, True)  # v(T, A)
    DROP_TEXT = (False, True)  # v(¬T, A)
    UNCOND = (False, False)  # v(¬T, ¬A)
    DROP_AUDIO = (True, False)  # v(T, ¬A)

    @property
    def text(self) -> bool:
        return self.value[0]

    @property
    def audio(self) -> bool:
        return self.value[1]


@dataclass(frozen=True)
class GuidanceConfig:
    """Guidance scales and the APG switch.

    Args:
        text_scale: s_t (5 by default; 1 with a distill LoRA, which saves one call per step).
        audio_scale: s_a (4 by default; 2 with a distill LoRA in InfiniteTalk's README; 1 as
            well makes it one call per step).
        apg: use adaptive projected guidance instead of plain CFG.
        apg_momentum: momentum of the running guidance difference (InfiniteTalk: -0.75).
        apg_norm_threshold: clip the difference's L2 norm to this (0 disables clipping).
    """

    text_scale: float = 5.0
    audio_scale: float = 4.0
    apg: bool = False
    apg_momentum: float = -0.75
    apg_norm_threshold: float = 55.0

    def __post_init__(self) -> None:
        for name in ("text_scale", "audio_scale", "apg_momentum", "apg_norm_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise PipelineError(f"{name} must be a finite number, got {value!r}")

    @property
    def text_free(self) -> bool:
        """s_t == 1: text guidance is a no-op, so the 2-call formula applies."""
        return math.isclose(self.text_scale, 1.0)

    @property
    def guidance_free(self) -> bool:
        """s_t == s_a == 1: both guidance terms vanish, so one call per step is the whole formula."""
        return self.text_free and math.isclose(self.audio_scale, 1.0)

    @property
    def conditions(self) -> tuple[Condition, ...]:
        """Model calls per step, in the order they are made."""
        if self.guidance_free:
            return (Condition.COND,)
        if self.text_free:
            return (Condition.COND, Condition.DROP_AUDIO)
        return (Condition.COND, Condition.DROP_TEXT, Condition.UNCOND)


class MomentumBuffer:
    """Running average ``r <- d + momentum * r`` of a guidance difference (APG)."""

    def __init__(self, momentum: float):
        self.momentum = momentum
        self.average: torch.Tensor | None = None

    def update(self, value: torch.Tensor) -> torch.Tensor:
        """Fold ``value`` into the average (the first value starts it) and return the new average."""
        self.average = value if self.average is None else value + self.momentum * self.average
        return self.average


def projected_guidance(
    diff: torch.Tensor,
    cond: torch.Tensor,
    buffer: MomentumBuffer | None,
    norm_threshold: float,
    eta: float = 0.0,
) -> torch.Tensor:
    """APG: momentum, L2-norm clip, then keep the part of ``diff`` orthogonal to ``cond``.

    diff, cond [B, C, F, H, W]; norms and projections over (C, F, H, W) per sample, in fp64.
    """
    if buffer is not None:
        diff = buffer.update(diff)
    dims = (-1, -2, -3, -4)
    if norm_threshold > 0:
        norm = diff.norm(p=2, dim=dims, keepdim=True)
        diff = diff * torch.clamp(norm_threshold / norm, max=1.0)
    d, c = diff.double(), torch.nn.functional.normalize(cond.double(), dim=dims)
    parallel = (d * c).sum(dim=dims, keepdim=True) * c
    return (d - parallel + eta * parallel).to(diff.dtype)


class Guidance:
    """Combines the per-condition predictions of one sampling step into one velocity.

    Holds the APG momentum buffers, so make one per clip (as InfiniteTalk does).
    """

    def __init__(self, config: GuidanceConfig):
        self.config = config
        self._text_buffer = MomentumBuffer(config.apg_momentum)
        self._audio_buffer = MomentumBuffer(config.apg_momentum)

    @property
    def conditions(self) -> tuple[Condition, ...]:
        return self.config.conditions

    def __call__(self, predict: Callable[[Condition], torch.Tensor]) -> torch.Tensor:
        """Call ``predict`` once per condition (in :attr:`conditions` order) and combine (fp32)."""
        v = {c: predict(c).float() for c in self.conditions}
        return self.combine(v)

    def combine(self, v: dict[Condition, torch.Tensor]) -> torch.Tensor:
        """The guided velocity from the predictions ``v`` (one per condition of :attr:`conditions`):
        plain CFG, or APG when ``config.apg`` (updates the momentum buffers)."""
        cfg = self.config
        s_t, s_a = cfg.text_scale, cfg.audio_scale
        cond = v[Condition.COND]
        if cfg.guidance_free:  # every guidance difference has weight 0 (CFG and APG alike)
            return cond
        if not cfg.apg:
            if cfg.text_free:
                drop_audio = v[Condition.DROP_AUDIO]
                return drop_audio + s_a * (cond - drop_audio)
            drop_text, uncond = v[Condition.DROP_TEXT], v[Condition.UNCOND]
            return uncond + s_t * (cond - drop_text) + s_a * (drop_text - uncond)

        thr = cfg.apg_norm_threshold
        if cfg.text_free:
            audio_diff = cond - v[Condition.DROP_AUDIO]
            return cond + (s_a - 1) * projected_guidance(audio_diff, cond, self._audio_buffer, thr)
        drop_text, uncond = v[Condition.DROP_TEXT], v[Condition.UNCOND]
        text_part = projected_guidance(cond - drop_text, cond, self._text_buffer, thr)
        audio_part = projected_guidance(drop_text - uncond, cond, self._audio_buffer, thr)
        return cond + (s_t - 1) * text_part + (s_a - 1) * audio_part
