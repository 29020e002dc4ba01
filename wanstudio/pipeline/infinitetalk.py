"""InfiniteTalk: one image + one or two speech tracks -> a talking video of any length.

The loop follows WAN_SPEC.md §6. The video is made of clips of ``frame_num`` frames (81);
each later clip starts ``frame_num - motion_frame`` frames after the previous one and is
conditioned on the previous clip's last ``motion_frame`` decoded frames, re-encoded to clean
latents that overwrite the head of the latent before every model call and after every update.
Every clip sees the same image condition (mask + VAE latents of the reference frame, CLIP
features). Clips are decoded, colour-matched to the reference, appended to the mp4 and saved
to a work folder as they finish, so memory stays flat and a broken run resumes.
"""

from __future__ import annotations

import html
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import remove_stale_parts
from ..errors import PipelineError, ShapeError
from ..options import AttentionMode, QuantMode, Scheduler, SizeClass, SpeakerMix, parse_option
from .color import match_colors
from .guidance import Condition, Guidance, GuidanceConfig
from .progress import ProgressClock, resolve_progress
from .resume import ClipRecord, WorkFolder, environment_fingerprint, tensor_digest
from .sampler import check_schedule_args, make_sampler

log = logging.getLogger(__name__)

FPS = 25  # InfiniteTalk's video rate; audio features come at the same rate
SAMPLE_RATE = 16000  # wav2vec2's input rate
# Wan2.1's default negative prompt (its shared config), used when none is given
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
    "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
DEFAULT_SHIFT = {SizeClass.P480: 7.0, SizeClass.P720: 11.0}


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
        total = min(audio_frames, max_frames)
        stride = frame_num - motion_frame
        clips = 1 if total <= frame_num else 1 + math.ceil((total - frame_num) / stride)
        return cls(audio_frames, total, frame_num, motion_frame, clips)

    def start(self, k: int) -> int:
        return k * (self.frame_num - self.motion_frame)

    def end(self, k: int) -> int:
        return self.start(k) + self.frame_num

    def dropped(self, k: int) -> int:
        """Leading frames of clip k that do not reach the output."""
        return 0 if k == 0 else self.motion_frame

    def kept(self, k: int) -> int:
        """Frames clip k adds to the output (the last clip is trimmed to the audio length)."""
        return min(self.end(k), self.total_frames) - (self.start(k) + self.dropped(k))

    def frames_after(self, k: int) -> int:
        return min(self.end(k), self.total_frames)


def mirror_pad(features: torch.Tensor, length: int) -> torch.Tensor:
    """Extend [T, ...] features to ``length`` rows by mirroring the end (last row repeated once,
    then backwards, bouncing as often as needed) — InfiniteTalk's padding of the last clip."""
    T = features.shape[0]
    if length <= T:
        return features
    i = torch.arange(length) % (2 * T)
    return features[torch.where(i < T, i, 2 * T - 1 - i)]


