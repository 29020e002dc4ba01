"""Ulysses and CFG parallelism on several CUDA GPUs (NCCL), through a real torchrun launch.

Run on a machine with 2+ GPUs::

    python -m pytest tests/gpu/test_parallel_gpu.py -m gpu -rs

Each case launches ``tests/parallel_ranks.py`` (one rank per GPU): a model with the 14B
models' head dim (128) and 40 heads, InfiniteTalk with two speakers (every hook: the head
all-to-alls, the reference map, the audio attention across ranks), odd token counts.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tests", "parallel_ranks.py")
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPUS < 2, reason="needs 2+ CUDA GPUs")]

# 40 heads of 128 (dim 5120) as in the 14B models, 2 tiny-sized layers; 3 x 15 x 27 = 1,215 tokens
MODEL = ["--preset", "tiny-infinitetalk", "--heads", "40", "--dim", "5120", "--latent", "3", "30", "54"]
TOL = {"fp32": 1e-4, "bf16": 3e-2}  # fp32 (TF32 off): GEMMs of other row counts round otherwise


def torchrun(world: int, *args: str) -> dict:
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"wanstudio_parallel_{os.getpid()}.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world)]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", "29531", SCRIPT, "--out", out, *MODEL, *args]
    env = dict(os.environ, PYTHONPATH=ROOT)
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return torch.load(out)


def rel_error(result: dict) -> float:
    ref, out = result["reference"], result["parallel"]
    return ((out - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("world", [w for w in (2, 4, 5, 8) if w <= GPUS])
def test_ulysses_nccl(world, dtype):
    assert rel_error(torchrun(world, "--mode", "ulysses", "--dtype", dtype)) <= TOL[dtype]


@pytest.mark.parametrize("world", [w for w in (2, 3) if w <= GPUS])
def test_cfg_nccl(world):
    assert rel_error(torchrun(world, "--mode", "cfg", "--dtype", "bf16")) <= TOL["bf16"]


@pytest.mark.skipif(GPUS < 4, reason="needs 4 GPUs")
def test_ulysses_cfg_nccl():
    assert rel_error(torchrun(4, "--mode", "ulysses+cfg", "--dtype", "bf16")) <= TOL["bf16"]


@pytest.mark.parametrize("attention", ["flash_attn", "sageattn"])
def test_ulysses_attention_backends(attention):
    from wanstudio.attention import available_attention_modes

    if not available_attention_modes("cuda")[attention].available:
        pytest.skip(f"{attention} is not installed here")
    result = torchrun(2, "--mode", "ulysses", "--dtype", "bf16", "--attention", attention)
    assert rel_error(result) <= TOL["bf16"]
