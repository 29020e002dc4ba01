"""The Wan2.1 video VAE (``diffusers.AutoencoderKLWan``) with per-channel latent normalisation."""

from __future__ import annotations

import os

import torch
from diffusers import AutoencoderKLWan

from ..errors import ShapeError
from .weights import ConfigSource, empty_model, load_into, read_component, read_config


class VAE:
    """Causal 3-D VAE: video [B, 3, 1+4k, H, W] in [-1, 1] <-> latents [B, 16, 1+k, H/8, W/8].

    Latents are normalised per channel, (mu - latents_mean) / latents_std, as the DiT was
    trained on; the posterior mean is used, never a sample. Results are float32.
    """

    z_dim: int = 16
    temporal_stride: int = 4
    spatial_stride: int = 8

    def __init__(self, model: AutoencoderKLWan):
        self.model = model
        config = model.config
        self.z_dim = config.z_dim
        self.temporal_stride = config.scale_factor_temporal
        self.spatial_stride = config.scale_factor_spatial
        param = next(model.parameters())
        shape = (1, self.z_dim, 1, 1, 1)
        self.latents_mean = torch.tensor(config.latents_mean, device=param.device).view(shape)
        self.latents_std = torch.tensor(config.latents_std, device=param.device).view(shape)

    @classmethod
    def tiny(cls, seed: int = 0) -> VAE:
        """The real block structure (and latent mean / std) at base width 8, seeded weights."""
        with torch.random.fork_rng(devices=[]):  # seeded weights; the caller's RNG untouched
            torch.manual_seed(seed)
            return cls(AutoencoderKLWan(base_dim=8, z_dim=16).eval().requires_grad_(False))

    @classmethod
    def from_files(
        cls,
        path: str | os.PathLike,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        config: ConfigSource | None = None,
    ) -> VAE:
        """Load ``Wan2.1_VAE.pth`` / its bf16 safetensors (official keys, converted by diffusers'
        own single-file converter) or a diffusers ``vae`` folder / file.

        The architecture is the Wan2.1 VAE config shipped in wanstudio unless ``config`` (a
        dict, config object or config.json) or a folder's config.json says otherwise.
        """
        state = read_component(path, "vae", dtype)
        arch = read_config(config, path, "wan2.1-vae.json")
        model = load_into(
            empty_model(lambda: AutoencoderKLWan.from_config(arch)),
            state,
            device=device,
            what="Wan VAE",
            source=path,
        )
        return cls(model)

    @torch.inference_mode()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, 1+4k, H, W] in [-1, 1] -> normalised latents [B, 16, 1+k, H/8, W/8] fp32."""
        t, s = self.temporal_stride, self.spatial_stride
        if video.ndim != 5 or video.shape[1] != 3 or (video.shape[2] - 1) % t:
            raise ShapeError(
                f"VAE.encode wants video [B, 3, 1+{t}k, H, W]; got {tuple(video.shape)}. "
                f"Videos have 1 + {t}k frames (1, {1 + t}, {1 + 2 * t}, ...)."
            )
        if video.shape[3] % s or video.shape[4] % s:
            raise ShapeError(
                f"VAE.encode wants H and W divisible by {s}; got {video.shape[3]} x "
                f"{video.shape[4]}. Crop or resize (media.choose_bucket gives valid sizes)."
            )
        param = next(self.model.parameters())
        mu = self.model.encode(video.to(param.device, param.dtype)).latent_dist.mode()
        return (mu.float() - self.latents_mean) / self.latents_std

    @torch.inference_mode()
    def decode(
        self,
        latents: torch.Tensor,
        *,
        tiled: bool = False,
        tile_px: int = 256,
        tile_stride_px: int = 192,
    ) -> torch.Tensor:
        """Normalised latents [B, 16, 1+k, h, w] -> video [B, 3, 1+4k, 8h, 8w] fp32 in [-1, 1].

        ``tiled`` decodes overlapping spatial tiles of ``tile_px`` pixels every
        ``tile_stride_px`` and blends the seams, for lower peak memory on large frames.
        """
        if latents.ndim != 5 or latents.shape[1] != self.z_dim:
            raise ShapeError(
                f"VAE.decode wants latents [B, {self.z_dim}, 1+k, h, w]; got {tuple(latents.shape)}."
            )
        param = next(self.model.parameters())
        z = latents.to(param.device, torch.float32) * self.latents_std + self.latents_mean
        z = z.to(param.dtype)
        if tiled:
            # diffusers reads its tile geometry from these attributes
            self.model.tile_sample_min_height = self.model.tile_sample_min_width = tile_px
            self.model.tile_sample_stride_height = tile_stride_px
            self.model.tile_sample_stride_width = tile_stride_px
            video = self.model.tiled_decode(z).sample
        else:
            video = self.model.decode(z).sample
        return video.float()  # diffusers clamps to [-1, 1]
