"""wanstudio's FP8 attention (attention_backends/fp8_triton.py) without a GPU.

The oracle (torch quantization + the kernel's arithmetic in float64) is checked against exact
attention always; the Triton kernels run in Triton's interpreter when Triton is installed (CI
installs it; conftest.py turns the interpreter on where there is no CUDA) and must write the
oracle's quantized tensors bit for bit and match its output. The GPU suite
(tests/gpu/test_fp8_attention_gpu.py) repeats the comparison on the hardware.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from wanstudio.attention_backends import fp8_triton as F

INTERPRETED = F.HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="needs Triton's interpreter (TRITON_INTERPRET=1)"
)
FIELDS = ("q", "q_scale", "k", "k_scale", "v", "v_scale", "v_mean")


def wan_like(b, lq, lk, h, d, *, k_offset=4.0, v_offset=2.0, seed=0):
    """Random q / k / v with the per-channel offsets over tokens that Wan's K and V carry."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, lq, h, d, generator=g)
    k = torch.randn(b, lk, h, d, generator=g) + k_offset * torch.randn(1, 1, h, d, generator=g)
    v = torch.randn(b, lk, h, d, generator=g) + v_offset * torch.randn(1, 1, h, d, generator=g)
    return [t.to(torch.bfloat16) for t in (q, k, v)]


def exact(q, k, v):
    s = q.double().permute(0, 2, 1, 3) @ k.double().permute(0, 2, 3, 1) / math.sqrt(q.shape[-1])
    return (torch.softmax(s, -1) @ v.double().permute(0, 2, 1, 3)).permute(0, 2, 1, 3)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


@pytest.mark.parametrize("shape", [(1, 300, 300, 2, 128), (2, 70, 33, 3, 64)])
def test_the_oracle_is_within_two_percent_of_exact_attention_on_wan_like_inputs(shape):
    q, k, v = wan_like(*shape)
    qq = F.quantize_reference(q, k, v, 64, 32)
    assert rel(F.attention_reference(qq, shape[0], shape[3]), exact(q, k, v)) < 0.02


def test_quantized_values_use_their_ranges():
    q, k, v = wan_like(1, 100, 90, 2, 64)
    qq = F.quantize_reference(q, k, v, 32, 32)
    assert qq.q.abs().max() == 127 and qq.k.abs().max() == 127
    assert qq.v.float().abs().amax(dim=2).eq(448).all()  # every channel reaches the e4m3 maximum
    assert qq.q[:, 100:].eq(0).all() and qq.k[:, 90:].eq(0).all() and qq.v.float()[:, :, 90:].eq(0).all()


@needs_interpreter
@pytest.mark.parametrize("shape, blocks", [((1, 150, 200, 2, 64), (64, 32)), ((2, 70, 33, 1, 128), (32, 32))])
def test_the_kernels_write_the_oracles_tensors_and_match_its_output(shape, blocks):
    b, lq, lk, h, d = shape
    q, k, v = wan_like(*shape)
    before = [t.clone() for t in (q, k, v)]
    reference, device = F.quantize_reference(q, k, v, *blocks), F.quantize_qkv(q, k, v, *blocks)
    for name in FIELDS:
        assert torch.equal(bits(getattr(reference, name)), bits(getattr(device, name))), name
    out = F.fp8_attention(q, k, v, block_m=blocks[0], block_n=blocks[1])
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel(out, F.attention_reference(reference, b, h)) < 0.01
    assert rel(out, exact(q, k, v)) < 0.02
    assert all(torch.equal(t, t0) for t, t0 in zip((q, k, v), before))  # inputs never written


@needs_interpreter
def test_exact_fp8_rounding_is_the_hardwares_round_to_nearest_even():
    """The interpreter's own fp32 -> fp8 conversion is wrong where rounding carries (1.98 -> 1.0);
    the EXACT path must agree with torch's conversion bit for bit: every value on a 1/64 grid
    over the range (ties, carries), random ones, subnormals and signed zeros."""
    import triton
    import triton.language as tl

    @triton.jit
    def convert(x_ptr, o_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(o_ptr + i, F._to_e4m3(tl.load(x_ptr + i), True))

    grid = torch.arange(-448 * 64, 448 * 64 + 1, dtype=torch.float32) / 64  # ties and carries
    tiny = torch.rand(1024) * 2.0**-6  # subnormals of e4m3, and below them: zeros of either sign
    x = torch.cat([grid, torch.randn(4096) * 50, tiny, -tiny, torch.tensor([-0.0, 1e-30, -1e-30])])
    x = x.clamp(-448, 448)
    x = torch.cat([x, torch.zeros(65536 - x.numel())])
    out = torch.empty(x.numel(), dtype=torch.float8_e4m3fn)
    convert[(1,)](x, out, N=x.numel())
    assert torch.equal(bits(out), bits(x.to(torch.float8_e4m3fn)))


@needs_interpreter
def test_a_batch_too_large_for_int32_offsets_runs_in_several_launches(monkeypatch):
    q, k, v = wan_like(3, 40, 50, 2, 64)
    whole = F.fp8_attention(q, k, v, block_m=32, block_n=32)
    monkeypatch.setattr(F, "_INT32_MAX", 3 * 64 * 64)  # an entry is 2 heads x 64 rows x 64: room for one
    assert F._batch_per_launch(q, k, v, 32, 32) == 1
    assert torch.equal(F.fp8_attention(q, k, v, block_m=32, block_n=32), whole)
    monkeypatch.setattr(F, "_INT32_MAX", 1000)
    with pytest.raises(ValueError, match="int32 offsets.*use attention='sdpa'"):
        F.fp8_attention(q, k, v, block_m=32, block_n=32)
