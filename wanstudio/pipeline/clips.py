"""The clips of a long video: which frames each covers, and the loop that samples them.

docs/WAN_SPEC.md §6: clip k starts ``k (frame_num - motion_frame)`` frames in and is conditioned
on the previous clip's last ``motion_frame`` decoded (colour-matched) frames, re-encoded to clean
latents that overwrite the head of the latent before every model call and after every update.
Each finished clip is decoded, colour-matched to the reference, appended to the mp4 and saved
to the work folder; finished clips of a broken run are read back instead of sampled again.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field

import torch

from ..cache import make_cache
from ..errors import PipelineError
from ..model import ModelInputs
from ..options import CacheMode, QuantMode, Scheduler
from .color import match_colors
from .conditioning import FPS, SAMPLE_RATE, Conditioning, device_of
from .guidance import Condition, Guidance, GuidanceConfig
from .progress import ProgressClock
from .resume import ClipRecord, WorkFolder
from .sampler import make_sampler

log = logging.getLogger(__name__)


# --- the clip plan ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClipPlan:
    """Which audio frames each clip covers and which of its frames reach the output.

    Clip k covers audio frames ``[start(k), start(k) + frame_num)`` with
    ``start(k) = k (frame_num - motion_frame)``; clips after the first drop their first
    ``motion_frame`` frames (they re-draw the previous clip's tail). The output has
    ``total_frames = min(audio_frames, max_frames)`` frames.
    """

    audio_frames: int
    total_frames: int
    frame_num: int
    motion_frame: int
    clips: int

    @classmethod
    def make(cls, audio_frames: int, frame_num: int, motion_frame: int, max_frames: int) -> ClipPlan:
        """The plan for ``audio_frames`` of audio, the output capped at ``max_frames`` frames."""
        total = min(audio_frames, max_frames)
        stride = frame_num - motion_frame
        clips = 1 if total <= frame_num else 1 + math.ceil((total - frame_num) / stride)
        return cls(audio_frames, total, frame_num, motion_frame, clips)

    def start(self, k: int) -> int:
        """First audio frame of clip k: ``k (frame_num - motion_frame)``."""
        return k * (self.frame_num - self.motion_frame)

    def end(self, k: int) -> int:
        """One past the last audio frame of clip k (``start(k) + frame_num``)."""
        return self.start(k) + self.frame_num

    def dropped(self, k: int) -> int:
        """Leading frames of clip k that do not reach the output."""
        return 0 if k == 0 else self.motion_frame

    def kept(self, k: int) -> int:
        """Frames clip k adds to the output (the last clip is trimmed to the audio length)."""
        return min(self.end(k), self.total_frames) - (self.start(k) + self.dropped(k))

    def frames_after(self, k: int) -> int:
        """Output frames finished once clip k is written (clips 0..k)."""
        return min(self.end(k), self.total_frames)


@dataclass(frozen=True)
class ClipSampling:
    """How every clip of a call is sampled (checked by the call before any work)."""

    steps: int
    shift: float
    scheduler: Scheduler
    guidance: GuidanceConfig
    tiled_vae: bool | str = "auto"  # VAE in tiles: True, False, "auto" (when it would not fit)
    cache: CacheMode = CacheMode.NONE  # step cache over the DiT calls (cache.py)
    cache_threshold: float | None = None  # None: the mode's default
    timesteps: tuple[float, ...] | None = None  # the distilled sampler's explicit list
    # what the last call's cache did, for the result's summary (set by run_clips)
    last_cache_summary: object = field(default=None, compare=False)


# --- the loop ---------------------------------------------------------------------------------------
def run_clips(
    pipe,
    plan: ClipPlan,
    cond: Conditioning,
    ref: torch.Tensor,
    work: WorkFolder,
    callback,
    sampling: ClipSampling,
    *,
    out,
    mixed,
    seed: int,
    color_correction: float,
    keep_frames: bool,
) -> list[torch.Tensor]:
    """Every clip of ``plan`` in order: finished ones from ``work``, the rest sampled.

    Each new clip is colour-matched to ``ref`` [3, H, W], written to ``out`` (with ``mixed``,
    the 16 kHz speech, cut to the video's length) and saved to ``work``. Returns the uint8
    [T_k, H, W, 3] frames of every clip when ``keep_frames``, else an empty list.
    """
    clock = ProgressClock(
        callback, plan.clips, sampling.steps, plan.total_frames, resumed_clips=work.finished
    )
    generator = torch.Generator(device="cpu").manual_seed(seed)
    step_cache = (
        None if sampling.cache is CacheMode.NONE else make_cache(sampling.cache, sampling.cache_threshold)
    )
    motion = None  # fp32 (3, m, H, W): the previous clip's tail
    kept: list[torch.Tensor] = []
    writer = None
    if out is not None:
        from ..media import VideoWriter

        audio_out = mixed[: int(round(plan.total_frames / FPS * SAMPLE_RATE))]
        writer = VideoWriter(out, fps=FPS, audio=audio_out, sample_rate=SAMPLE_RATE)
    with writer if writer is not None else contextlib.nullcontext():
        clock.started()
        for k in range(work.finished):  # finished clips: frames from the work folder
            record = work.load(k)
            _emit(writer, kept, record.frames, keep_frames)
            generator.set_state(record.rng_state)
            motion = record.motion
            clock.clip(k + 1, record.frames_done)
        for k in range(work.finished, plan.clips):
            if step_cache is not None:
                step_cache.reset()  # a clip starts from noise: nothing carries over
            video = sample_clip(pipe, k, plan, cond, motion, generator, clock, sampling, work, step_cache)
            if step_cache is not None:
                log.info("clip %d of %d: step cache %s", k + 1, plan.clips, step_cache.summary())
            video = match_colors(video, ref, color_correction)  # (3, F, H, W) fp32, CPU
            motion = video[:, -plan.motion_frame :].clone()
            first = plan.dropped(k)
            frames = to_uint8_frames(video[:, first : first + plan.kept(k)])
            _emit(writer, kept, frames, keep_frames)
            work.save(
                ClipRecord(
                    index=k,
                    frames=frames,
                    motion=motion,
                    rng_state=generator.get_state(),
                    frames_done=plan.frames_after(k),
                )
            )
            clock.clip(k + 1, plan.frames_after(k))
        clock.done()
    if step_cache is not None:
        object.__setattr__(sampling, "last_cache_summary", step_cache.summary())
    return kept


def sample_clip(
    pipe,
    k: int,
    plan: ClipPlan,
    cond: Conditioning,
    motion: torch.Tensor | None,
    generator: torch.Generator,
    clock: ProgressClock,
    sampling: ClipSampling,
    work: WorkFolder,
    step_cache=None,
) -> torch.Tensor:
    """Sample and decode clip k; returns [3, frame_num, H, W] fp32 on the CPU.

    ``step_cache`` (cache.py), when given, makes every DiT call, keyed by guidance condition.

    ``motion`` is the previous clip's colour-matched tail (3, m, H, W) (None for clip 0);
    the noise is drawn from ``generator`` in fp32 on the CPU.
    """
    steps = sampling.steps
    step = 0
    try:
        model, vae, device = pipe.model, pipe.vae, pipe.device
        z, n_lat, h, w = cond.latent_shape
        noise = torch.randn(1, z, n_lat, h, w, generator=generator, dtype=torch.float32)
        latent = noise.to(device)
        if k == 0:
            head = cond.first_latent  # clean latents of the reference frame
        else:  # clean latents of the previous clip's last m frames: 1 + (m - 1) / 4 of them
            head = pipe.encoders.vae(vae, "encode", motion[None].to(device_of(vae)), sampling.tiled_vae)
            head = head.float().to(device)
        clip_fea, y = cond.image_condition(pipe, plan, k)  # a source video's frame at the clip's start
        audio = cond.clip_audio(plan, k, pipe.config.audio_window, device)  # (1, P, F, window, layers, dim)
        null_audio = torch.zeros_like(audio[:, :1])  # ¬A: one silent speaker, as the reference
        sampler = make_sampler(sampling.scheduler, steps, sampling.shift, step_list=sampling.timesteps)
        guidance = Guidance(sampling.guidance)
        n_head = head.shape[2]

        def predict(c: Condition, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            inputs = ModelInputs(
                x=x,
                t=t,
                context=cond.context if c.text else cond.context_null,
                clip_fea=clip_fea,
                y=y,
                audio=audio if c.audio else null_audio,
                ref_target_masks=cond.masks,
            )
            if step_cache is not None:
                return step_cache.forward(model, inputs, c, i_step, steps)
            return model(**inputs.as_kwargs())

        i_step = 0
        for i, t in enumerate(sampler.timesteps):
            step, i_step = i + 1, i
            latent = overwrite_head(latent, head)
            t_b = t.reshape(1).to(device)
            velocity = guidance(lambda c, x=latent, tb=t_b: predict(c, x, tb))
            latent = overwrite_head(sampler.step(velocity, i, latent), head)
            if not torch.isfinite(latent).all():
                raise PipelineError(
                    f"clip {k + 1} of {plan.clips}, step {step} of {steps}: the latents hold "
                    f"NaN/Inf (fp16 overflows more easily than bf16; a quantization mode or a "
                    f"guidance scale may be too aggressive). {resume_hint(work)}"
                )
            clock.step(k + 1, step)
        step = 0
        video = pipe.encoders.vae(vae, "decode", latent, sampling.tiled_vae)  # (1, 3, F, H, W) in [-1, 1]
        if n_head < 1 or video.shape[2] != plan.frame_num:
            raise PipelineError(
                f"the VAE decoded {video.shape[2]} frames from {n_lat} latents; expected {plan.frame_num}"
            )
        return video[0].float().cpu()
    except torch.cuda.OutOfMemoryError as e:
        where = f"clip {k + 1} of {plan.clips}, " + (f"step {step} of {steps}" if step else "VAE")
        raise oom_error(pipe, where, work, vae_hint=not step) from e


# --- failures ---------------------------------------------------------------------------------------
def oom_error(pipe, where: str, work: WorkFolder, vae_hint: bool) -> PipelineError:
    """The PipelineError for CUDA running out of memory in ``where``: what was free, which of
    the pipeline's modes to change (more block swap, fp8, a tiled VAE), and how to resume."""
    device = pipe.device
    mem = ""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        held = torch.cuda.memory_reserved(device)
        mem = (
            f" Measured: {free / 2**30:.2f} GiB free of {total / 2**30:.2f} GiB on {device} "
            f"({held / 2**30:.2f} GiB held by torch)."
        )
    modes = pipe.modes
    swap = modes.blocks_to_swap
    layers = pipe.config.num_layers
    hints = (
        [f"blocks_to_swap={min(layers, swap + max(1, layers // 4))} (now {swap})"] if swap < layers else []
    )
    if modes.quantization is QuantMode.DISABLED:
        hints.append(f"quantization='{QuantMode.FP8_E4M3FN_SCALED.value}' (halves the DiT weights)")
    runner = getattr(pipe, "encoders", None)
    if vae_hint and runner is not None and not runner.offload:
        hints.append("offload_encoders=True (encoders on the GPU only while they run)")
    hints.append("tiled_vae=True (the VAE works in tiles)" if vae_hint else "a smaller size")
    return PipelineError(
        f"CUDA out of memory in {where}.{mem} Try {'; or '.join(hints)}. {resume_hint(work)}"
    )


def resume_hint(work: WorkFolder) -> str:
    """How to continue after a failure: which clips are safe and what to pass."""
    done = f"{work.finished} finished clip(s) are saved in {work.path}"
    how = work.resume_args
    return f"{done}; call again with the same arguments and {how} to continue from clip {work.finished + 1}"


# --- helpers ----------------------------------------------------------------------------------------
def overwrite_head(latent: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """A copy of latent [B, C, F, H, W] whose first head.shape[2] frames are ``head``."""
    out = latent.clone()
    out[:, :, : head.shape[2]] = head.to(latent.dtype)
    return out


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """[3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3] (values truncated like the reference writer)."""
    v = ((video.float().permute(1, 2, 3, 0) + 1) / 2 * 255).clamp(0, 255)
    return v.to(torch.uint8)


def _emit(writer, kept: list, frames: torch.Tensor, keep: bool) -> None:
    if writer is not None:
        writer.append(frames)
    if keep:
        kept.append(frames)
