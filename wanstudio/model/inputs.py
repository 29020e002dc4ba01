"""ModelInputs: the arguments of one ``WanModel.forward``, and the one builder of random ones.

Call a model with ``model(**inputs.as_kwargs())``; ``WanModel.embed`` takes a ModelInputs
directly. :meth:`ModelInputs.example` is where every seeded random input (tests, the CLI's
inspect, the benchmark) comes from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..config import WanConfig

# fields cast by ``to(dtype=...)``: the features. t keeps fp32 (the time sinusoid is computed
# in fp64 from it; 999 is not a bf16 number) and the 0/1 masks keep theirs.
_FEATURES = ("x", "context", "clip_fea", "y", "audio")


@dataclass
class ModelInputs:
    """What ``WanModel.forward`` takes (shapes with F, H, W the latent frames, height, width).

    Attributes:
        x: latents [B, out_dim, F, H, W].
        t: timesteps [B] in [0, 1000].
        context: text-encoder tokens [B, L <= text_len, text_dim].
        clip_fea: CLIP penultimate tokens [B, 257 (any count), clip_dim] (i2v), else None.
        y: mask + image latents [B, in_dim - out_dim, F, H, W] (i2v), else None.
        audio: wav2vec2 windows [B, P, 4 (F - 1) + 1, window, layers, dim] (InfiniteTalk,
            P = 1 or 2 speakers), else None.
        ref_target_masks: [3, H_px, W_px] or [B, 3, H_px, W_px] (person 1, person 2,
            background; two speakers), else None.
    """

    x: torch.Tensor
    t: torch.Tensor
    context: torch.Tensor
    clip_fea: torch.Tensor | None = None
    y: torch.Tensor | None = None
    audio: torch.Tensor | None = None
    ref_target_masks: torch.Tensor | None = None

    @classmethod
    def example(
        cls,
        cfg: WanConfig,
        *,
        batch: int = 1,
        frames: int = 3,
        height: int = 6,
        width: int = 10,
        speakers: int = 1,
        text_tokens: int = 7,
        clip_tokens: int = 5,
        seed: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        t: float | torch.Tensor | None = None,
    ) -> ModelInputs:
        """Seeded random inputs for a model of ``cfg`` at latent size (frames, height, width).

        Fields the config does not use (y and clip_fea for t2v, audio without audio modules,
        masks for one speaker) are None. Two speakers get masks [3, 8 height, 8 width]: person
        1 the left half, person 2 the right half, background a top band overlapping both (as
        real masks may). Values are drawn on the CPU from ``torch.Generator().manual_seed(seed)``
        in the order x, context, y, clip_fea, audio, then moved to ``device`` and the features
        cast to ``dtype`` (see :meth:`to`), so a seed gives the same numbers on every machine.
        ``t`` defaults to ``linspace(999, 250, batch)``; a number gives that timestep to every
        sample.
        """
        g = torch.Generator().manual_seed(seed)
        if t is None:
            t = torch.linspace(999.0, 250.0, batch)
        elif not isinstance(t, torch.Tensor):
            t = torch.full((batch,), float(t))
        inputs = cls(
            x=torch.randn(batch, cfg.out_dim, frames, height, width, generator=g),
            t=t,
            context=torch.randn(batch, text_tokens, cfg.text_dim, generator=g),
        )
        if cfg.is_i2v:
            inputs.y = torch.randn(batch, cfg.cond_dim, frames, height, width, generator=g)
            inputs.clip_fea = torch.randn(batch, clip_tokens, cfg.clip_dim, generator=g)
        if cfg.audio:
            f_video = cfg.vae_scale * (frames - 1) + 1
            inputs.audio = torch.randn(
                batch, speakers, f_video, cfg.audio_window, cfg.audio_layers, cfg.audio_dim, generator=g
            )
            if speakers == 2:
                masks = torch.zeros(3, height * 8, width * 8)
                masks[0, :, : width * 4] = 1  # person 1: left half
                masks[1, :, width * 4 :] = 1  # person 2: right half
                masks[2, : height * 2] = 1  # background band (overlapping, as real masks may)
                inputs.ref_target_masks = masks
        return inputs.to(device, dtype)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ModelInputs:
        """A new ModelInputs on ``device`` with the features (x, context, clip_fea, y, audio) in ``dtype``.

        t and ref_target_masks keep their dtype. None leaves the device / dtype as it is.
        """
        changes = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None:
                cast = dtype if field.name in _FEATURES else None
                changes[field.name] = value.to(device=device, dtype=cast)
        return dataclasses.replace(self, **changes)

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        """The fields that are set, by name: ``model(**inputs.as_kwargs())``."""
        return {f.name: v for f in dataclasses.fields(self) if (v := getattr(self, f.name)) is not None}
