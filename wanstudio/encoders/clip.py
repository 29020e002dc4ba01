"""The CLIP ViT-H/14 image encoder (``transformers.CLIPVisionModel``), penultimate hidden states."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel

from ..errors import ShapeError
from .weights import ConfigSource, empty_model, load_into, read_component, read_config

# OpenAI CLIP normalisation, used by Wan's open-clip XLM-RoBERTa ViT-H/14 transform.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageEncoder:
    """CLIP vision tower: images [B, 3, H, W] in [-1, 1] -> [B, tokens, clip_dim].

    Wan feeds the DiT the output of the first ``layers - 1`` blocks (no post-norm): the
    penultimate hidden state, 257 tokens (class + 16 x 16 patches) x 1280 for ViT-H/14.
    """

    def __init__(self, model: CLIPVisionModel):
        self.model = model

    @property
    def clip_dim(self) -> int:
        return self.model.config.hidden_size

    @classmethod
    def tiny(cls, clip_dim: int = 64, seed: int = 0) -> ImageEncoder:
        """Toy ViT (3 layers, 2 heads) at the real 224 px / patch 14, so 257 tokens as in ViT-H."""
        config = CLIPVisionConfig(
            hidden_size=clip_dim,
            intermediate_size=4 * clip_dim,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=224,
            patch_size=14,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
        )
        with torch.random.fork_rng(devices=[]):  # seeded weights; the caller's RNG untouched
            torch.manual_seed(seed)
            return cls(CLIPVisionModel(config).eval().requires_grad_(False))

    @classmethod
    def from_files(
        cls,
        path: str | os.PathLike,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float16,
        config: ConfigSource | None = None,
    ) -> ImageEncoder:
        """Load the vision tower from the official open-clip file or HF-format CLIP weights.

        ``dtype`` defaults to fp16, the official CLIP dtype; use float32 on a CPU. ``config``
        overrides the shipped ViT-H/14 architecture (a dict, config object or config.json).
        """
        state = read_component(path, "image", dtype)
        arch = CLIPVisionConfig.from_dict(read_config(config, path, "clip-vit-h-14.json"))
        model = empty_model(lambda: CLIPVisionModel(arch))
        # position_ids is a computed buffer, never stored: rebuild it off the meta device.
        embeddings = model.embeddings
        embeddings.position_ids = torch.arange(embeddings.num_positions, device="cpu")[None]
        return cls(load_into(model, state, device=device, what="CLIP vision", source=path))

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> [B, tokens, clip_dim] in the model's dtype.

        Resized (bicubic) to the model's square input, mapped to [0, 1], CLIP-normalised.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ShapeError(
                f"ImageEncoder.encode wants images [B, 3, H, W] in [-1, 1]; got "
                f"{tuple(images.shape)}. Add a batch dim with images[None]."
            )
        size = self.model.config.image_size
        param = next(self.model.parameters())
        x = F.interpolate(
            images.to(param.device, torch.float32), size=(size, size), mode="bicubic", align_corners=False
        )
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        x = (x * 0.5 + 0.5 - mean) / std
        out = self.model(pixel_values=x.to(param.dtype), output_hidden_states=True)
        return out.hidden_states[-2]
