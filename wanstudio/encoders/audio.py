"""The wav2vec2 audio encoder (``transformers.Wav2Vec2Model``, chinese-wav2vec2-base layout).

InfiniteTalk's front end: the CNN features (~50 Hz) are linearly interpolated to one row per
video frame *before* the transformer, and every transformer layer's output is kept.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Wav2Vec2Config, Wav2Vec2Model

from ..errors import ConfigError, MediaError, ShapeError
from ..media import SAMPLE_RATE, VIDEO_FPS
from .weights import ConfigSource, empty_model, load_into, read_component, read_config

# chinese-wav2vec2-base's preprocessor normalises each clip to zero mean, unit variance.
NORMALIZE_INPUT = True


class AudioEncoder:
    """wav2vec2: a 16 kHz mono wave -> per-video-frame features [T, layers, dim] (fp32).

    Args:
        model: a ``Wav2Vec2Model`` (eval mode).
        normalize: zero-mean / unit-variance input, as the checkpoint's preprocessor does.
    """

    def __init__(self, model: Wav2Vec2Model, *, normalize: bool = NORMALIZE_INPUT):
        self.model = model
        self.normalize = normalize

    @property
    def layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @classmethod
    def tiny(cls, layers: int = 3, dim: int = 32, seed: int = 0) -> AudioEncoder:
        """Toy wav2vec2 with the real CNN strides (320 samples per feature) and seeded weights."""
        config = Wav2Vec2Config(
            hidden_size=dim,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=2 * dim,
            conv_dim=(32,) * 7,
            conv_kernel=(10, 3, 3, 3, 3, 2, 2),
            conv_stride=(5, 2, 2, 2, 2, 2, 2),
            conv_bias=False,
            feat_extract_norm="group",
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
            mask_time_prob=0.0,
            mask_feature_prob=0.0,
        )
        with torch.random.fork_rng(devices=[]):  # seeded weights; the caller's RNG untouched
            torch.manual_seed(seed)
            return cls(Wav2Vec2Model(config).eval().requires_grad_(False))

    @classmethod
    def from_files(
        cls,
        path: str | os.PathLike,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        config: ConfigSource | None = None,
    ) -> AudioEncoder:
        """Load a chinese-wav2vec2-base folder (config.json + weights), or one weight file.

        A single file uses the shipped chinese-wav2vec2-base config unless ``config`` is given.
        A folder's ``preprocessor_config.json`` decides input normalisation when present.
        """
        state = read_component(path, "audio", dtype)
        arch = Wav2Vec2Config.from_dict(read_config(config, path, "chinese-wav2vec2-base.json"))
        arch.mask_time_prob = arch.mask_feature_prob = 0.0  # inference: no training-time masking
        model = load_into(
            empty_model(lambda: Wav2Vec2Model(arch)),
            state,
            device=device,
            what="wav2vec2",
            source=path,
        )
        return cls(model, normalize=_preprocessor_normalizes(Path(path)))

    @torch.inference_mode()
    def encode(
        self,
        wave: np.ndarray | torch.Tensor,
        sample_rate: int = SAMPLE_RATE,
        num_frames: int | None = None,
    ) -> torch.Tensor:
        """Mono wave [N] -> [T, layers, dim] fp32 on the model's device.

        T = ``num_frames`` if given, else int(N / sample_rate * 25), one row per video frame.
        """
        x = torch.as_tensor(wave).detach().float().cpu()
        if x.ndim != 1:
            raise ShapeError(f"AudioEncoder.encode wants a mono wave [N]; got shape {tuple(x.shape)}.")
        if sample_rate != SAMPLE_RATE:
            raise MediaError(
                f"wav2vec2 was trained on {SAMPLE_RATE} Hz audio; got {sample_rate} Hz. Load the "
                f"file with media.load_audio(path, {SAMPLE_RATE})."
            )
        if not torch.isfinite(x).all():
            raise MediaError("the audio holds NaN or infinite samples; re-export the recording.")
        if x.numel() * VIDEO_FPS < sample_rate:
            raise MediaError(
                f"audio of {x.numel()} samples is shorter than one video frame "
                f"({sample_rate // VIDEO_FPS} samples at {VIDEO_FPS} fps); pass a longer recording."
            )
        if num_frames is not None and num_frames < 1:
            raise ShapeError(f"num_frames must be at least 1; got {num_frames}.")
        frames = num_frames if num_frames is not None else int(x.numel() / sample_rate * VIDEO_FPS)
        if self.normalize:
            x = (x - x.mean()) / torch.sqrt(x.var(correction=0) + 1e-7)
        param = next(self.model.parameters())
        with _features_resampled(self.model, frames):
            out = self.model(x[None].to(param.device, param.dtype), output_hidden_states=True)
        # hidden_states[0] is the transformer's input; [1:] the outputs of its layers.
        return torch.stack(out.hidden_states[1:], dim=2)[0].float()  # (1, T, layers, dim) -> (T, layers, dim)


@contextlib.contextmanager
def _features_resampled(model: Wav2Vec2Model, frames: int) -> Iterator[None]:
    """Within the block, the CNN's features [B, C, N] come out linearly resampled to ``frames``.

    This puts InfiniteTalk's interpolation between the feature extractor and the feature
    projection while transformers runs the rest of the model unchanged.
    """

    def resample(module, inputs, features: torch.Tensor) -> torch.Tensor:
        return F.interpolate(features, size=frames, mode="linear", align_corners=True)

    handle = model.feature_extractor.register_forward_hook(resample)
    try:
        yield
    finally:
        handle.remove()


def _preprocessor_normalizes(path: Path) -> bool:
    preprocessor = path / "preprocessor_config.json"
    if path.is_dir() and preprocessor.is_file():
        return bool(json.loads(preprocessor.read_text()).get("do_normalize", NORMALIZE_INPUT))
    return NORMALIZE_INPUT


def audio_windows(features: torch.Tensor, window: int = 5) -> torch.Tensor:
    """[T, layers, dim] -> [T, window, layers, dim]: frame t gathers frames t-w//2 .. t+w//2.

    Offsets past either end repeat the first / last frame (InfiniteTalk's clamped window).
    """
    if window < 1 or window % 2 == 0:
        raise ConfigError(f"audio window must be odd and positive (centred); got {window}.")
    if features.ndim != 3:
        raise ShapeError(f"audio_windows wants features [T, layers, dim]; got {tuple(features.shape)}.")
    frames, half = features.shape[0], window // 2
    offsets = torch.arange(-half, half + 1, device=features.device)
    index = (torch.arange(frames, device=features.device)[:, None] + offsets).clamp(0, frames - 1)
    return features[index]  # (T, window) index -> (T, window, layers, dim)
