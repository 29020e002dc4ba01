"""What every clip of an InfiniteTalk call is conditioned on (docs/WAN_SPEC.md §6).

The reference frame (resized and cropped to the video size), the speech tracks (16 kHz,
loudness-normalised, mixed per speaker), the speaker masks of a two-speaker video, and the
:class:`Conditioning` built once per call from them: text, CLIP, image latents + mask, audio
features. :meth:`Conditioning.clip_audio` cuts one clip's audio windows out of the features.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import PipelineError, ShapeError

FPS = 25  # InfiniteTalk's video rate; audio features come at the same rate
SAMPLE_RATE = 16000  # wav2vec2's input rate


# --- the shared condition ---------------------------------------------------------------------------
@dataclass
class Conditioning:
    """Everything the clips of one call share, built once by :func:`build_conditioning`.

    Shapes: L / L' text tokens of the prompt / negative prompt, N CLIP tokens, z VAE latent
    channels, n latent frames per clip (``(frame_num - 1) / 4 + 1``), (h, w) the latent grid,
    T video frames of audio, P speakers. The tensors the DiT reads are fp32 on its device.
    """

    context: torch.Tensor  # (1, L, text_dim): the prompt
    context_null: torch.Tensor  # (1, L', text_dim): the negative prompt (text dropped)
    clip_fea: torch.Tensor  # (1, N, clip_dim): CLIP features of the reference frame
    y: torch.Tensor  # (1, 4 + z, n, h, w): mask (1 on latent frame 0) + latents of [reference, zeros]
    first_latent: torch.Tensor  # (1, z, 1, h, w): clean latent of the reference frame, clip 1's head
    features: list[torch.Tensor]  # per speaker (T, layers, dim) fp32 on the CPU: wav2vec2 features
    masks: torch.Tensor | None  # (3, h, w) 0/1: speaker 1, speaker 2, background; None for one speaker

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(z, n, h, w): the shape of one clip's latent without the batch."""
        z = self.first_latent.shape[1]
        n, h, w = self.y.shape[2:]
        return z, n, h, w

    def clip_audio(self, plan, k: int, window: int, device: torch.device) -> torch.Tensor:
        """Audio windows of clip k for every speaker: [1, P, frame_num, window, layers, dim].

        ``plan`` is the call's :class:`~wanstudio.pipeline.clips.ClipPlan`; the last clip,
        which runs past the audio, sees it mirror-padded.
        """
        start, end = plan.start(k), plan.end(k)
        windows = []
        for f in self.features:
            if k == plan.clips - 1 and end >= f.shape[0]:  # the last clip runs past the audio
                f = mirror_pad(f, end + 3)
            windows.append(audio_windows_for_clip(f, start, end, window))
        return torch.stack(windows)[None].to(device)


def build_conditioning(
    pipe, ref, tracks, audio_frames, prompt, negative_prompt, frame_num, target_masks
) -> Conditioning:
    """The :class:`Conditioning` of a call: text, CLIP, image latents + mask, audio features.

    Args:
        pipe: the pipeline (its model's config and device, its VAE and encoders).
        ref: the reference frame [3, H, W] in [-1, 1]. tracks: per speaker 16 kHz float32.
        audio_frames: video frames of audio (T). frame_num: frames per clip.
        target_masks: (3, h, w) speaker masks, or None for one speaker.
    """
    cfg, vae, device = pipe.config, pipe.vae, pipe.device
    n_lat = (frame_num - 1) // vae.temporal_stride + 1
    texts = pipe.text_encoder.encode([prompt, negative_prompt])
    context = [t[: cfg.text_len].float()[None].to(device) for t in texts]  # 2 x (1, L, text_dim)
    clip_fea = pipe.image_encoder.encode(ref[None].to(device_of(pipe.image_encoder)))
    clip_fea = clip_fea.float().to(device)  # (1, tokens, clip_dim)
    vdev = device_of(vae)
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
        pipe.audio_encoder.encode(t, sample_rate=SAMPLE_RATE, num_frames=audio_frames).float().cpu()
        for t in tracks
    ]  # per speaker (T, layers, dim)
    for f in features:
        if f.shape[0] != audio_frames:
            raise PipelineError(
                f"the audio encoder returned {f.shape[0]} frames for {audio_frames} video frames of audio"
            )
    return Conditioning(
        context=context[0],
        context_null=context[1],
        clip_fea=clip_fea,
        y=y,
        first_latent=first_latent,
        features=features,
        masks=None if target_masks is None else target_masks.to(device),
    )


# --- media: reference frame and speech --------------------------------------------------------------
def reference_frame(image, size, size_class, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """The reference frame [3, H, W] in [-1, 1] and the source image's (width, height).

    ``size`` (width, height) must be multiples of ``multiple`` (VAE stride x patch size); None
    picks the ``size_class`` bucket of a PIL image / file, or a tensor's own size.
    """
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


def speech_tracks(audio, audio2, mix, loudness) -> list[np.ndarray]:
    """Speech tracks (16 kHz mono float32), loudness-normalised and mixed per speaker."""
    tracks = []
    for value in (audio, audio2):
        if value is None:
            continue
        if isinstance(value, (str, os.PathLike)):
            from ..media import load_audio

            wave = load_audio(value, SAMPLE_RATE)
        else:  # an array is refused exactly as a file would be (silent, empty, NaN, not mono)
            from ..media import check_speech

            wave = check_speech(value, SAMPLE_RATE)
        if loudness is not None:
            from ..media import loudness_normalize

            wave = np.asarray(loudness_normalize(wave, SAMPLE_RATE, loudness), dtype=np.float32)
        tracks.append(wave)
    if len(tracks) == 2:
        from ..media import mix_speakers

        tracks = [np.asarray(t, dtype=np.float32) for t in mix_speakers(tracks[0], tracks[1], mix)]
    return tracks


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


# --- audio windows ----------------------------------------------------------------------------------
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


def device_of(component) -> torch.device | str:
    """Where a part runs (its ``device``, else the CPU)."""
    device = getattr(component, "device", None)
    return device if device is not None else "cpu"
