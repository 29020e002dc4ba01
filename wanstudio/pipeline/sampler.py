"""Flow-matching samplers over one shared, shifted timestep schedule (docs/WAN_SPEC.md §6).

Wan predicts the flow velocity ``v = noise - x0`` of the path ``x_sigma = (1 - sigma) x0 +
sigma noise``; sigma runs from 1 (pure noise) down to 0, so one step moves the latent by
``x <- x + v (sigma_next - sigma) = x - v dt`` with ``dt = sigma - sigma_next > 0``.

Both samplers see the same timesteps: ``linspace(1000, 1, steps)`` followed by 0, each shifted by
``t' = s t / (1 + (s - 1) t)`` on ``t / 1000`` (InfiniteTalk's ``timestep_transform``). The
Euler sampler is InfiniteTalk's; UniPC is diffusers' ``UniPCMultistepScheduler`` in its
flow-matching mode, fed the same (unshifted) sigmas so that only the update rule differs.

The distilled sampler is the exception: a step-distill LoRA (lightx2v's, trained with
Self-Forcing-Plus) was trained at a fixed list of timesteps, ``[1000, 750, 500, 250]`` warped
by the shift it was trained with (5), and is sampled with Euler steps between exactly those
points, then to 0. :class:`DistillSampler` follows such a list (``steps`` evenly spaced
``1000 (1 - i / steps)`` by default, which is that list for 4 steps).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import PipelineError
from ..options import Scheduler, parse_option

NUM_TRAIN_TIMESTEPS = 1000


def shift_timesteps(t: torch.Tensor, shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
    """``t' = s t / (1 + (s - 1) t)`` applied on ``t / num_train_timesteps``; same units out."""
    u = t / num_train_timesteps
    return shift * u / (1 + (shift - 1) * u) * num_train_timesteps


