"""InfiniteTalk: one image (or a source video) + one or two speech tracks -> a talking video of
any length.

The loop follows docs/WAN_SPEC.md §6. The video is made of clips of ``frame_num`` frames (81);
each later clip starts ``frame_num - motion_frame`` frames after the previous one and is
conditioned on the previous clip's last ``motion_frame`` decoded frames, re-encoded to clean
latents that overwrite the head of the latent before every model call and after every update.
Every clip sees the same image condition (mask + VAE latents of the reference frame, CLIP
features); when dubbing a source video, clip k's image condition is the video's frame at the
clip's start (its last frame past its end) and frame 0 is the reference. Clips are decoded,
colour-matched to the reference, appended to the mp4 and saved to a work folder as they
finish, so memory stays flat and a broken run resumes.

This module holds the pipeline and its call (argument checks, then the steps in order);
the steps live beside it: ``conditioning`` (reference frame, speech, speaker masks, the shared
:class:`~wanstudio.pipeline.conditioning.Conditioning`), ``clips`` (the clip plan and the
per-clip sampling loop), ``loading`` (``from_files``, ``tiny``, ``check_components``).
"""

from __future__ import annotations

import html
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import remove_stale_parts
from ..cache import check_cache_for_steps
from ..errors import PipelineError
from ..modes import RuntimeModes
from ..offload.planner import GiB
from ..options import BasePrecision, CacheMode, QuantMode, Scheduler, SizeClass, SpeakerMix, parse_option
from . import loading
from .clips import ClipPlan, ClipSampling, oom_error, overwrite_head, resume_hint, run_clips, to_uint8_frames
from .conditioning import (
    FPS,
    SAMPLE_RATE,
    Conditioning,
    audio_windows_for_clip,
    build_conditioning,
    check_strengths,
    default_speaker_boxes,
    image_or_video,
    mirror_pad,
    reference_frame,
    reference_video,
    speaker_masks,
    speech_tracks,
    video_length_note,
)
from .guidance import GuidanceConfig
from .loading import check_components
from .memory import EncoderRunner, check_offload, check_tiled, default_offload, swaps_blocks
from .official_input import read_input_json
from .progress import resolve_progress
from .resume import WorkFolder, environment_fingerprint, tensor_digest
from .sampler import check_schedule_args, make_sampler

__all__ = [  # the helpers moved to clips / conditioning / loading stay importable from here
    "DEFAULT_NEGATIVE_PROMPT",
    "DEFAULT_SHIFT",
    "FPS",
    "SAMPLE_RATE",
    "ClipPlan",
    "Conditioning",
    "GeneratedVideo",
    "InfiniteTalkPipeline",
    "audio_windows_for_clip",
    "check_components",
    "default_speaker_boxes",
    "mirror_pad",
    "overwrite_head",
    "resume_hint",
    "speaker_masks",
    "to_uint8_frames",
]

# Wan2.1's default negative prompt (its shared config), used when none is given
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
    "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
DEFAULT_SHIFT = {SizeClass.P480: 7.0, SizeClass.P720: 11.0}
log = logging.getLogger(__name__)


# --- the result -------------------------------------------------------------------------------------
@dataclass
class GeneratedVideo:
    """What a call returns: the frames (unless ``keep_frames=False``) and where the mp4 went."""

    frames: torch.Tensor | None  # uint8 [T, H, W, 3]
    path: Path | None  # the mp4 (with the audio), None when out=None
    num_frames: int
    size: tuple[int, int]  # (width, height)
    clips: int
    resumed_clips: int
    seconds: float  # wall time of the call
    fps: int = FPS
    cache: object | None = None  # cache.CacheSummary of the step cache (None: no cache)
    notes: tuple[str, ...] = ()  # what the call decided for the user (a source video's length)

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps

    def summary(self) -> str:
        """One line: frames, duration, size, clips (resumed ones), seconds and the output file."""
        w, h = self.size
        resumed = f" ({self.resumed_clips} resumed)" if self.resumed_clips else ""
        where = f" -> {self.path}" if self.path else ""
        text = (
            f"{self.num_frames} frames ({self.duration:.2f} s at {self.fps} fps), {w}x{h}, "
            f"{self.clips} clip(s){resumed}, {self.seconds:.1f} s{where}"
        )
        return text if self.cache is None else f"{text}; step cache {self.cache}"

    def __repr__(self) -> str:
        return f"GeneratedVideo({self.summary()})"

    def _repr_html_(self) -> str:
        text = html.escape(self.summary())
        if self.path is None:
            return f"<pre>{text}</pre>"
        try:  # a notebook resolves video sources relative to its own folder
            src = os.path.relpath(self.path)
        except ValueError:  # another drive (Windows)
            src = str(self.path)
        src = html.escape(src)
        return f'<video src="{src}" controls style="max-width:100%"></video><pre>{text}</pre>'


