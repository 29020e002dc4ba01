"""Small seeded forward inputs for any WanConfig, and one forward on them.

Used by the inspector, the quantization report and comparison, and the layout incidents.
"""
# TODO(merge): example_inputs becomes wanstudio.model.inputs.ModelInputs.example(...)

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..config import WanConfig


def example_inputs(
    cfg: WanConfig,
    *,
    frames: int = 2,
    height: int = 4,
    width: int = 4,
    text_tokens: int = 8,
    speakers: int = 1,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Small seeded keyword inputs for ``WanModel.forward`` (latent frames x height x width).

    Used by the inspector, the quantization report and the comparison: a few tokens exercise
    every layer and kernel of any config, the 14B ones included.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    inputs = dict(
        x=randn(1, cfg.out_dim, frames, height, width),
        t=torch.tensor([500.0], device=device),
        context=randn(1, text_tokens, cfg.text_dim),
    )
    if cfg.is_i2v:
        inputs["y"] = randn(1, cfg.cond_dim, frames, height, width)
        inputs["clip_fea"] = randn(1, 5, cfg.clip_dim)
    if cfg.audio:
        f_video = cfg.vae_scale * (frames - 1) + 1
        inputs["audio"] = randn(1, speakers, f_video, cfg.audio_window, cfg.audio_layers, cfg.audio_dim)
        if speakers == 2:
            ph, pw = cfg.patch_size[1:]
            masks = torch.zeros(3, height * 8, width * 8, device=device)
            masks[0, :, : width * 4] = 1
            masks[1, :, width * 4 :] = 1
            masks[2] = 1 - masks[0] - masks[1]
            inputs["ref_target_masks"] = masks
    return inputs


def forward(model: nn.Module, inputs: Mapping) -> torch.Tensor:
    """``model(x, t, context, **rest)`` from a dict made by :func:`example_inputs`."""
    rest = {k: v for k, v in inputs.items() if k not in ("x", "t", "context")}
    with torch.no_grad():
        return model(inputs["x"], inputs["t"], inputs["context"], **rest)