def timestep_schedule(steps: int, shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
    """The ``steps + 1`` shifted timesteps in [0, 1000] (last one 0), fp32 like the reference.

    ``steps`` model calls happen at entries ``0 .. steps-1``; entry ``steps`` is the end point.
    """
    check_schedule_args(steps, shift)
    base = np.linspace(num_train_timesteps, 1, steps, dtype=np.float32)
    t = torch.from_numpy(np.append(base, np.float32(0.0)))  # (steps + 1,) fp32
    return shift_timesteps(t, shift, num_train_timesteps)


def check_schedule_args(steps, shift) -> None:
    """Raise PipelineError unless ``steps`` is an integer >= 1 and ``shift`` a finite number > 0."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise PipelineError(f"steps must be an integer >= 1, got {steps!r}")
    if not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
        raise PipelineError(f"shift must be a positive number (7 at 480p, 11 at 720p), got {shift!r}")


class EulerSampler:
    """InfiniteTalk's first-order flow-matching sampler: ``x <- x - v (t_i - t_{i+1}) / 1000``.

    Args:
        steps: number of model evaluations (>= 1).
        shift: timestep shift ``s`` (7 at 480p, 11 at 720p in InfiniteTalk).
    """

    name = Scheduler.EULER

    def __init__(self, steps: int, shift: float):
        self.steps, self.shift = steps, float(shift)
        self.schedule = timestep_schedule(steps, shift)  # (steps + 1,)

    @property
    def timesteps(self) -> torch.Tensor:
        """The ``steps`` timesteps the model is called at, in [0, 1000]."""
        return self.schedule[:-1]

    def step(self, velocity: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """One update from timestep ``i`` to ``i + 1``. Returns a new tensor (x is not touched)."""
        dt = (self.schedule[i] - self.schedule[i + 1]) / NUM_TRAIN_TIMESTEPS  # fp32 scalar
        return x - velocity.to(x.dtype) * dt.to(x.device, x.dtype)


class UniPCSampler:
    """diffusers' UniPC multistep solver in flow-matching mode on the shared schedule.

    The scheduler keeps a history of model outputs, so make one sampler per clip.
    """

    name = Scheduler.UNIPC

    def __init__(self, steps: int, shift: float):
        from diffusers import UniPCMultistepScheduler

        self.steps, self.shift = steps, float(shift)
        self.schedule = timestep_schedule(steps, shift)
        self.scheduler = UniPCMultistepScheduler(
            num_train_timesteps=NUM_TRAIN_TIMESTEPS,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=self.shift,
            solver_order=2,
        )
        # diffusers shifts the sigmas it is given: pass the unshifted ones of the shared schedule
        sigmas = np.linspace(NUM_TRAIN_TIMESTEPS, 1, steps, dtype=np.float64) / NUM_TRAIN_TIMESTEPS
        self.scheduler.set_timesteps(sigmas=sigmas)
        self.scheduler.set_begin_index(0)
        got = self.scheduler.sigmas[:-1].double() * NUM_TRAIN_TIMESTEPS
        if not torch.allclose(got, self.schedule[:-1].double(), atol=1e-2):  # diffusers changed?
            raise PipelineError(
                "diffusers' UniPC scheduler did not reproduce the shared timestep schedule; "
                "use scheduler='euler' or pin diffusers to a version this release was tested with"
            )

    @property
    def timesteps(self) -> torch.Tensor:
        return self.schedule[:-1]

    def step(self, velocity: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """One UniPC update from timestep ``i`` to ``i + 1``, in ``x``'s dtype. The scheduler keeps
        the earlier outputs, so call it for i = 0, 1, ... in order."""
        t = self.scheduler.timesteps[i]
        out = self.scheduler.step(velocity.to(x.dtype), t, x, return_dict=False)[0]
        return out.to(x.dtype)


def distill_step_list(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[float, ...]:
    """``steps`` evenly spaced unshifted timesteps ``T (1 - i / steps)``: for 4 steps the list
    lightx2v's step-distill LoRAs were trained on, ``(1000, 750, 500, 250)``."""
    check_schedule_args(steps, 1.0)
    return tuple(num_train_timesteps * (steps - i) / steps for i in range(steps))


class DistillSampler:
    """Euler flow matching on an explicit list of timesteps (step-distilled models / LoRAs).

    Args:
        steps: number of model evaluations; with ``step_list`` given it must equal its length.
        shift: the shift the distilled model was trained with (lightx2v: 5).
        step_list: unshifted timesteps in (0, 1000], strictly decreasing; each is shifted as in
            :func:`shift_timesteps` (lightx2v's "warped" denoising steps), and the last step
            goes to 0. Default :func:`distill_step_list`.
    """

    name = Scheduler.DISTILL

    def __init__(self, steps: int, shift: float, step_list: tuple[float, ...] | None = None):
        check_schedule_args(steps, shift)
        step_list = distill_step_list(steps) if step_list is None else tuple(step_list)
        if len(step_list) != steps:
            raise PipelineError(f"step_list has {len(step_list)} timesteps but steps={steps}")
        bad = [t for t in step_list if not (isinstance(t, (int, float)) and 0 < t <= NUM_TRAIN_TIMESTEPS)]
        if bad or any(a <= b for a, b in zip(step_list, step_list[1:])):
            raise PipelineError(
                f"step_list must be strictly decreasing timesteps in (0, {NUM_TRAIN_TIMESTEPS}], "
                f"got {list(step_list)}"
            )
        self.steps, self.shift, self.step_list = steps, float(shift), step_list
        t = torch.tensor([*step_list, 0.0], dtype=torch.float64)  # (steps + 1,), end point 0
        self.schedule = shift_timesteps(t, self.shift).float()

    @property
    def timesteps(self) -> torch.Tensor:
        """The ``steps`` shifted timesteps the model is called at, in [0, 1000]."""
        return self.schedule[:-1]

    def step(self, velocity: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """One Euler update from list entry ``i`` to ``i + 1`` (the last one lands on sigma 0)."""
        dt = (self.schedule[i] - self.schedule[i + 1]) / NUM_TRAIN_TIMESTEPS
        return x - velocity.to(x.dtype) * dt.to(x.device, x.dtype)


def make_sampler(
    kind: Scheduler | str, steps: int, shift: float, step_list=None
) -> EulerSampler | UniPCSampler | DistillSampler:
    """A fresh sampler of ``kind`` (a :class:`~wanstudio.options.Scheduler` member or name);
    ``step_list``: the distilled sampler's explicit timesteps (refused for the others)."""
    kind = parse_option(Scheduler, kind)
    check_schedule_args(steps, shift)
    if kind is Scheduler.DISTILL:
        return DistillSampler(steps, shift, None if step_list is None else tuple(step_list))
    if step_list is not None:
        raise PipelineError(
            f"timesteps={list(step_list)} is for scheduler '{Scheduler.DISTILL.value}' (a step-distilled "
            f"LoRA's list); scheduler '{kind.value}' spaces its own. Drop timesteps or pick "
            f"'{Scheduler.DISTILL.value}'."
        )
    return {Scheduler.EULER: EulerSampler, Scheduler.UNIPC: UniPCSampler}[kind](steps, shift)
