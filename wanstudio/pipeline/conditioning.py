"""What every clip of an InfiniteTalk call is conditioned on (docs/WAN_SPEC.md §6).

The reference frame (resized and cropped to the video size) or, for dubbing, the frames of a
source video (:class:`SourceFrames`), the speech tracks (16 kHz, loudness-normalised, mixed per
speaker), the speaker masks of a two-speaker video, and the :class:`Conditioning` built once
per call from them: text, CLIP, image latents + mask, audio features.
:meth:`Conditioning.clip_audio` cuts one clip's audio windows out of the features;
:meth:`Conditioning.image_condition` gives one clip's CLIP features and image latents (the
reference image's for every clip, or the source video's frame at the clip's start).
"""

from __future__ import annotations

import math
import numbers
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
    source: SourceFrames | None = None  # dubbing: the source video; clip_fea / y follow its frames
    source_index: int = 0  # the source frame clip_fea and y were computed from
    tiled_vae: bool | str = False  # how the VAE encodes a source video's frames (as the call says)

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

    def image_condition(self, pipe, plan, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(clip_fea, y) of clip k. From a still image: the same for every clip. From a source
        video: those of its frame at the clip's start, ``plan.start(k)`` (its last frame when
        the video is shorter), encoded when that frame differs from the previous clip's."""
        if self.source is not None:
            index, frame = self.source.read(plan.start(k))
            if index != self.source_index:
                self.clip_fea, self.y = encode_image_condition(pipe, frame, plan.frame_num, self.tiled_vae)
                self.source_index = index
        return self.clip_fea, self.y


