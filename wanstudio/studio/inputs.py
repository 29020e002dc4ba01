"""Small seeded forward inputs for any WanConfig, and one forward on them.

Used by the inspector, the quantization report and comparison, and the layout incidents.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..config import WanConfig
from ..model import ModelInputs


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
    """Small seeded keyword inputs for ``WanModel.forward`` (latent frames x height x width):
    :meth:`ModelInputs.example` at the studio's sizes. A few tokens exercise every layer and
    kernel of any config, the 14B ones included."""
    inputs = ModelInputs.example(
        cfg,
        frames=frames,
        height=height,
        width=width,
        text_tokens=text_tokens,
        speakers=speakers,
        seed=seed,
        t=500.0,
    )
    return inputs.to(device, dtype).as_kwargs()


def forward(model: nn.Module, inputs: Mapping) -> torch.Tensor:
    """``model(x, t, context, **rest)`` from a dict made by :func:`example_inputs`."""
    rest = {k: v for k, v in inputs.items() if k not in ("x", "t", "context")}
    with torch.no_grad():
        return model(inputs["x"], inputs["t"], inputs["context"], **rest)