def audio_windows_for_clip(features: torch.Tensor, start: int, end: int, window: int) -> torch.Tensor:
    """[T, layers, dim] -> [end - start, window, layers, dim]: each frame's window of
    offsets -window//2 .. window//2, indices clamped to the features' ends."""
    half = window // 2
    idx = torch.arange(start, end)[:, None] + torch.arange(-half, half + 1)[None, :]  # (F, window)
    return features[idx.clamp(0, features.shape[0] - 1)]


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """[3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3] (values truncated like the reference writer)."""
    v = ((video.float().permute(1, 2, 3, 0) + 1) / 2 * 255).clamp(0, 255)
    return v.to(torch.uint8)


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

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps

    def summary(self) -> str:
        w, h = self.size
        resumed = f" ({self.resumed_clips} resumed)" if self.resumed_clips else ""
        where = f" -> {self.path}" if self.path else ""
        return (
            f"{self.num_frames} frames ({self.duration:.2f} s at {self.fps} fps), {w}x{h}, "
            f"{self.clips} clip(s){resumed}, {self.seconds:.1f} s{where}"
        )

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
        size: tuple[int, int] | None = None,
        settings: dict | None = None,
    ):
        self.model = model
        self.vae = vae
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.audio_encoder = audio_encoder
        self.identity = identity
        self.default_frame_num = frame_num
        self.default_size = size
        self.settings = dict(settings or {})  # quantization / attention / swap, for the summary
        check_components(
            model.config,
            vae=vae,
            text_encoder=text_encoder,
            image_encoder=image_encoder,
            audio_encoder=audio_encoder,
        )

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    def __repr__(self) -> str:
        cfg = self.config
        extra = "".join(f", {k}={v}" for k, v in self.settings.items())
        return (
            f"InfiniteTalkPipeline({self.identity}; dim={cfg.dim}, layers={cfg.num_layers}, "
            f"device={self.device}, dtype={self.model.dtype}{extra})"
        )

    # --- construction -----------------------------------------------------------------------------
    @classmethod
    def tiny(
        cls,
        seed: int = 0,
        *,
        device: torch.device | str = "cpu",
        dtype=torch.float32,
        frame_num: int = 17,
        size: tuple[int, int] = (64, 64),
    ) -> InfiniteTalkPipeline:
        """Every part at toy size with seeded random weights (the 'tiny-infinitetalk' preset).

        The video is noise; this exercises every code path in seconds on a CPU. Clips default
        to ``frame_num`` frames of ``size`` (width, height) instead of 81 frames of a 480p bucket.
        """
        from ..config import WanConfig
        from ..encoders import VAE, AudioEncoder, ImageEncoder, TextEncoder
        from ..model import WanModel

        cfg = WanConfig.preset("tiny-infinitetalk")
        with torch.random.fork_rng(devices=[]):  # seeded parts; the caller's RNG is left alone
            torch.manual_seed(seed)
            model = WanModel(cfg).to(device=device, dtype=dtype).eval().requires_grad_(False)
            parts = (
                VAE.tiny(seed=seed),
                TextEncoder.tiny(text_dim=cfg.text_dim, seed=seed),
                ImageEncoder.tiny(clip_dim=cfg.clip_dim, seed=seed),
                AudioEncoder.tiny(layers=cfg.audio_layers, dim=cfg.audio_dim, seed=seed),
            )
        return cls(
            model,
            *parts,
            identity=f"tiny-infinitetalk(seed={seed}, {str(dtype).replace('torch.', '')})",
            frame_num=frame_num,
            size=tuple(size),
        )

    @classmethod
    def from_files(
        cls,
        *,
        dit,
        infinitetalk=None,
        vae,
        text_encoder,
        tokenizer=None,
        clip,
        wav2vec,
        quantization: QuantMode | str = QuantMode.DISABLED,
        attention: AttentionMode | str = AttentionMode.SDPA,
        blocks_to_swap: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str = torch.bfloat16,
        vae_dtype: torch.dtype | str = torch.float32,
        config=None,
        compile_blocks: bool = False,
        strict_layout: bool = False,
    ) -> InfiniteTalkPipeline:
        """Load every part from local files.

        Args:
            dit: Wan2.1-I2V-14B DiT file(s): shards, their index json or folder, or one file
                (a str / path or a list of them, merged in order).
            infinitetalk: InfiniteTalk's audio weights (``infinitetalk.safetensors``), merged on
                top of ``dit``; None when ``dit`` already holds them.
            vae: ``Wan2.1_VAE.pth`` / safetensors. text_encoder (+ tokenizer): umT5-XXL.
            clip: CLIP ViT-H/14. wav2vec: chinese-wav2vec2-base folder or file.
            quantization / attention: names from ``wanstudio.QUANT_MODES`` / ``ATTENTION_MODES``.
            blocks_to_swap: DiT blocks kept in host memory and streamed in (CUDA).
            compile_blocks: torch.compile each DiT block (fuses its elementwise work; on an
                H200 a 14B forward goes from 3.67 s to 2.92 s in bf16). First call compiles.
            strict_layout: every DiT forward checks kernel layout contracts strictly.
            device: default CUDA when available. dtype: DiT / text / CLIP compute dtype.
            vae_dtype: the VAE's dtype (fp32 as in the reference code).
            config: a WanConfig or preset name; None infers it from the DiT file headers.

        The DiT's shapes are read from the file headers first, and each encoder is checked
        against them as soon as it is loaded, so mismatched parts fail before the DiT loads.
        """
        from ..checkpoints import load_model, parse_dtype, scan_checkpoint
        from ..config import WanConfig
        from ..encoders import VAE, AudioEncoder, ImageEncoder, TextEncoder

        quantization = parse_option(QuantMode, quantization)
        attention = parse_option(AttentionMode, attention)
        if isinstance(blocks_to_swap, bool) or not isinstance(blocks_to_swap, int) or blocks_to_swap < 0:
            raise PipelineError(f"blocks_to_swap must be an integer >= 0, got {blocks_to_swap!r}")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype, vae_dtype = parse_dtype(dtype), parse_dtype(vae_dtype)
        paths = _as_list(dit) + ([infinitetalk] if infinitetalk is not None else [])
        if not paths:
            raise PipelineError("dit= needs at least one checkpoint file")

        if config is None:  # headers only: cheap, and every later check can use it
            entries, _ = scan_checkpoint(paths)
            cfg = WanConfig.from_state_dict({k: e.shape for k, e in entries.items()})
        else:
            cfg = WanConfig.preset(config) if isinstance(config, str) else config
        if not (cfg.is_i2v and cfg.audio):
            raise PipelineError(
                f"the DiT files describe a {cfg.model_type} model without InfiniteTalk's audio "
                f"modules; pass the Wan2.1-I2V-14B shards as dit= and infinitetalk.safetensors as "
                f"infinitetalk="
            )
        # small parts first, each checked against the DiT's shapes before the next loads
        audio_enc = AudioEncoder.from_files(wav2vec, device=device, dtype=torch.float32)
        check_components(cfg, audio_encoder=audio_enc)
        image_enc = ImageEncoder.from_files(clip, device=device, dtype=dtype)
        check_components(cfg, image_encoder=image_enc)
        vae_m = VAE.from_files(vae, device=device, dtype=vae_dtype)
        check_components(cfg, vae=vae_m)
        text_enc = TextEncoder.from_files(text_encoder, tokenizer=tokenizer, device=device, dtype=dtype)
        check_components(cfg, text_encoder=text_enc)

        # load_model quantizes tensor by tensor while streaming, reads swapped blocks to pinned
        # host memory (never the GPU) and sets the attention backend
        model = load_model(
            paths,
            config=cfg,
            device=device,
            dtype=dtype,
            quantization=quantization.value,
            attention=attention.value,
            blocks_to_swap=blocks_to_swap,
            compile_blocks=compile_blocks,
            strict_layout=strict_layout,
        )
        model.eval().requires_grad_(False)
        identity = "dit=" + ",".join(_file_id(p) for p in paths)
        settings = dict(
            quantization=quantization.value, attention=attention.value, blocks_to_swap=blocks_to_swap
        )
        return cls(model, vae_m, text_enc, image_enc, audio_enc, identity=identity, settings=settings)

    # --- generation -------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        image,
        audio=None,
        *,
        audio2=None,
        speaker_mix: SpeakerMix | str = SpeakerMix.PARA,
        masks=None,
        bboxes=None,
        prompt: str = "",
        negative_prompt: str | None = None,
        size_class: SizeClass | str | None = None,
        size: tuple[int, int] | None = None,
        frame_num: int | None = None,
        steps: int = 40,
        shift: float | None = None,
        text_scale: float = 5.0,
        audio_scale: float = 4.0,
        seed: int = 42,
        motion_frame: int = 9,
        max_frames: int = 1000,
        color_correction: float = 1.0,
        scheduler: Scheduler | str = Scheduler.EULER,
        apg: bool = False,
        out: str | os.PathLike | None = None,
        work_dir: str | os.PathLike | None = None,
        resume: bool = False,
        overwrite: bool = False,
        progress=None,
        keep_frames: bool = True,
        tiled_vae: bool = False,
        loudness: float | None = -23.0,
    ) -> GeneratedVideo:
        """Generate a talking video.

        Args:
            image: the reference frame: a path, a PIL image, or a [3, H, W] tensor in [-1, 1]
                (a tensor is used at its own size unless ``size`` says otherwise).
            audio: speaker 1's speech: a path (any format ffmpeg reads) or a 16 kHz mono
                float array. Required.
            audio2: speaker 2's speech (two speakers); needs ``masks`` or ``bboxes``.
            speaker_mix: 'para' (both talk at once) or 'add' (speaker 1, then speaker 2).
            masks: two [H, W] masks (person 1, person 2) in the source image's pixels.
            bboxes: two (x0, y0, x1, y1) boxes in the source image's pixels (x to the right).
            prompt / negative_prompt: text condition (negative: Wan's default when None).
            size_class: '480' or '720' bucket family (default '480', or the pipeline's own
                size, e.g. the tiny preset's 64x64); ``size`` = (width, height) overrides it.
            frame_num: frames per clip (4k + 1; default 81, the tiny pipeline's own default).
            steps / shift / scheduler: sampling (shift default 7 at 480, 11 at 720).
            text_scale / audio_scale / apg: guidance (3 model calls per step, 2 if text_scale 1).
            seed: the noise seed (noise is drawn in fp32 on the CPU: same video on any device).
            motion_frame: frames carried from one clip to the next (4k + 1, < frame_num).
            max_frames: cap on the output length (the audio length caps it too).
            color_correction: Lab colour-matching strength against the reference, in [0, 1].
            out: the mp4 to write (with the audio); it appears only when the video is complete.
            work_dir: folder for finished clips; default ``<out>.work`` (deleted on success).
            resume: continue the run found in ``work_dir`` (same arguments) at its next clip.
            overwrite: delete the finished clips of an earlier run in ``work_dir`` and start
                again (without it, and without ``resume``, they are an error, never deleted).
            progress: callback for :class:`ProgressEvent`; None = tqdm bar, False = silent.
            keep_frames: return the frames (uint8); False keeps memory flat for long videos.
            tiled_vae: decode with the VAE's tiling (less memory at high resolution).
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
        check_schedule_args(steps, shift)
        guidance_cfg = GuidanceConfig(text_scale=text_scale, audio_scale=audio_scale, apg=bool(apg))
        frame_num = self.default_frame_num if frame_num is None else frame_num
        stride_t = self.vae.temporal_stride
        _check_int("frame_num", frame_num, 1 + stride_t)
        if (frame_num - 1) % stride_t:
            raise PipelineError(f"frame_num must be {stride_t}k + 1 (81, 41, 21, ...), got {frame_num}")
        _check_int("motion_frame", motion_frame, 1)
        if (motion_frame - 1) % stride_t or motion_frame >= frame_num:
            raise PipelineError(
                f"motion_frame must be {stride_t}k + 1 and smaller than frame_num "
                f"{frame_num} (default 9), got {motion_frame}"
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
        if speakers == 2 and masks is None and bboxes is None:
            raise PipelineError(
                "two speakers need to know who is who: pass masks=(mask1, mask2) or "
                "bboxes=((x0, y0, x1, y1), (x0, y0, x1, y1)) in the image's pixels, speaker 1 first"
            )
        if speakers == 1 and (masks is not None or bboxes is not None):
            raise PipelineError("masks / bboxes locate two speakers: pass audio2= as well, or drop them")
        if masks is not None and bboxes is not None:
            raise PipelineError("pass masks or bboxes, not both")
        for name, value in (("image", image), ("audio", audio), ("audio2", audio2)):
            if isinstance(value, (str, os.PathLike)) and not Path(value).is_file():
                raise PipelineError(f"{name}: no such file {str(value)!r}")
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

        # --- 2. media: reference frame, speech tracks, speaker masks ---------------------------
        if use_default_size:
            size = self.default_size
        ref, src_size = self._reference(image, size, size_class)  # (3, H, W) in [-1, 1]
        H, W = ref.shape[1:]
        tracks = self._speech(audio, audio2, speaker_mix, loudness)  # per speaker, 16 kHz
        mixed = tracks[0] if speakers == 1 else tracks[0] + tracks[1]  # what the mp4 plays
        audio_frames = int(len(mixed) / SAMPLE_RATE * FPS)
        if audio_frames < 1:
            raise PipelineError(
                f"audio is {len(mixed) / SAMPLE_RATE * 1000:.0f} ms long: shorter "
                f"than one video frame ({1000 // FPS} ms)"
            )
        plan = ClipPlan.make(audio_frames, frame_num, motion_frame, max_frames)
        target_masks = None
        if speakers == 2:
            target_masks = speaker_masks(
                masks, bboxes, src_size, (W, H), (H // self.vae.spatial_stride, W // self.vae.spatial_stride)
            )

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
            seed=seed,
            max_frames=max_frames,
            color_correction=float(color_correction),
            tiled_vae=bool(tiled_vae),
        )
        temporary = work_dir is None
        if work_dir is None:
            work_dir = Path(f"{out}.work") if out is not None else Path(tempfile.mkdtemp(prefix="wanstudio-"))
        if out is not None:
            remove_stale_parts(out.parent, out.name)  # temp files of a killed run's mp4
        callback = resolve_progress(progress)
        work = WorkFolder(
            work_dir, fingerprint, plan.clips, resume=resume, overwrite=overwrite, temporary=temporary
        )  # holds the folder's lock until released below
        # how a later call finds this folder again: the same out= derives it, else name it
        work.resume_args = (
            "resume=True" if not temporary or out is not None else f"work_dir={str(work.path)!r}, resume=True"
        )

        # --- 4. conditions shared by every clip -------------------------------------------------
        try:
            try:
                cond = self._conditions(
                    ref,
                    tracks,
                    audio_frames,
                    prompt,
                    negative_prompt,
                    frame_num,
                    target_masks,
                    plan=plan,
                    work=work,
                )
            except torch.cuda.OutOfMemoryError as e:
                where = "the encoders (text / CLIP / VAE / wav2vec2)"
                raise self._oom_error(where, work, vae_hint=True) from e
            result = self._run(
                plan,
                cond,
                ref,
                work,
                callback,
                out=out,
                mixed=mixed,
                steps=steps,
                shift=shift,
                scheduler=scheduler,
                guidance_cfg=guidance_cfg,
                seed=seed,
                color_correction=float(color_correction),
                keep_frames=keep_frames,
                tiled_vae=tiled_vae,
            )
            work.finish()
        finally:
            work.release()
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
            resumed_clips=cond["resumed"],
            seconds=time.perf_counter() - t_call,
        )

    # --- steps of a call ----------------------------------------------------------------------------
    def _reference(self, image, size, size_class) -> tuple[torch.Tensor, tuple[int, int]]:
        """The reference frame [3, H, W] in [-1, 1] and the source image's (width, height)."""
        multiple = self.vae.spatial_stride * self.config.patch_size[1]
        if size is not None:
            size = tuple(int(s) for s in size)
            if len(size) != 2 or min(size) < multiple or size[0] % multiple or size[1] % multiple:
                raise PipelineError(f"size must be (width, height), multiples of {multiple}, got {size}")
        if isinstance(image, torch.Tensor):
            if image.dim() != 3 or image.shape[0] != 3:
                raise ShapeError(f"an image tensor must be [3, H, W] in [-1, 1], got {tuple(image.shape)}")
            src = (image.shape[2], image.shape[1])
            if size is None:
                size = src
            if size != src:
                raise PipelineError(
                    f"the image tensor is {src[0]}x{src[1]} but size is "
                    f"{size[0]}x{size[1]}: pass a path / PIL image to resize, or "
                    f"a tensor of the target size"
                )
            if size[0] % multiple or size[1] % multiple:
                raise PipelineError(f"image tensor size {src} must be multiples of {multiple}")
            return image.detach().float().cpu().clone(), src
        from ..media import choose_bucket, load_image, resize_and_crop

        img = image if hasattr(image, "convert") else load_image(image)
        img = img.convert("RGB")
        if size is None:
            size = tuple(choose_bucket(img.width, img.height, size_class))
        return resize_and_crop(img, size).float().cpu(), (img.width, img.height)

    def _speech(self, audio, audio2, mix, loudness) -> list[np.ndarray]:
        """Speech tracks (16 kHz mono float32), loudness-normalised and mixed per speaker."""
        tracks = []
        for value in (audio, audio2):
            if value is None:
                continue
            if isinstance(value, (str, os.PathLike)):
                from ..media import load_audio

                wave = load_audio(value, SAMPLE_RATE)
            else:
                wave = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            wave = np.asarray(wave, dtype=np.float32)
            if wave.ndim != 1:
                raise ShapeError(f"audio arrays must be mono [samples] at 16 kHz, got shape {wave.shape}")
            if wave.size == 0:
                raise PipelineError("audio is empty")
            if loudness is not None:
                from ..media import loudness_normalize

                wave = np.asarray(loudness_normalize(wave, SAMPLE_RATE, loudness), dtype=np.float32)
            tracks.append(wave)
        if len(tracks) == 2:
            from ..media import mix_speakers

            tracks = [np.asarray(t, dtype=np.float32) for t in mix_speakers(tracks[0], tracks[1], mix)]
        return tracks

    def _conditions(
        self, ref, tracks, audio_frames, prompt, negative_prompt, frame_num, target_masks, *, plan, work
    ) -> dict:
        """Everything the clips share: text, CLIP, image latents + mask, audio features."""
        cfg, vae, device = self.config, self.vae, self.device
        n_lat = (frame_num - 1) // vae.temporal_stride + 1
        texts = self.text_encoder.encode([prompt, negative_prompt])
        context = [t[: cfg.text_len].float()[None].to(device) for t in texts]  # 2 x (1, L, text_dim)
        clip_fea = self.image_encoder.encode(ref[None].to(_device_of(self.image_encoder)))
        clip_fea = clip_fea.float().to(device)  # (1, tokens, clip_dim)
        vdev = _device_of(vae)
        # y: 4-channel mask (1 on latent frame 0) + latents of [reference, zero frames]
        video = torch.zeros(1, 3, frame_num, *ref.shape[1:], device=vdev)
        video[:, :, 0] = ref.to(vdev)
        image_latents = vae.encode(video).float().to(device)  # (1, z, n_lat, h, w)
        h, w = image_latents.shape[-2:]
        mask = torch.zeros(1, cfg.cond_dim - image_latents.shape[1], n_lat, h, w, device=device)
        mask[:, :, 0] = 1
        y = torch.cat([mask, image_latents], dim=1)  # (1, 4 + z, n_lat, h, w)
        first_latent = vae.encode(ref[None, :, None].to(vdev)).float().to(device)  # (1, z, 1, h, w)
        features = [
            self.audio_encoder.encode(t, sample_rate=SAMPLE_RATE, num_frames=audio_frames).float().cpu()
            for t in tracks
        ]  # per speaker (T, layers, dim)
        for f in features:
            if f.shape[0] != audio_frames:
                raise PipelineError(
                    f"the audio encoder returned {f.shape[0]} frames for {audio_frames} video frames of audio"
                )
        return dict(
            context=context[0],
            context_null=context[1],
            clip_fea=clip_fea,
            y=y,
            first_latent=first_latent,
            features=features,
            masks=None if target_masks is None else target_masks.to(device),
            latent_shape=(image_latents.shape[1], n_lat, h, w),
            resumed=work.finished,
        )

    def _clip_audio(self, features: list[torch.Tensor], plan: ClipPlan, k: int) -> torch.Tensor:
        """Audio windows of clip k for every speaker: [1, P, frame_num, window, layers, dim]."""
        start, end = plan.start(k), plan.end(k)
        windows = []
        for f in features:
            if k == plan.clips - 1 and end >= f.shape[0]:  # the last clip runs past the audio
                f = mirror_pad(f, end + 3)
            windows.append(audio_windows_for_clip(f, start, end, self.config.audio_window))
        return torch.stack(windows)[None].to(self.device)

    def _run(
        self,
        plan,
        cond,
        ref,
        work,
        callback,
        *,
        out,
        mixed,
        steps,
        shift,
        scheduler,
        guidance_cfg,
        seed,
        color_correction,
        keep_frames,
        tiled_vae,
    ) -> list[torch.Tensor]:
        clock = ProgressClock(callback, plan.clips, steps, plan.total_frames, resumed_clips=work.finished)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        motion = None  # fp32 (3, m, H, W): the previous clip's tail
        kept: list[torch.Tensor] = []
        writer = None
        if out is not None:
            from ..media import VideoWriter

            audio_out = mixed[: int(round(plan.total_frames / FPS * SAMPLE_RATE))]
            writer = VideoWriter(out, fps=FPS, audio=audio_out, sample_rate=SAMPLE_RATE)
        with writer if writer is not None else _nothing():
            clock.started()
            for k in range(work.finished):  # finished clips: frames from the work folder
                record = work.load(k)
                _emit(writer, kept, record.frames, keep_frames)
                generator.set_state(record.rng_state)
                motion = record.motion
                clock.clip(k + 1, record.frames_done)
            for k in range(work.finished, plan.clips):
                video = self._clip(
                    k,
                    plan,
                    cond,
                    motion,
                    generator,
                    clock,
                    steps=steps,
                    shift=shift,
                    scheduler=scheduler,
                    guidance_cfg=guidance_cfg,
                    tiled_vae=tiled_vae,
                    work=work,
                )  # (3, F, H, W) fp32, CPU
                video = match_colors(video, ref, color_correction)
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
        return kept

    def _clip(
        self,
        k,
        plan,
        cond,
        motion,
        generator,
        clock,
        *,
        steps,
        shift,
        scheduler,
        guidance_cfg,
        tiled_vae,
        work,
    ) -> torch.Tensor:
        """Sample and decode clip k; returns [3, frame_num, H, W] fp32 on the CPU."""
        step = 0
        try:
            model, vae, device = self.model, self.vae, self.device
            z, n_lat, h, w = cond["latent_shape"]
            noise = torch.randn(1, z, n_lat, h, w, generator=generator, dtype=torch.float32)
            latent = noise.to(device)
            if k == 0:
                head = cond["first_latent"]  # clean latents of the reference frame
            else:  # clean latents of the previous clip's last m frames: 1 + (m - 1) / 4 of them
                head = vae.encode(motion[None].to(_device_of(vae))).float().to(device)
            audio = self._clip_audio(cond["features"], plan, k)  # (1, P, F, window, layers, dim)
            null_audio = torch.zeros_like(audio[:, :1])  # ¬A: one silent speaker, as the reference
            sampler = make_sampler(scheduler, steps, shift)
            guidance = Guidance(guidance_cfg)
            n_head = head.shape[2]

            def predict(c: Condition, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return model(
                    x,
                    t,
                    cond["context"] if c.text else cond["context_null"],
                    clip_fea=cond["clip_fea"],
                    y=cond["y"],
                    audio=audio if c.audio else null_audio,
                    ref_target_masks=cond["masks"],
                )

            for i, t in enumerate(sampler.timesteps):
                step = i + 1
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
            video = vae.decode(latent, tiled=tiled_vae)  # (1, 3, F, H, W) in [-1, 1]
            if n_head < 1 or video.shape[2] != plan.frame_num:
                raise PipelineError(
                    f"the VAE decoded {video.shape[2]} frames from {n_lat} latents; expected {plan.frame_num}"
                )
            return video[0].float().cpu()
        except torch.cuda.OutOfMemoryError as e:
            where = f"clip {k + 1} of {plan.clips}, " + (f"step {step} of {steps}" if step else "VAE")
            raise self._oom_error(where, work, vae_hint=not step) from e

    def _oom_error(self, where: str, work: WorkFolder, vae_hint: bool) -> PipelineError:
        device = self.device
        mem = ""
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            held = torch.cuda.memory_reserved(device)
            mem = (
                f" Measured: {free / 2**30:.2f} GiB free of {total / 2**30:.2f} GiB on {device} "
                f"({held / 2**30:.2f} GiB held by torch)."
            )
        swap = int(self.settings.get("blocks_to_swap", 0))
        layers = self.config.num_layers
        hints = [f"blocks_to_swap={min(layers - 1, swap + max(1, layers // 4))} (now {swap})"]
        if self.settings.get("quantization", QuantMode.DISABLED.value) == QuantMode.DISABLED.value:
            hints.append(f"quantization='{QuantMode.FP8_E4M3FN_SCALED.value}' (halves the DiT weights)")
        hints.append("tiled_vae=True (the VAE decodes in tiles)" if vae_hint else "a smaller size")
        return PipelineError(
            f"CUDA out of memory in {where}.{mem} Try {'; or '.join(hints)}. {resume_hint(work)}"
        )


# --- helpers ----------------------------------------------------------------------------------------
def resume_hint(work: WorkFolder) -> str:
    """How to continue after a failure: which clips are safe and what to pass."""
    done = f"{work.finished} finished clip(s) are saved in {work.path}"
    how = work.resume_args
    return f"{done}; call again with the same arguments and {how} to continue from clip {work.finished + 1}"


def overwrite_head(latent: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """A copy of latent [B, C, F, H, W] whose first head.shape[2] frames are ``head``."""
    out = latent.clone()
    out[:, :, : head.shape[2]] = head.to(latent.dtype)
    return out


def check_components(cfg, *, vae=None, text_encoder=None, image_encoder=None, audio_encoder=None) -> None:
    """Raise PipelineError when a part does not fit the DiT's shapes (before any heavy work)."""
    problems = []
    if not (cfg.is_i2v and cfg.audio):
        problems.append(
            f"the DiT is a {cfg.model_type} model without audio modules; InfiniteTalk "
            f"needs an i2v model with audio_proj / audio_cross_attn weights"
        )
    if text_encoder is not None and text_encoder.text_dim != cfg.text_dim:
        problems.append(f"text encoder width {text_encoder.text_dim} != DiT text_dim {cfg.text_dim}")
    if image_encoder is not None and image_encoder.clip_dim != cfg.clip_dim:
        problems.append(f"image encoder width {image_encoder.clip_dim} != DiT clip_dim {cfg.clip_dim}")
    if audio_encoder is not None and (audio_encoder.layers, audio_encoder.dim) != (
        cfg.audio_layers,
        cfg.audio_dim,
    ):
        problems.append(
            f"audio encoder gives {audio_encoder.layers} layers x {audio_encoder.dim}, "
            f"the DiT's audio_proj expects {cfg.audio_layers} x {cfg.audio_dim}"
        )
    if vae is not None:
        if vae.z_dim != cfg.out_dim:
            problems.append(f"VAE latent channels {vae.z_dim} != DiT out_dim {cfg.out_dim}")
        if cfg.is_i2v and cfg.cond_dim != vae.z_dim + vae.temporal_stride:
            problems.append(
                f"DiT condition channels {cfg.cond_dim} != VAE mask + latents "
                f"{vae.temporal_stride} + {vae.z_dim}"
            )
        if cfg.audio and vae.temporal_stride != cfg.vae_scale:
            problems.append(f"VAE temporal stride {vae.temporal_stride} != DiT vae_scale {cfg.vae_scale}")
    if problems:
        raise PipelineError("the parts of this pipeline do not fit together: " + "; ".join(problems))


def speaker_masks(masks, bboxes, src_size, size, latent_size) -> torch.Tensor:
    """[3, h, w] 0/1 masks (person 1, person 2, background) on the latent grid.

    Masks / boxes are given in the source image's pixels; they get the reference frame's
    resize-to-cover + centre crop (nearest), then a nearest resize to the latent grid.
    """
    sw, sh = src_size
    if bboxes is not None:
        if len(bboxes) != 2:
            raise PipelineError(f"bboxes must hold two boxes (speaker 1, speaker 2), got {len(bboxes)}")
        people = []
        for box in bboxes:
            x0, y0, x1, y1 = (int(round(float(v))) for v in box)
            if not (0 <= x0 < x1 <= sw and 0 <= y0 < y1 <= sh):
                raise PipelineError(f"bbox {tuple(box)} is not (x0, y0, x1, y1) inside the {sw}x{sh} image")
            m = torch.zeros(sh, sw)
            m[y0:y1, x0:x1] = 1
            people.append(m)
    else:
        if len(masks) != 2:
            raise PipelineError(f"masks must hold two masks (speaker 1, speaker 2), got {len(masks)}")
        people = []
        for i, m in enumerate(masks):
            m = torch.as_tensor(np.asarray(m), dtype=torch.float32)
            if m.dim() == 3 and m.shape[-1] in (1, 3, 4):  # an image-like mask
                m = m[..., 0]
            if tuple(m.shape) != (sh, sw):
                raise ShapeError(
                    f"mask {i + 1} is {tuple(m.shape)} but the image is {sh}x{sw} "
                    f"(height x width): masks are in the source image's pixels"
                )
            people.append((m > 0).float())
    if any(p.sum() == 0 for p in people):
        raise PipelineError("a speaker mask / box is empty")
    background = ((people[0] + people[1]) == 0).float()
    stack = torch.stack([people[0], people[1], background])[None]  # (1, 3, sh, sw)
    W, H = size
    scale = max(W / sw, H / sh)
    rh, rw = math.ceil(scale * sh), math.ceil(scale * sw)
    stack = torch.nn.functional.interpolate(stack, size=(rh, rw), mode="nearest")
    top, left = (rh - H) // 2, (rw - W) // 2
    stack = stack[:, :, top : top + H, left : left + W]  # centre crop to (H, W)
    small = torch.nn.functional.interpolate(stack, size=latent_size, mode="nearest")
    return (small[0] > 0).float()  # (3, h, w)


def _emit(writer, kept: list, frames: torch.Tensor, keep: bool) -> None:
    if writer is not None:
        writer.append(frames)
    if keep:
        kept.append(frames)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise PipelineError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _device_of(component) -> torch.device | str:
    device = getattr(component, "device", None)
    return device if device is not None else "cpu"


def _as_list(paths) -> list:
    if paths is None:
        return []
    if isinstance(paths, (str, os.PathLike)):
        return [paths]
    return list(paths)


def _file_id(path) -> str:
    p = Path(path)
    try:
        return f"{p.name}:{p.stat().st_size}" if p.is_file() else p.name
    except OSError:
        return p.name