def encode_image_condition(
    pipe, frame: torch.Tensor, frame_num: int, tiled: bool | str = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(clip_fea (1, N, clip_dim), y (1, 4 + z, n, h, w)) of one conditioning frame [3, H, W]:
    its CLIP features, and the 4-channel mask (1 on latent frame 0) + the latents of
    [frame, frame_num - 1 zero frames]; fp32 on the DiT's device."""
    cfg, vae, device = pipe.config, pipe.vae, pipe.device
    n_lat = (frame_num - 1) // vae.temporal_stride + 1
    clip_fea = pipe.encoders.run(pipe.image_encoder, frame[None])
    clip_fea = clip_fea.float().to(device)  # (1, tokens, clip_dim)
    vdev = device_of(vae)
    video = torch.zeros(1, 3, frame_num, *frame.shape[1:], device=vdev)
    video[:, :, 0] = frame.to(vdev)
    image_latents = pipe.encoders.vae(vae, "encode", video, tiled).float().to(device)  # (1, z, n_lat, h, w)
    h, w = image_latents.shape[-2:]
    mask = torch.zeros(1, cfg.cond_dim - image_latents.shape[1], n_lat, h, w, device=device)
    mask[:, :, 0] = 1
    return clip_fea, torch.cat([mask, image_latents], dim=1)  # y: (1, 4 + z, n_lat, h, w)


def build_conditioning(
    pipe,
    ref,
    tracks,
    audio_frames,
    prompt,
    negative_prompt,
    frame_num,
    target_masks,
    *,
    strengths=None,
    source: SourceFrames | None = None,
    tiled: bool | str = False,
) -> Conditioning:
    """The :class:`Conditioning` of a call: text, CLIP, image latents + mask, audio features.

    Args:
        pipe: the pipeline (its model's config and device, its VAE and encoders).
        ref: the reference frame [3, H, W] in [-1, 1] (a source video's frame 0).
        tracks: per speaker 16 kHz float32.
        audio_frames: video frames of audio (T). frame_num: frames per clip.
        target_masks: (3, h, w) speaker masks, or None for one speaker.
        strengths: per speaker, a factor on its audio features (None: 1 each).
        source: the source video's frames (dubbing); None for a still image.
        tiled: the VAE's tiling (True, False, "auto"); the encoders run through
            ``pipe.encoders`` (on the GPU only while they run when offloading).
    """
    vae, device = pipe.vae, pipe.device
    texts = pipe.encoders.run(pipe.text_encoder, [prompt, negative_prompt])
    context = [t[: pipe.config.text_len].float()[None].to(device) for t in texts]  # 2 x (1, L, text_dim)
    clip_fea, y = encode_image_condition(pipe, ref, frame_num, tiled)
    first_latent = pipe.encoders.vae(vae, "encode", ref[None, :, None].to(device_of(vae)), tiled)
    first_latent = first_latent.float().to(device)  # (1, z, 1, h, w)
    features = [
        pipe.encoders.run(pipe.audio_encoder, t, sample_rate=SAMPLE_RATE, num_frames=audio_frames)
        .float()
        .cpu()
        for t in tracks
    ]  # per speaker (T, layers, dim)
    for f in features:
        if f.shape[0] != audio_frames:
            raise PipelineError(
                f"the audio encoder returned {f.shape[0]} frames for {audio_frames} video frames of audio"
            )
    if strengths is not None:  # a speaker's strength scales its features (1.0 leaves them as they are)
        features = [f if s == 1.0 else f * float(s) for f, s in zip(features, strengths, strict=True)]
    return Conditioning(
        context=context[0],
        context_null=context[1],
        clip_fea=clip_fea,
        y=y,
        first_latent=first_latent,
        features=features,
        masks=None if target_masks is None else target_masks.to(device),
        source=source,
        tiled_vae=tiled,
    )


# --- media: reference frame and speech --------------------------------------------------------------
def reference_frame(image, size, size_class, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """The reference frame [3, H, W] in [-1, 1] and the source image's (width, height).

    ``size`` (width, height) must be multiples of ``multiple`` (VAE stride x patch size); None
    picks the ``size_class`` bucket of a PIL image / file, or a tensor's own size.
    """
    size = _check_size(size, multiple)
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


class SourceFrames:
    """The conditioning frames of a source video (dubbing): frame i at 25 fps, resized and
    cropped to the video size exactly as a still image is (:func:`~wanstudio.media.resize_and_crop`).

    Wraps a :class:`~wanstudio.media.VideoReader` (one frame in memory, decoded on demand);
    ``read(i)`` gives (the index served, [3, H, W] in [-1, 1]); past the end, the last frame.
    """

    def __init__(self, reader, size: tuple[int, int]):
        self.reader = reader
        self.size = tuple(size)  # (W, H)

    def read(self, index: int) -> tuple[int, torch.Tensor]:
        """(index served, frame [3, H, W] in [-1, 1]) of frame ``index``; past the end, the last frame."""
        from PIL import Image

        from ..media import resize_and_crop

        served, frame = self.reader.read(index)  # uint8 (H_src, W_src, 3)
        return served, resize_and_crop(Image.fromarray(frame), self.size).float()

    @property
    def source_size(self) -> tuple[int, int]:
        """(width, height) of the source frames."""
        return self.reader.width, self.reader.height

    def close(self) -> None:
        """Close the underlying video reader."""
        self.reader.close()


def reference_video(path, size, size_class, multiple: int) -> tuple[SourceFrames, torch.Tensor]:
    """Open a source video: its :class:`SourceFrames` and frame 0 [3, H, W] (the reference).

    The size is chosen from the source frame size as for an image (``size``, else the
    ``size_class`` bucket); the frames are read at 25 fps (the source's rate is resampled).
    A file ffmpeg cannot read, without a video stream or without frames: MediaError.
    """
    from ..media import VideoReader, choose_bucket

    size = _check_size(size, multiple)
    reader = VideoReader(path)
    try:
        if size is None:
            size = tuple(choose_bucket(reader.width, reader.height, size_class))
        source = SourceFrames(reader, size)
        _, ref = source.read(0)
        reader.suspend()  # no ffmpeg waits on its pipe until the clips read on
    except BaseException:
        reader.close()
        raise
    return source, ref


def _check_size(size, multiple: int) -> tuple[int, int] | None:
    if size is None:
        return None
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < multiple or size[0] % multiple or size[1] % multiple:
        raise PipelineError(f"size must be (width, height), multiples of {multiple}, got {size}")
    return size


def video_length_note(source: SourceFrames, output_frames: int) -> tuple[str, bool] | None:
    """What a dubbing run does about a source video shorter or longer than the output (whose
    length follows the audio): (the sentence, whether it is worth a warning); None if equal."""
    have = source.reader.estimated_frames
    if have is None or have == output_frames:
        return None
    name, fps = source.reader.path.name, FPS
    about = "" if source.reader.count is not None else "about "
    if have < output_frames:
        return (
            f"the source video {name} is {about}{have / fps:.2f} s ({have} frames at {fps} fps), "
            f"shorter than the {output_frames / fps:.2f} s output (the audio's length): clips starting "
            f"after its end are conditioned on its last frame",
            True,
        )
    return (
        f"the source video {name} is {about}{have / fps:.2f} s, longer than the {output_frames / fps:.2f} s "
        f"output (the audio's length): its frames after {output_frames / fps:.2f} s are not used",
        False,
    )


def image_or_video(image, video):
    """(image, video) with exactly one set: a path given as ``image`` whose suffix is a video's
    is moved to ``video``."""
    if image is not None and video is not None:
        raise PipelineError("pass image= (a still reference) or video= (a source video to dub), not both")
    if image is None and video is None:
        raise PipelineError("no reference: pass image= (a portrait) or video= (a source video to dub)")
    if isinstance(image, (str, os.PathLike)):
        from ..media import is_video_file

        if is_video_file(image):
            return None, image
    if video is not None and not isinstance(video, (str, os.PathLike)):
        raise PipelineError(f"video= takes a video file path, got {type(video).__name__}")
    return image, video


def check_strengths(strengths, speakers: int) -> tuple[float, ...] | None:
    """Per-speaker audio strengths as a tuple of finite numbers >= 0, or None when all are 1."""
    if strengths is None:
        return None
    if isinstance(strengths, numbers.Real) and not isinstance(strengths, bool):
        strengths = (strengths,) * speakers
    try:
        values = tuple(strengths)
    except TypeError:
        raise PipelineError(
            f"speaker_strengths must be numbers, one per speaker, got {strengths!r}"
        ) from None
    if len(values) > speakers:
        raise PipelineError(
            f"more speakers than speech tracks: {len(values)} speaker_strengths for {speakers} "
            f"speech track(s); give one strength per track (speaker 1 first)"
        )
    if len(values) < speakers:
        raise PipelineError(f"speaker_strengths holds {len(values)} value(s) for {speakers} speakers")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (0.0 <= v < float("inf")):
            raise PipelineError(f"speaker_strengths must be finite numbers >= 0, got {values!r}")
    return None if all(v == 1.0 for v in values) else tuple(float(v) for v in values)


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


DEFAULT_SPEAKER_MARGIN = 0.05  # the official tool's face_scale: the default regions' inset


def default_speaker_boxes(width: int, height: int) -> tuple[tuple[int, int, int, int], ...]:
    """The regions of two speakers given no boxes or masks, as the official tool draws them:
    speaker 1 the left half of the frame, speaker 2 the right half, each inset by 5 % of the
    half's width on either side and by 5 % of the frame's height at the top and bottom
    (values truncated to whole pixels). Boxes are (x0, y0, x1, y1), x to the right, end excluded.
    """
    half = width // 2
    y0, y1 = int(height * DEFAULT_SPEAKER_MARGIN), int(height * (1 - DEFAULT_SPEAKER_MARGIN))
    left = (int(half * DEFAULT_SPEAKER_MARGIN), int(half * (1 - DEFAULT_SPEAKER_MARGIN)))
    right = (int(half * DEFAULT_SPEAKER_MARGIN + half), int(half * (1 - DEFAULT_SPEAKER_MARGIN) + half))
    return (left[0], y0, left[1], y1), (right[0], y0, right[1], y1)


def check_speaker_boxes(bboxes, src_size) -> list[tuple[int, int, int, int]]:
    """Two (x0, y0, x1, y1) boxes (x to the right, in the source frame's pixels, rounded to
    whole pixels) inside the frame and not overlapping; else PipelineError saying which."""
    sw, sh = src_size
    if len(bboxes) != 2:
        more = "more speaker boxes than" if len(bboxes) > 2 else "fewer speaker boxes than"
        raise PipelineError(
            f"{more} speakers: got {len(bboxes)} boxes for 2 speech tracks; pass one box per "
            f"speaker (speaker 1 first)"
        )
    boxes = []
    for i, box in enumerate(bboxes):
        if len(box) != 4:
            raise PipelineError(f"speaker {i + 1}'s box {tuple(box)} is not four numbers (x0, y0, x1, y1)")
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        if not (0 <= x0 < x1 <= sw and 0 <= y0 < y1 <= sh):
            raise PipelineError(
                f"speaker {i + 1}'s box {tuple(box)} is not (x0, y0, x1, y1) with 0 <= x0 < x1 <= {sw} "
                f"and 0 <= y0 < y1 <= {sh}: it must lie inside the {sw}x{sh} frame (x to the right)"
            )
        boxes.append((x0, y0, x1, y1))
    (a0, b0, a1, b1), (c0, d0, c1, d1) = boxes
    if max(a0, c0) < min(a1, c1) and max(b0, d0) < min(b1, d1):
        raise PipelineError(
            f"the speaker boxes {boxes[0]} and {boxes[1]} overlap: a pixel can belong to one "
            f"speaker only; draw boxes that do not overlap"
        )
    return boxes


def speaker_masks(masks, bboxes, src_size, size, latent_size) -> torch.Tensor:
    """[3, h, w] 0/1 masks (person 1, person 2, background) on the latent grid.

    Masks / boxes are given in the source frame's pixels (neither: :func:`default_speaker_boxes`);
    they get the reference frame's resize-to-cover + centre crop (nearest), then a nearest
    resize to the latent grid.
    """
    sw, sh = src_size
    if masks is None and bboxes is None:
        bboxes = default_speaker_boxes(sw, sh)
    if bboxes is not None:
        people = []
        for x0, y0, x1, y1 in check_speaker_boxes(bboxes, src_size):
            m = torch.zeros(sh, sw)
            m[y0:y1, x0:x1] = 1  # rows y0..y1, columns x0..x1
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
