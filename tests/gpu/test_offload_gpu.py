"""Block swap on a CUDA GPU: bit-identical outputs, bounded VRAM, flat host RSS, layouts.

Run on the device machine::

    python -m pytest tests/gpu/test_offload_gpu.py -m gpu -rs -s

A mid-size i2v config (dim 1536, 8 blocks of ~100 MB in bf16, 1,950 tokens) keeps each
forward in the tens of milliseconds. Each test leaves the shared model resident.

``WANSTUDIO_OFFLOAD_TEST_DEVICE=cpu python -m pytest tests/gpu/test_offload_gpu.py -m gpu``
rehearses the file on the CPU (tiny config, fp32, FakeTransferBackend; VRAM and pinning tests
skip).
"""

from __future__ import annotations

import gc
import os

import psutil
import pytest
import torch
from torch import nn

from wanstudio import BlockSwapError, WanConfig, WanModel
from wanstudio.offload import FakeTransferBackend, disable_block_swap, enable_block_swap, is_page_locked

DEVICE = torch.device(os.environ.get("WANSTUDIO_OFFLOAD_TEST_DEVICE", "cuda"))
ON_CUDA = DEVICE.type == "cuda"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="measures CUDA memory / pinning")

if ON_CUDA:
    MID = WanConfig.preset("i2v-14b").replace(dim=1536, ffn_dim=8960, num_heads=12, num_layers=8)
    DTYPE = torch.bfloat16
    LATENT = (5, 30, 52)  # 5 x 15 x 26 = 1,950 tokens
else:
    MID = WanConfig.preset("tiny-i2v").replace(num_layers=4)
    DTYPE = torch.float32
    LATENT = (3, 8, 12)
LAYERS = MID.num_layers


def _sync() -> None:
    if ON_CUDA:
        torch.cuda.synchronize()


def _enable(model: nn.Module, n: int, **kw) -> nn.Module:
    """enable_block_swap on CUDA; the simulated device (one per model) when rehearsing."""
    if not ON_CUDA:
        kw["backend"] = model.__dict__.setdefault("_test_backend", FakeTransferBackend())
    return enable_block_swap(model, n, **kw)


def _inputs(cfg: WanConfig) -> dict:
    g = torch.Generator(device="cpu").manual_seed(1)
    shape = (1, cfg.out_dim, *LATENT)
    kw = dict(
        x=torch.randn(*shape, generator=g),
        t=torch.tensor([700.0]),
        context=torch.randn(1, 77 if ON_CUDA else 7, cfg.text_dim, generator=g),
        y=torch.randn(1, cfg.cond_dim, *LATENT, generator=g),
        clip_fea=torch.randn(1, 257, cfg.clip_dim, generator=g),
    )
    return {k: v.to(DEVICE) for k, v in kw.items()}