# --- the pipeline -----------------------------------------------------------------------------------
class InfiniteTalkPipeline:
    """InfiniteTalk generation over a WanModel (i2v + audio) and its encoders.

    Args:
        model: a :class:`~wanstudio.WanModel` with ``config.audio`` (InfiniteTalk weights).
        vae: the Wan VAE adapter (``encode`` / ``decode``, ``z_dim``, strides).
        text_encoder, image_encoder, audio_encoder: umT5 / CLIP / wav2vec2 adapters.
        identity: what the weights are (part of a run's fingerprint for resume).
        frame_num: frames per clip when a call does not say (81 for real weights).
        size: (width, height) used instead of the size-class bucket when a call does not say.
        settings: free-form notes a caller keeps with the pipeline (not read by it; how the
            DiT runs is :attr:`modes`).
        offload_encoders: keep the encoders on the host and move each to the GPU only while it
            runs (None: when the DiT swaps blocks or the card has < 48 GiB; pipeline/memory.py).
        text_encoder_device: 'cpu' runs the text encoder there always; None on the GPU when it
            fits beside the DiT at the time (else on the CPU for that call).
        vram_budget_gb: the device memory a call may use (None: the free memory), for the text
            encoder's placement and the VAE's ``tiled="auto"``.
    """

    def __init__(
        self,
        model,
        vae,
        text_encoder,
        image_encoder,
        audio_encoder,
        *,
        identity: str = "custom",
        frame_num: int = 81,
        motion_frame: int = 9,
        color_correction: float = 1.0,
        size: tuple[int, int] | None = None,
        settings: dict | None = None,
        offload_encoders: bool | str | None = None,
        text_encoder_device: str | None = None,
        vram_budget_gb: float | None = None,
    ):
        self.model = model
        self.vae = vae
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.audio_encoder = audio_encoder
        self.identity = identity
        self.default_frame_num = frame_num
        self.default_motion_frame = motion_frame
        self.default_color_correction = color_correction
        self.default_size = size
        self.settings = dict(settings or {})
        check_components(
            model.config,
            vae=vae,
            text_encoder=text_encoder,
            image_encoder=image_encoder,
            audio_encoder=audio_encoder,
        )
        offload_encoders = check_offload(offload_encoders)
        if offload_encoders is None:
            offload_encoders = default_offload(model.device, swaps_blocks(model))
        self.encoders = EncoderRunner(
            model.device,
            offload=offload_encoders,
            text_device=text_encoder_device,
            budget_bytes=None if vram_budget_gb is None else int(vram_budget_gb * GiB),
        )
        self.encoders.prepare(text_encoder, image_encoder, audio_encoder)

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def modes(self) -> RuntimeModes:
        """How the DiT runs: the :class:`~wanstudio.modes.RuntimeModes` that
        :func:`~wanstudio.modes.apply_modes` recorded on the model (so modes applied after the
        pipeline was built count too); for a model nobody applied modes to, the defaults at its
        dtype with the quantization ``model.quantization`` names, if any."""
        recorded = getattr(self.model, "modes", None)
        if isinstance(recorded, RuntimeModes):
            return recorded
        dtype = getattr(self.model, "dtype", None)
        precision = BasePrecision.BF16
        if dtype in (torch.float32, torch.bfloat16, torch.float16):
            precision = BasePrecision.of(dtype)
        quantization = getattr(self.model, "quantization", None)
        if not isinstance(quantization, QuantMode):
            quantization = QuantMode.DISABLED
        return RuntimeModes(precision=precision, quantization=quantization)

    def __repr__(self) -> str:
        cfg = self.config
        return (
            f"InfiniteTalkPipeline({self.identity}; dim={cfg.dim}, layers={cfg.num_layers}, "
            f"device={self.device}, {self.modes.describe()})"
        )

    # --- construction (pipeline/loading.py) ------------------------------------------------------
    # plain functions there, bound here, so the class stays about the call
    tiny = classmethod(loading.tiny)
    from_files = classmethod(loading.from_files)

    # --- generation -------------------------------------------------------------------------------
    def from_json(self, path: str | os.PathLike, **kwargs) -> GeneratedVideo:
        """Generate from an official InfiniteTalk input file (``--input_json``): its prompt,
        image or video, speech tracks, ``audio_type`` and boxes (:func:`read_input_json`), with
        ``kwargs`` on top (``out=``, ``steps=``, ...; a ``prompt`` given here wins)."""
        return self(**{**read_input_json(path), **kwargs})

    @torch.no_grad()
    def __call__(
        self,
        image=None,
        audio=None,
        *,
        video=None,
        audio2=None,
        speaker_mix: SpeakerMix | str = SpeakerMix.PARA,
        masks=None,
        bboxes=None,
        speaker_strengths=None,
        prompt: str = "",
        negative_prompt: str | None = None,
        size_class: SizeClass | str | None = None,
        size: tuple[int, int] | None = None,
        frame_num: int | None = None,
        steps: int | None = None,
        shift: float | None = None,
        text_scale: float = 5.0,
        audio_scale: float = 4.0,
        seed: int = 42,
        motion_frame: int | None = None,
        max_frames: int = 1000,
        color_correction: float | None = None,
        scheduler: Scheduler | str = Scheduler.EULER,
        timesteps=None,
        apg: bool = False,
        out: str | os.PathLike | None = None,
        work_dir: str | os.PathLike | None = None,
        resume: bool = False,
        overwrite: bool = False,
        progress=None,
        keep_frames: bool = True,
        cache: CacheMode | str = CacheMode.NONE,
        cache_threshold: float | None = None,
        tiled_vae: bool | str = "auto",
        loudness: float | None = -23.0,
    ) -> GeneratedVideo:
        """Generate a talking video, from a still image or by dubbing a source video.

        Args:
            image: the reference frame: a path, a PIL image, or a [3, H, W] tensor in [-1, 1]
                (a tensor is used at its own size unless ``size`` says otherwise). A path whose
                suffix is a video's (``media.VIDEO_INPUT_SUFFIXES``: .mp4, .mov, .mkv, ...) is
                taken as ``video=``.
            audio: speaker 1's speech: a path (any format ffmpeg reads) or a 16 kHz mono
                float array. Required.
            video: dubbing: a source video file (instead of ``image``). It is read at 25 fps
                (other rates resampled), one frame at a time; its frames are resized and
                cropped like an image; clip k is conditioned on its frame at the clip's start,
                ``k (frame_num - motion_frame)``, or on its last frame when the video is
                shorter; frame 0 is the colour reference. The output's length follows the
                audio (``GeneratedVideo.notes`` says when the video is shorter or longer).
            audio2: speaker 2's speech (two speakers).
            speaker_mix: 'para' (both talk at once) or 'add' (speaker 1, then speaker 2).
            masks: two [H, W] masks (person 1, person 2) in the source frame's pixels.
            bboxes: two (x0, y0, x1, y1) boxes in the source frame's pixels (x to the right,
                y down, x1 / y1 excluded), inside the frame, not overlapping. Two speakers with
                neither masks nor boxes: the left and right halves (:func:`default_speaker_boxes`).
            speaker_strengths: per speaker, a factor on that speaker's audio features (default
                1.0 each; 0 mutes a speaker's lips, > 1 exaggerates them).
            prompt / negative_prompt: text condition (negative: Wan's default when None).
            size_class: '480' or '720' bucket family (default '480', or the pipeline's own
                size, e.g. the tiny preset's 64x64); ``size`` = (width, height) overrides it.
            frame_num: frames per clip (4k + 1; default 81, the tiny pipeline's own default).
            steps / shift / scheduler: sampling (steps default 40, or the length of
                ``timesteps``; shift default 7 at 480, 11 at 720).
            timesteps: ``scheduler="euler_distill"`` only: the unshifted timesteps of a
                step-distilled LoRA, e.g. (999, 750, 500, 250) (default: 1000 (1 - i / steps)).
            text_scale / audio_scale / apg: guidance (3 model calls per step, 2 if text_scale 1).
            seed: the noise seed (noise is drawn in fp32 on the CPU: same video on any device).
            motion_frame: frames carried from one clip to the next (4k + 1, < frame_num;
                default 9, the tiny pipeline's 5).
            max_frames: cap on the output length (the audio length caps it too).
            color_correction: Lab colour-matching strength against the reference, in [0, 1]
                (default 1; the tiny pipeline's trained weights 0: see ``tiny``).
            out: the mp4 to write (with the audio); it appears only when the video is complete.
            work_dir: folder for finished clips; default ``<out>.work`` (deleted on success).
            resume: continue the run found in ``work_dir`` (same arguments) at its next clip.
            overwrite: delete the finished clips of an earlier run in ``work_dir`` and start
                again (without it, and without ``resume``, they are an error, never deleted).
            progress: callback for :class:`ProgressEvent`; None = tqdm bar, False = silent.
            keep_frames: return the frames (uint8); False keeps memory flat for long videos.
            cache / cache_threshold: a step cache (``none`` / ``teacache`` / ``magcache``, cache.py)
                that reuses the blocks' residual on steps whose input barely changed; threshold
                None takes the mode's default. Refused below 10 steps (the distilled setting).
            tiled_vae: encode and decode with the VAE in tiles (less memory at high resolution;
                one tile covering the frame is exact); "auto" tiles when the untiled working
                set would not fit what is left of the budget (never on the CPU).
            loudness: LUFS target for each speech track (None skips the normalisation).

        Returns:
            :class:`GeneratedVideo` (``.frames`` uint8 [T, H, W, 3], ``.path``).
        """
        t_call = time.perf_counter()
        # --- 1. arguments: every cheap check before any file is read ---------------------------
        if audio is None:
            raise PipelineError(
                "no audio: InfiniteTalk drives the face from speech; pass audio= "
                "(a file path or a 16 kHz mono float array)"
            )
        use_default_size = size is None and size_class is None and self.default_size is not None
        size_class = parse_option(SizeClass, SizeClass.P480 if size_class is None else size_class)
        scheduler = parse_option(Scheduler, scheduler)
        speaker_mix = parse_option(SpeakerMix, speaker_mix)
        shift = DEFAULT_SHIFT[size_class] if shift is None else shift
        if steps is None:
            steps = 40 if timesteps is None else len(timesteps)
        check_schedule_args(steps, shift)
        if timesteps is not None:  # checked now, not at the first step of the first clip
            timesteps = make_sampler(scheduler, steps, shift, step_list=timesteps).step_list
        guidance_cfg = GuidanceConfig(text_scale=text_scale, audio_scale=audio_scale, apg=bool(apg))
        tiled_vae = check_tiled(tiled_vae)
        cache = parse_option(CacheMode, cache)
        check_cache_for_steps(cache, steps)  # the distilled 4-8 steps: nothing to skip, say so
        sampling = ClipSampling(
            steps,
            shift,
            scheduler,
            guidance_cfg,
            tiled_vae=tiled_vae,
            cache=cache,
            cache_threshold=cache_threshold,
            timesteps=timesteps,
        )
        frame_num = self.default_frame_num if frame_num is None else frame_num
        motion_frame = self.default_motion_frame if motion_frame is None else motion_frame
        if color_correction is None:
            color_correction = self.default_color_correction
        stride_t = self.vae.temporal_stride
        _check_int("frame_num", frame_num, 1 + stride_t)
        if (frame_num - 1) % stride_t:
            raise PipelineError(f"frame_num must be {stride_t}k + 1 (81, 41, 21, ...), got {frame_num}")
        _check_int("motion_frame", motion_frame, 1)
        if (motion_frame - 1) % stride_t or motion_frame >= frame_num:
            raise PipelineError(
                f"motion_frame must be {stride_t}k + 1 and smaller than frame_num "
                f"{frame_num} (default {self.default_motion_frame}), got {motion_frame}"
            )
        _check_int("max_frames", max_frames, 1)
        _check_int("seed", seed, 0)
        if (
            isinstance(color_correction, bool)
            or not isinstance(color_correction, (int, float))
            or not 0.0 <= color_correction <= 1.0
        ):
            raise PipelineError(f"color_correction must be in [0, 1], got {color_correction!r}")
        speakers = 1 if audio2 is None else 2
        located = masks if masks is not None else bboxes
        if speakers == 1 and located is not None:
            raise PipelineError(
                f"more speakers than speech tracks: {len(located)} speaker "
                f"{'masks' if masks is not None else 'boxes'} locate speakers, but only one speech "
                f"track was given; pass audio2= as well, or drop masks / bboxes"
            )
        if masks is not None and bboxes is not None:
            raise PipelineError("pass masks or bboxes, not both")
        strengths = check_strengths(speaker_strengths, speakers)
        image, video = image_or_video(image, video)
        for name, value in (("image", image), ("video", video), ("audio", audio), ("audio2", audio2)):
            if isinstance(value, (str, os.PathLike)):  # a missing file or a folder: now, not later
                from ..media import check_input_file

                check_input_file(value, "audio" if name.startswith("audio") else name)
        if out is not None:  # a folder, a read-only disk, a bad suffix: now, not after the run
            from ..media import check_output_path

            out = check_output_path(out)
        if resume and overwrite:
            raise PipelineError(
                "resume=True continues an earlier run and overwrite=True deletes it: pass one"
            )
        if resume and work_dir is None and out is None:
            raise PipelineError(
                "resume=True needs the work folder of the broken run: pass the same "
                "out= (its default work folder is <out>.work) or work_dir="
            )
        negative_prompt = DEFAULT_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt

        # --- 2. media: reference frame (or source video), speech tracks, speaker masks ---------
        if use_default_size:
            size = self.default_size
        multiple = self.vae.spatial_stride * self.config.patch_size[1]  # pixels per latent token
        source = None
        if video is not None:  # an unreadable video or one without frames fails here
            source, ref = reference_video(video, size, size_class, multiple)  # ref: frame 0
            src_size = source.source_size
        else:
            ref, src_size = reference_frame(image, size, size_class, multiple)  # (3, H, W) in [-1, 1]
        H, W = ref.shape[1:]
        target_masks = None
        if speakers == 2:  # boxes outside the frame or overlapping: before the audio is read
            target_masks = speaker_masks(
                masks, bboxes, src_size, (W, H), (H // self.vae.spatial_stride, W // self.vae.spatial_stride)
            )
        tracks = speech_tracks(audio, audio2, speaker_mix, loudness)  # per speaker, 16 kHz
        mixed = tracks[0] if speakers == 1 else tracks[0] + tracks[1]  # what the mp4 plays
        audio_frames = int(len(mixed) / SAMPLE_RATE * FPS)
        if audio_frames < 1:
            raise PipelineError(
                f"audio is {len(mixed) / SAMPLE_RATE * 1000:.0f} ms long: shorter "
                f"than one video frame ({1000 // FPS} ms)"
            )
        plan = ClipPlan.make(audio_frames, frame_num, motion_frame, max_frames)
        notes = []
        if source is not None:
            read_as = f"source video {source.reader.describe()}, read at {FPS} fps"
            log.info("%s", read_as)
            notes.append(read_as)
            note = video_length_note(source, plan.total_frames)
            if note is not None:
                (log.warning if note[1] else log.info)("%s", note[0])
                notes.append(note[0])

        # --- 3. the work folder (resume) -------------------------------------------------------
        fingerprint = dict(
            model=self.identity,
            **environment_fingerprint(self),  # modes, dtypes, device, CPU threads, torch
            image=tensor_digest(ref),
            audio=tensor_digest(*[torch.from_numpy(np.ascontiguousarray(t)) for t in tracks]),
            masks=None if target_masks is None else tensor_digest(target_masks),
            prompt=prompt,
            negative_prompt=negative_prompt,
            size=[W, H],
            frame_num=frame_num,
            motion_frame=motion_frame,
            steps=steps,
            shift=float(shift),
            text_scale=float(text_scale),
            audio_scale=float(audio_scale),
            apg=bool(apg),
            scheduler=scheduler.value,
            **({} if timesteps is None else {"timesteps": [float(t) for t in timesteps]}),
            seed=seed,
            max_frames=max_frames,
            color_correction=float(color_correction),
            tiled_vae=tiled_vae,
            cache=cache.value,
            cache_threshold=cache_threshold,
        )
        if source is not None:  # the whole file: frames after 0 condition later clips
            from ..media import file_digest

            fingerprint["video"] = file_digest(source.reader.path)
        if strengths is not None:
            fingerprint["speaker_strengths"] = [float(v) for v in strengths]
        temporary = work_dir is None
        if work_dir is None:
            work_dir = Path(f"{out}.work") if out is not None else Path(tempfile.mkdtemp(prefix="wanstudio-"))
        if out is not None:
            remove_stale_parts(out.parent, out.name)  # temp files of a killed run's mp4
        callback = resolve_progress(progress)
        work = WorkFolder(
            work_dir, fingerprint, plan.clips, resume=resume, overwrite=overwrite, temporary=temporary
        )  # holds the folder's lock until released below
        resumed = work.finished
        # how a later call finds this folder again: the same out= derives it, else name it
        work.resume_args = (
            "resume=True" if not temporary or out is not None else f"work_dir={str(work.path)!r}, resume=True"
        )

        # --- 4. conditions shared by every clip -------------------------------------------------
        try:
            try:
                cond = build_conditioning(
                    self,
                    ref,
                    tracks,
                    audio_frames,
                    prompt,
                    negative_prompt,
                    frame_num,
                    target_masks,
                    strengths=strengths,
                    source=source,
                    tiled=tiled_vae,
                )
            except torch.cuda.OutOfMemoryError as e:
                where = "the encoders (text / CLIP / VAE / wav2vec2)"
                raise oom_error(self, where, work, vae_hint=True) from e
            # --- 5. the clips: finished ones read back, the rest sampled, streamed to out -------
            result = run_clips(
                self,
                plan,
                cond,
                ref,
                work,
                callback,
                sampling,
                out=out,
                mixed=mixed,
                seed=seed,
                color_correction=float(color_correction),
                keep_frames=keep_frames,
            )
            work.finish()
        finally:
            work.release()
            if source is not None:
                source.close()
            close = getattr(callback, "close", None)
            if close is not None:
                close()
        frames = torch.cat(result, dim=0) if keep_frames else None
        return GeneratedVideo(
            frames=frames,
            path=out,
            num_frames=plan.total_frames,
            size=(W, H),
            clips=plan.clips,
            resumed_clips=resumed,
            seconds=time.perf_counter() - t_call,
            cache=sampling.last_cache_summary,
            notes=tuple(notes),
        )


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise PipelineError(f"{name} must be an integer >= {minimum}, got {value!r}")
