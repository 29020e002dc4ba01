"""Shared fixtures: tiny models and their inputs."""

from __future__ import annotations

import pytest
import torch

import wanstudio as ws


def make_inputs(
    cfg: ws.WanConfig, *, batch=1, frames=3, height=6, width=10, speakers=1, text_tokens=7, seed=0
) -> dict:
    """Random inputs for WanModel.forward at latent size (frames, height, width)."""
    g = torch.Generator().manual_seed(seed)
    inputs = dict(
        x=torch.randn(batch, cfg.out_dim, frames, height, width, generator=g),
        t=torch.linspace(999.0, 250.0, batch),
        context=torch.randn(batch, text_tokens, cfg.text_dim, generator=g),
    )
    if cfg.is_i2v:
        inputs["y"] = torch.randn(batch, cfg.cond_dim, frames, height, width, generator=g)
        inputs["clip_fea"] = torch.randn(batch, 5, cfg.clip_dim, generator=g)
    if cfg.audio:
        f_video = cfg.vae_scale * (frames - 1) + 1
        inputs["audio"] = torch.randn(
            batch, speakers, f_video, cfg.audio_window, cfg.audio_layers, cfg.audio_dim, generator=g
        )
        if speakers == 2:
            masks = torch.zeros(3, height * 8, width * 8)
            masks[0, :, : width * 4] = 1  # person 1: left half
            masks[1, :, width * 4 :] = 1  # person 2: right half
            masks[2, : height * 2] = 1  # background band (overlapping, as real masks may)
            inputs["ref_target_masks"] = masks
    return inputs


def call(model, inputs: dict) -> torch.Tensor:
    kw = {k: v for k, v in inputs.items() if k not in ("x", "t", "context")}
    return model(inputs["x"], inputs["t"], inputs["context"], **kw)


@pytest.fixture(params=["tiny-t2v", "tiny-i2v", "tiny-infinitetalk"])
def tiny_model(request) -> ws.WanModel:
    torch.manual_seed(0)
    return ws.WanModel(ws.WanConfig.preset(request.param)).eval()
