"""Our FP8 attention kernel on a CUDA GPU (sm89 / sm90): the pre-pass bit for bit against the
torch oracle, the kernel against the oracle's float64 arithmetic, the result against exact
attention on Wan-like inputs, inputs untouched, odd lengths."""

from __future__ import annotations

import math

import pytest
import torch

from wanstudio.attention_backends import fp8_triton as F

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not F.HAS_TRITON, reason="needs Triton"),
]


def _fp8_capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def wan_like(b, lq, lk, h, d, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, lq, h, d, generator=g, device="cuda")
    k = torch.randn(b, lk, h, d, generator=g, device="cuda") + 4 * torch.randn(
        1, 1, h, d, generator=g, device="cuda"
    )
    v = torch.randn(b, lk, h, d, generator=g, device="cuda") + 2 * torch.randn(
        1, 1, h, d, generator=g, device="cuda"
    )
    return [t.to(torch.bfloat16) for t in (q, k, v)]


def exact(q, k, v):
    d = q.shape[-1]
    s = q.double().permute(0, 2, 1, 3) @ k.double().permute(0, 2, 3, 1) / math.sqrt(d)
    return (torch.softmax(s, -1) @ v.double().permute(0, 2, 1, 3)).permute(0, 2, 1, 3)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.skipif(not _fp8_capable(), reason="FP8 MMA needs compute capability >= 8.9")
@pytest.mark.parametrize("shape", [(1, 1000, 1000, 4, 128), (2, 333, 77, 3, 64), (1, 257, 32, 2, 128)])
@pytest.mark.parametrize("blocks", [(128, 64), (64, 32)])
def test_kernel_matches_its_oracle_and_exact_attention(shape, blocks):
    b, lq, lk, h, d = shape
    q, k, v = wan_like(b, lq, lk, h, d)
    before = [t.clone() for t in (q, k, v)]
    ref_q = F.quantize_reference(q, k, v, *blocks)
    dev_q = F.quantize_qkv(q, k, v, *blocks)
    for name in ("q", "q_scale", "k", "k_scale", "v", "v_scale", "v_mean"):
        a, c = getattr(ref_q, name), getattr(dev_q, name)
        if a.dtype == torch.float8_e4m3fn:
            a, c = a.view(torch.uint8), c.view(torch.uint8)
        assert torch.equal(a, c), name
    out = F.fp8_attention(q, k, v, block_m=blocks[0], block_n=blocks[1])
    assert out.shape == q.shape and out.dtype == q.dtype
    oracle = F.attention_reference(ref_q, b, h)
    assert rel(out, oracle) < 0.01  # bf16 output, fp32 vs fp64 softmax, rare P rounding flips
    assert rel(out, exact(q, k, v)) < 0.02  # the bar on Wan-like inputs
    assert all(torch.equal(t, t0) for t, t0 in zip((q, k, v), before))  # inputs never written