def _run(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.inference_mode():
        out = model(inputs["x"], inputs["t"], inputs["context"], y=inputs["y"], clip_fea=inputs["clip_fea"])
    _sync()
    return out


def _in_host_masters(model: nn.Module, t: torch.Tensor) -> bool:
    return any(
        u.host.flat.data_ptr() <= t.data_ptr() < u.host.flat.data_ptr() + u.host.flat.numel()
        for u in model._block_swap.swapped
    )


def _weight_bytes(model: nn.Module, prefix: str | None = None, exclude: str | None = None) -> int:
    return sum(
        t.numel() * t.element_size()
        for n, t in [*model.named_parameters(), *model.named_buffers()]
        if (prefix is None or n.startswith(prefix)) and (exclude is None or not n.startswith(exclude))
    )


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = WanModel(MID, device=DEVICE, dtype=DTYPE).eval().requires_grad_(False)
    inputs = _inputs(MID)
    ref = _run(model, inputs)
    again = _run(model, inputs)
    assert torch.equal(ref, again), (
        "the resident model is not deterministic run to run on this GPU; bit-identity of "
        "block swap cannot be judged (check CUBLAS_WORKSPACE_CONFIG / the attention backend)"
    )
    yield model, inputs, ref
    disable_block_swap(model)


@pytest.fixture
def model(setup):
    m = setup[0]
    yield m
    disable_block_swap(m)
    assert all(t.device.type == DEVICE.type for t in [*m.parameters(), *m.buffers()])


@pytest.mark.parametrize("n", [0, 1, LAYERS // 2, LAYERS])
def test_outputs_are_bitwise_identical_bf16(setup, model, n):
    _, inputs, ref = setup
    _enable(model, n, prefetch=1)
    for _ in range(2):  # the second forward reuses the slots
        assert torch.equal(_run(model, inputs), ref)
    if n:
        step = model.block_swap_stats.last_step
        assert step.copies == n and step.on_demand == 0


def test_prefetch_2_with_embeddings_offloaded_is_bitwise_identical(setup, model):
    _, inputs, ref = setup
    _enable(model, LAYERS, prefetch=2, offload_txt_emb=True, offload_img_emb=True)
    assert model.block_swap_stats.num_slots == 3
    assert torch.equal(_run(model, inputs), ref)
    assert model.block_swap_stats.last_step.copies == LAYERS + 2


def test_reenable_with_another_n_then_disable(setup, model):
    _, inputs, ref = setup
    _enable(model, 2)
    assert torch.equal(_run(model, inputs), ref)
    _enable(model, LAYERS)
    assert torch.equal(_run(model, inputs), ref)
    _enable(model, 1)
    assert torch.equal(_run(model, inputs), ref)
    disable_block_swap(model)
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == 0
    assert not hasattr(model, "block_swap_stats")
    assert torch.equal(_run(model, inputs), ref)


def test_fp8_scaled_is_bitwise_identical():
    quant = pytest.importorskip("wanstudio.quant")
    torch.manual_seed(0)
    cfg = MID.replace(num_layers=4)
    model = WanModel(cfg, device=DEVICE, dtype=DTYPE).eval().requires_grad_(False)
    quant.quantize(model, "fp8_e4m3fn_scaled")
    inputs = _inputs(cfg)
    ref = _run(model, inputs)
    fp8 = [n for n, t in model.named_buffers() if t.dtype == torch.float8_e4m3fn]
    assert fp8, "quantize() left no fp8 buffer"
    _enable(model, cfg.num_layers)
    assert torch.equal(_run(model, inputs), ref)
    # the fp8 weights and their scales travelled (they are in the host masters between forwards)
    assert all(_in_host_masters(model, t) for n, t in model.named_buffers() if n.startswith("blocks."))
    disable_block_swap(model)


@cuda_only
def test_peak_vram_all_blocks_swapped(setup, model):
    _, inputs, _ = setup
    total = _weight_bytes(model)
    non_block = _weight_bytes(model, exclude="blocks.")
    _run(model, inputs)  # warm: cuBLAS workspace, RoPE tables
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _run(model, inputs)
    activations = torch.cuda.max_memory_allocated() - base
    other = base - total  # inputs, RoPE tables, workspaces: not weights

    _enable(model, LAYERS, prefetch=1)
    stats = model.block_swap_stats
    slots = stats.num_slots * stats.slot_bytes
    assert stats.num_slots == 2
    torch.cuda.synchronize()
    resident_now = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _run(model, inputs)
    peak = torch.cuda.max_memory_allocated()
    bound = non_block + slots + activations + other
    slack = 2 << 20
    report = (
        f"peak {peak / 2**20:.1f} MiB; bound {bound / 2**20:.1f} MiB = non-block weights "
        f"{non_block / 2**20:.1f} + {stats.num_slots} slots {slots / 2**20:.1f} + activations "
        f"{activations / 2**20:.1f} + other {other / 2**20:.1f}; resident model "
        f"{(total + other + activations) / 2**20:.1f} MiB"
    )
    print("\n" + report)
    assert resident_now <= non_block + slots + other + slack, report
    assert peak <= bound + slack, report
    assert stats.bytes_resident == non_block and stats.bytes_on_gpu == non_block + slots


def test_host_rss_is_flat_over_ten_forwards(setup, model):
    _, inputs, _ = setup
    _enable(model, LAYERS // 2, prefetch=1)
    proc = psutil.Process()
    _run(model, inputs)
    gc.collect()
    first = proc.memory_info().rss
    rss = []
    for _ in range(10):
        _run(model, inputs)
        rss.append(proc.memory_info().rss)
    _ = model.block_swap_stats.steps  # resolving the stats must not grow it either
    gc.collect()
    rss.append(proc.memory_info().rss)
    print(
        f"\nRSS after the first forward {first / 2**20:.0f} MiB; next 10: "
        f"{min(rss) / 2**20:.0f}..{max(rss) / 2**20:.0f} MiB"
    )
    assert max(rss) - first <= 0.01 * first
    assert first - min(rss) <= 0.01 * first


def test_swapped_tensors_keep_shape_stride_dtype_and_alignment(setup, model):
    _, inputs, ref = setup
    layouts = {
        i: {
            n: (tuple(t.shape), tuple(t.stride()), t.dtype)
            for n, t in [*b.named_parameters(), *b.named_buffers()]
        }
        for i, b in enumerate(model.blocks)
    }
    _enable(model, LAYERS // 2)
    state = model._block_swap
    seen = []

    def probe(i):
        def hook(module, args):
            slots = [(s.flat.data_ptr(), s.flat.data_ptr() + s.flat.numel()) for s in state.slots]
            for n, t in [*module.named_parameters(), *module.named_buffers()]:
                assert t.device.type == DEVICE.type, n
                assert (tuple(t.shape), tuple(t.stride()), t.dtype) == layouts[i][n], n
                assert t.data_ptr() % 16 == 0 and t.data_ptr() % 512 == 0, n
                assert any(lo <= t.data_ptr() < hi for lo, hi in slots), n
            seen.append(i)

        return hook

    handles = [
        model.blocks[i].register_forward_pre_hook(probe(i)) for i in range(LAYERS - LAYERS // 2, LAYERS)
    ]
    try:
        assert torch.equal(_run(model, inputs), ref)
    finally:
        for h in handles:
            h.remove()
    assert seen == list(range(LAYERS - LAYERS // 2, LAYERS))


@cuda_only
def test_host_masters_are_pinned(model):
    _enable(model, 2)
    state = model._block_swap
    method = model.block_swap_stats.host_memory
    assert method in ("cudaHostRegister", "pin_memory")
    for u in state.swapped:
        # is_pinned() misses cudaHostRegister'ed memory on some torch versions (2.11): CUDA is asked
        assert is_page_locked(u.host.flat), f"{u.name}: host master not page-locked ({method})"
        assert u.host.flat.data_ptr() % 512 == 0
    # and copies from it run at DMA speed (pageable memory goes through a staging buffer)
    src = state.swapped[0].host.flat
    dst = torch.empty_like(src, device=DEVICE)
    dst.copy_(src, non_blocking=True)  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        dst.copy_(src, non_blocking=True)
    end.record()
    end.synchronize()
    gbps = 3 * src.numel() / (start.elapsed_time(end) / 1e3) / 1e9
    print(
        f"\nhost masters page-locked with {method}; {model.block_swap_stats.bytes_pinned} bytes; "
        f"H2D {gbps:.1f} GB/s"
    )
    assert gbps > 5, f"copying a host master ran at {gbps:.1f} GB/s: not page-locked memory?"


def test_stats_come_from_cuda_events(setup, model):
    _, inputs, _ = setup
    _enable(model, LAYERS, prefetch=1)
    for _ in range(3):
        _run(model, inputs)
    stats = model.block_swap_stats
    steps = stats.steps
    assert len(steps) == 3
    step = steps[-1]
    assert step.copies == LAYERS and step.bytes_copied == LAYERS * stats.slot_bytes
    assert step.forward_ms > 0 and step.copy_ms > 0
    assert step.hidden_ms + step.exposed_ms >= step.copy_ms - 1e-3
    for e in step.timeline:
        assert e.copy_end > e.copy_start
        assert e.compute_start >= e.copy_end - 0.01  # compute waited for its copy
        assert e.compute_end > e.compute_start
    # a slot is rewritten only after the block that used it finished
    for a, b in zip(step.timeline, step.timeline[2:]):
        assert a.slot == b.slot and b.copy_start >= a.compute_end - 0.01
    gbps = step.bytes_copied / (step.copy_ms / 1e3) / 1e9
    print(f"\n{stats.summary()}\nH2D {gbps:.1f} GB/s per copy")


def test_cpu_device_is_refused_even_with_a_gpu(model):
    with pytest.raises(BlockSwapError, match="meaningless on the CPU"):
        enable_block_swap(model, 1, device="cpu")
    with pytest.raises(BlockSwapError, match=f"found {LAYERS} blocks"):
        _enable(model, LAYERS + 1)
