"""Shared fixtures: tiny models and their inputs."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # no GPU: Triton kernels (if Triton is installed) run interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before wanstudio decorates its kernels

import wanstudio as ws


def _interpreter_accepts_numpy_2() -> None:
    """Triton 3.6's interpreter turns scalars into Python ints with ``int(array)``, which NumPy
    >= 2.3 refuses for 1-element arrays (every ``range(n)`` in a kernel fails): use ``.item()``."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = interpreter._patch_lang_tensor

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patch


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_accepts_numpy_2()


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
