"""The Wan2.1 video VAE (``diffusers.AutoencoderKLWan``) with per-channel latent normalisation."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
from diffusers import AutoencoderKLWan

from ..errors import ConfigError, ShapeError
from .vae_tiling import (
    VAETiling,
    auto_tiling,
    decode_tiles,
    encode_tiles,
    free_device_bytes,
    smaller_tiling,
    working_set_bytes,
)
from .weights import ConfigSource, empty_model, load_into, read_component, read_config

log = logging.getLogger(__name__)


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
        shape = (1, self.z_dim, 1, 1, 1)  # moved to the model's device at each use
        self.latents_mean = torch.tensor(config.latents_mean).view(shape)
        self.latents_std = torch.tensor(config.latents_std).view(shape)

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

    def _normalisation(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents_mean, latents_std) on ``device`` (the model may have moved since __init__)."""
        return self.latents_mean.to(device), self.latents_std.to(device)

    def working_set_bytes(self, kind: str, shape: tuple[int, ...], *, tiling: VAETiling | None = None) -> int:
        """Device bytes beyond the weights that ``kind`` ('encode' / 'decode') of ``shape`` needs.

        ``shape`` is the video [B, 3, F, H, W] to encode or the latents [B, z, T, h, w] to
        decode; ``tiling`` None is the untiled path. An estimate from the architecture (see
        :mod:`wanstudio.encoders.vae_tiling`), for the memory planner and ``tiled="auto"``.
        """
        dtype = next(self.model.parameters()).dtype
        return working_set_bytes(self.model.config, dtype, tuple(shape), kind=kind, tiling=tiling)

    def _choose_tiling(
        self,
        kind: str,
        shape: tuple[int, ...],
        tiled: bool | str,
        tiling: VAETiling | None,
        budget: int | None,
        param: torch.Tensor,
    ) -> VAETiling | None:
        if tiled is True:
            return tiling if tiling is not None else VAETiling()
        if tiling is not None:
            raise ConfigError(
                f"VAE.{kind} got tiling={tiling} with tiled={tiled!r}; pass tiled=True to use it"
            )
        if tiled is False:
            return None
        if tiled != "auto":
            raise ConfigError(f"VAE.{kind}: tiled must be True, False or 'auto', got {tiled!r}")
        if budget is None:
            budget = free_device_bytes(param.device)
        return auto_tiling(self.model.config, param.dtype, shape, budget, kind=kind)

    @torch.inference_mode()
    def encode(
        self,
        video: torch.Tensor,
        *,
        tiled: bool | str = False,
        tiling: VAETiling | None = None,
        memory_budget_bytes: int | None = None,
    ) -> torch.Tensor:
        """[B, 3, 1+4k, H, W] in [-1, 1] -> normalised latents [B, 16, 1+k, H/8, W/8] fp32.

        ``tiled=True`` encodes overlapping spatial tiles (``tiling``, default
        ``VAETiling()``: 256 px every 192 px at most) and blends them; the video may then stay
        on the host, each chunk of each tile moves to the device when it runs. ``"auto"`` tiles
        only when the untiled working set would not fit ``memory_budget_bytes`` (default: the
        free memory of a CUDA device; never on the CPU), and should the device run out of
        memory anyway, retries in smaller tiles. One tile covering the frame gives the untiled
        result exactly.
        """
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
        chosen = self._choose_tiling("encode", tuple(video.shape), tiled, tiling, memory_budget_bytes, param)

        def run(chosen: VAETiling | None) -> torch.Tensor:
            if chosen is None:
                return self.model.encode(video.to(param.device, param.dtype)).latent_dist.mode()
            return encode_tiles(self.model, video, chosen, device=param.device, dtype=param.dtype)

        latent_hw = (video.shape[3] // s, video.shape[4] // s)
        mu = self._run_auto("encode", run, chosen, latent_hw, retry=tiled == "auto")
        mean, std = self._normalisation(mu.device)
        return (mu.float() - mean) / std

    @torch.inference_mode()
    def decode(
        self,
        latents: torch.Tensor,
        *,
        tiled: bool | str = False,
        tiling: VAETiling | None = None,
        memory_budget_bytes: int | None = None,
        out_device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Normalised latents [B, 16, 1+k, h, w] -> video [B, 3, 1+4k, 8h, 8w] fp32 in [-1, 1].

        ``tiled=True`` decodes overlapping spatial tiles (``tiling``, default ``VAETiling()``)
        blended with linear ramps, each decoded chunk added into the output at once;
        ``"auto"`` tiles only when the untiled working set would not fit
        ``memory_budget_bytes`` (default: free CUDA memory; never on the CPU) and retries in
        smaller tiles should the device run out of memory anyway. One tile covering
        the frame gives the untiled result exactly. ``out_device`` (tiled path) is where the
        video is assembled, e.g. 'cpu' to keep it off the GPU.
        """
        if latents.ndim != 5 or latents.shape[1] != self.z_dim:
            raise ShapeError(
                f"VAE.decode wants latents [B, {self.z_dim}, 1+k, h, w]; got {tuple(latents.shape)}."
            )
        param = next(self.model.parameters())
        mean, std = self._normalisation(param.device)
        z = latents.to(param.device, torch.float32) * std + mean
        z = z.to(param.dtype)
        chosen = self._choose_tiling(
            "decode", tuple(latents.shape), tiled, tiling, memory_budget_bytes, param
        )

        def run(chosen: VAETiling | None) -> torch.Tensor:
            if chosen is None:
                video = self.model.decode(z).sample.float()  # diffusers clamps to [-1, 1]
                return video if out_device is None else video.to(out_device)
            return decode_tiles(self.model, z, chosen, out_device=out_device)

        return self._run_auto("decode", run, chosen, tuple(z.shape[3:]), retry=tiled == "auto")

    def _run_auto(
        self,
        kind: str,
        run: Callable[[VAETiling | None], torch.Tensor],
        chosen: VAETiling | None,
        latent_hw: tuple[int, int],
        *,
        retry: bool,
    ) -> torch.Tensor:
        """``run(chosen)``; with ``retry`` (``tiled="auto"``) a device out-of-memory error
        retries with the next smaller tiles (:func:`smaller_tiling`) until none is left."""
        while True:
            try:
                return run(chosen)
            except torch.OutOfMemoryError:
                smaller = smaller_tiling(chosen, *latent_hw) if retry else None
                if smaller is None:
                    raise
            # outside the except block, so the failed attempt's frames (and tensors) are freed;
            # diffusers keeps its causal cache on the model and clears it only on the next call
            self.model.clear_cache()
            log.warning(
                "VAE %s ran out of device memory %s; retrying in %d-px tiles",
                kind,
                "untiled" if chosen is None else f"in {chosen.tile * self.spatial_stride}-px tiles",
                smaller.tile * self.spatial_stride,
            )
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            chosen = smaller
