"""Shared fixtures: tiny models and their inputs."""

from __future__ import annotations

import pytest
import torch

import wanstudio as ws


def make_inputs(
    cfg: ws.WanConfig, *, batch=1, frames=3, height=6, width=10, speakers=1, text_tokens=7, seed=0
) -> dict:
    """Random inputs for WanModel.forward at latent size (frames, height, width), by name.

    The fields of ``ws.ModelInputs.example`` that are set (None ones left out).
    """
    return ws.ModelInputs.example(
        cfg,
        batch=batch,
        frames=frames,
        height=height,
        width=width,
        speakers=speakers,
        text_tokens=text_tokens,
        seed=seed,
    ).as_kwargs()


def call(model, inputs: dict) -> torch.Tensor:
    kw = {k: v for k, v in inputs.items() if k not in ("x", "t", "context")}
    return model(inputs["x"], inputs["t"], inputs["context"], **kw)


@pytest.fixture(params=["tiny-t2v", "tiny-i2v", "tiny-infinitetalk"])
def tiny_model(request) -> ws.WanModel:
    torch.manual_seed(0)
    return ws.WanModel(ws.WanConfig.preset(request.param)).eval()
