"""Block swap bookkeeping, on the CPU, with the device simulated by FakeTransferBackend."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wanstudio import BlockSwapError, WanConfig, WanModel
from wanstudio.layout import listen
from wanstudio.offload import (
    BLOCK_SWAP_CONTRACT,
    CudaTransferBackend,
    FakeTransferBackend,
    check_blocks_to_swap,
    disable_block_swap,
    enable_block_swap,
    is_page_locked,
    plan_block_swap,
    swap_placement,
    transfer,
)


# The tiny model is tiny; two busy cores make multi-threaded GEMMs much slower than one thread.
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(preset: str = "tiny-t2v", layers: int | None = None) -> WanModel:
    cfg = WanConfig.preset(preset)
    if layers is not None:
        cfg = cfg.replace(num_layers=layers)
    torch.manual_seed(0)
    return WanModel(cfg).eval()


def _inputs(cfg: WanConfig) -> dict:
    """Inputs as in WanModel.forward's docstring: 3 latent frames of 8 x 12 (odd-ish, non-square)."""
    g = torch.Generator().manual_seed(1)
    kw = dict(
        x=torch.randn(1, cfg.out_dim, 3, 8, 12, generator=g),
        t=torch.tensor([637.0]),
        context=torch.randn(1, 7, cfg.text_dim, generator=g),
    )
    if cfg.is_i2v:
        kw["y"] = torch.randn(1, cfg.cond_dim, 3, 8, 12, generator=g)
        kw["clip_fea"] = torch.randn(1, 257, cfg.clip_dim, generator=g)
    return kw


def _run(model: WanModel, inputs: dict) -> torch.Tensor:
    with torch.inference_mode():
        return model(
            inputs["x"],
            inputs["t"],
            inputs["context"],
            **{k: v for k, v in inputs.items() if k not in ("x", "t", "context")},
        )


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _snapshot(model: nn.Module) -> dict[str, tuple]:
    return {
        n: (tuple(t.shape), tuple(t.stride()), t.dtype, t.device, t.detach().clone())
        for n, t in [*model.named_parameters(), *model.named_buffers()]
    }


def _marker_hooks(model: WanModel, fb: FakeTransferBackend) -> None:
    """Log ('run', name) when each block starts (after block swap's own pre-hook)."""
    for i, b in enumerate(model.blocks):
        b.register_forward_pre_hook(lambda m, a, i=i: fb.ops.append(("run", f"blocks.{i}")))


def _schedule(fb: FakeTransferBackend) -> list[str]:
    out = []
    for op in fb.ops:
        if op[0] == "copy":
            out.append("copy " + op[1].split("->")[0])
        elif op[0] == "run":
            out.append("run " + op[1])
    return out


# --- which blocks swap ------------------------------------------------------------------------
def test_placement_puts_the_last_n_blocks_in_pinned_host_memory():
    cfg = WanConfig.preset("tiny-t2v").replace(num_layers=4)
    placement = swap_placement(cfg, 2)
    assert placement == swap_placement(WanModel(cfg, device="meta"), 2)
    host = {n for n, where in placement.items() if where == "cpu_pinned"}
    assert host and all(n.startswith(("blocks.2.", "blocks.3.")) for n in host)
    assert all(where == "cuda" for n, where in placement.items() if n not in host)
    assert set(placement) == set(WanModel(cfg, device="meta").state_dict())


def test_placement_with_embedding_offloads():
    placement = swap_placement(WanConfig.preset("tiny-i2v"), 0, offload_txt_emb=True, offload_img_emb=True)
    host = {n.split(".")[0] for n, where in placement.items() if where == "cpu_pinned"}
    assert host == {"text_embedding", "img_emb"}


def test_enable_swaps_exactly_the_last_n_blocks():
    model = _model(layers=4)
    fb = FakeTransferBackend()
    enable_block_swap(model, 2, backend=fb)
    stats = model.block_swap_stats
    assert stats.swapped == ("blocks.2", "blocks.3")
    assert stats.blocks_to_swap == 2
    _run(model, _inputs(model.config))
    assert {c.split("->")[0] for c in fb.copies()} == {"blocks.2", "blocks.3"}
    # one host buffer per swapped block: all its tensors share it
    for i, b in enumerate(model.blocks):
        storages = {t.untyped_storage().data_ptr() for t in b.parameters()}
        assert (len(storages) == 1) == (i >= 2)


# --- outputs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, prefetch", [(1, 1), (2, 0), (2, 1), (2, 2)])
def test_output_is_bitwise_identical_to_the_resident_model(n, prefetch):
    model = _model()
    inputs = _inputs(model.config)
    ref = _run(model, inputs)
    enable_block_swap(model, n, prefetch=prefetch, backend=FakeTransferBackend())
    assert torch.equal(_run(model, inputs), ref)
    assert torch.equal(_run(model, inputs), ref)  # slots reused: still identical


def test_i2v_with_embeddings_offloaded_is_bitwise_identical():
    model = _model("tiny-i2v")
    inputs = _inputs(model.config)
    ref = _run(model, inputs)
    fb = FakeTransferBackend()
    enable_block_swap(model, 2, prefetch=2, offload_txt_emb=True, offload_img_emb=True, backend=fb)
    assert torch.equal(_run(model, inputs), ref)
    assert [c.split("->")[0] for c in fb.copies()] == ["text_embedding", "img_emb", "blocks.0", "blocks.1"]


# --- slots and schedule -------------------------------------------------------------------------
@pytest.mark.parametrize("prefetch, slots", [(0, 1), (1, 2), (2, 3)])
def test_slots_are_reused_round_robin(prefetch, slots):
    """The least recently released slot is reused, across forwards too."""
    model = _model(layers=4)
    fb = FakeTransferBackend()
    enable_block_swap(model, 4, prefetch=prefetch, backend=fb)
    assert model.block_swap_stats.num_slots == slots
    _run(model, _inputs(model.config))
    _run(model, _inputs(model.config))
    used = [int(c.rsplit("slot", 1)[1]) for c in fb.copies()]
    assert used == [i % slots for i in range(8)]
    assert [c.split("->")[0] for c in fb.copies()] == [f"blocks.{i}" for i in range(4)] * 2


def test_pool_is_never_larger_than_the_swapped_units():
    model = _model(layers=4)
    enable_block_swap(model, 1, prefetch=3, backend=FakeTransferBackend())
    assert model.block_swap_stats.num_slots == 1


@pytest.mark.parametrize(
    "n, prefetch, expected",
    [
        # prefetch 1: a block's copy starts when the block before it starts
        (
            2,
            1,
            [
                "run blocks.0",
                "copy blocks.2",
                "run blocks.1",
                "copy blocks.3",
                "run blocks.2",
                "run blocks.3",
            ],
        ),
        # prefetch 2: two blocks ahead
        (
            2,
            2,
            [
                "copy blocks.2",
                "run blocks.0",
                "copy blocks.3",
                "run blocks.1",
                "run blocks.2",
                "run blocks.3",
            ],
        ),
        # every block swapped: the model's forward starts the first `prefetch` copies
        (
            4,
            1,
            [
                "copy blocks.0",
                "copy blocks.1",
                "run blocks.0",
                "copy blocks.2",
                "run blocks.1",
                "copy blocks.3",
                "run blocks.2",
                "run blocks.3",
            ],
        ),
        (
            4,
            2,
            [
                "copy blocks.0",
                "copy blocks.1",
                "copy blocks.2",
                "run blocks.0",
                "copy blocks.3",
                "run blocks.1",
                "run blocks.2",
                "run blocks.3",
            ],
        ),
        # no prefetch: each copy when its block is reached
        (
            2,
            0,
            [
                "run blocks.0",
                "run blocks.1",
                "copy blocks.2",
                "run blocks.2",
                "copy blocks.3",
                "run blocks.3",
            ],
        ),
    ],
)
def test_prefetch_schedule(n, prefetch, expected):
    model = _model(layers=4)
    fb = FakeTransferBackend()
    enable_block_swap(model, n, prefetch=prefetch, backend=fb)
    _marker_hooks(model, fb)
    _run(model, _inputs(model.config))
    assert _schedule(fb) == expected
    on_demand = [e.on_demand for e in model.block_swap_stats.timeline]
    assert on_demand == [prefetch == 0] * n


def test_events_order_compute_after_copy_and_copy_after_the_slots_last_compute():
    model = _model(layers=4)
    fb = FakeTransferBackend()
    enable_block_swap(model, 4, prefetch=1, backend=fb)
    _run(model, _inputs(model.config))
    ops = fb.ops

    def at(*op) -> int:
        return next(i for i, o in enumerate(ops) if o[: len(op)] == op)

    last_user: dict[int, str] = {}
    for i in range(4):
        slot = i % 2
        tag = f"blocks.{i}@{slot}"
        copy = at("copy", f"blocks.{i}->slot{slot}")
        # compute waits for this copy before the block starts
        assert copy < at("wait", "compute", f"copy_end:{tag}") < at("record", "compute", f"start:{tag}")
        # the slot is rewritten only after the copy stream waited for its previous block's end
        if slot in last_user:
            prev_end = f"end:{last_user[slot]}"
            assert at("record", "compute", prev_end) < at("wait", "copy", prev_end) < copy
        last_user[slot] = tag


# --- stats --------------------------------------------------------------------------------------
def test_stats_account_copies_hidden_and_exposed():
    model = _model(layers=4)
    unit = sum(t.numel() * t.element_size() for t in model.blocks[0].parameters())
    fb = FakeTransferBackend(copy_bytes_per_ms=unit / 4, compute_ms=10.0)  # ~4 ms copy, 10 ms compute
    enable_block_swap(model, 4, prefetch=1, backend=fb)
    stats = model.block_swap_stats
    for _ in range(3):
        _run(model, _inputs(model.config))
    steps = stats.steps
    assert len(steps) == 3 and len(stats.copy_ms_per_step) == 3
    step = steps[-1]
    copy = stats.slot_bytes / (unit / 4)  # the padded unit is copied in one piece
    assert step.copies == 4 and step.on_demand == 0
    assert step.bytes_copied == 4 * stats.slot_bytes
    assert step.copy_ms == pytest.approx(4 * copy)
    # the first copy starts with the forward and is exposed; the others hide behind compute
    assert step.exposed_ms == pytest.approx(copy)
    assert step.hidden_ms == pytest.approx(3 * copy)
    assert step.forward_ms == pytest.approx(copy + 4 * 10.0)
    first, second = step.timeline[:2]
    assert first.copy_start == pytest.approx(0.0) and first.compute_start == pytest.approx(copy)
    assert second.compute_start == pytest.approx(first.compute_end)  # no wait
    assert second.copy_start == pytest.approx(first.compute_start)  # issued as block 0 started
    # sizes
    resident = sum(
        t.numel() * t.element_size()
        for n, t in [*model.named_parameters(), *model.named_buffers()]
        if not n.startswith("blocks.")
    )
    assert stats.bytes_resident == resident
    assert stats.bytes_on_gpu == resident + 2 * stats.slot_bytes
    assert stats.bytes_pinned == 4 * stats.slot_bytes
    assert stats.bytes_swapped == 4 * unit
    assert "exposed" in stats.summary() and "hidden" in repr(stats)


def test_host_memory_and_slots_are_allocated_once():
    model = _model()
    fb = FakeTransferBackend()
    enable_block_swap(model, 2, backend=fb)
    allocs = [op for op in fb.ops if op[0] in ("alloc_host", "alloc_slot")]
    assert [op[0] for op in allocs] == ["alloc_host"] * 2 + ["alloc_slot"] * 2
    for _ in range(4):
        _run(model, _inputs(model.config))
    assert [op for op in fb.ops if op[0] in ("alloc_host", "alloc_slot")] == allocs
    assert len(model.block_swap_stats.steps) == 4


def test_plot_timeline():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    model = _model()
    enable_block_swap(model, 2, backend=FakeTransferBackend())
    with pytest.raises(BlockSwapError, match="no forward"):
        model.block_swap_stats.plot_timeline()
    _run(model, _inputs(model.config))
    ax = model.block_swap_stats.plot_timeline()
    assert len(ax.patches) == 3 * 2


# --- layout -------------------------------------------------------------------------------------
class PackedLinear(nn.Module):
    """A stand-in for a quantized linear: fp8 weight buffer, fp32 scale parameter, packed uint8
    bytes, a non-persistent derived buffer and a transposed (non-contiguous) buffer."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        w = lin.weight.detach()
        scale = w.abs().amax(dim=1) / 448.0
        self.register_buffer("weight", (w / scale[:, None]).to(torch.float8_e4m3fn))
        self.scale_weight = nn.Parameter(scale.float())
        self.register_buffer(
            "weight_packed", torch.randint(0, 255, (w.shape[0], w.shape[1] // 2), dtype=torch.uint8)
        )
        self.register_buffer("_scale_b", scale.float()[None, :].clone(), persistent=False)
        self.register_buffer("bias_t", lin.bias.detach().clone()[:, None].t())  # (1, N), stride (1, 1)
        self.register_buffer("odd", torch.arange(10, dtype=torch.float64)[1::3])  # storage offset
        self.register_buffer("w_t", torch.randn(w.shape[1], w.shape[0]).t())  # column-major [N, K]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(torch.float32) * self._scale_b.t() * (self.scale_weight[:, None] > 0)
        extra = (self.weight_packed[0, 0] * 0).float() + (self.odd.sum() + self.w_t[0, 0]).float() * 0
        return (F.linear(x.float(), w) + self.bias_t + extra).to(x.dtype)


def _swapped_layout_probe(model, which, fb_state_slots, seen):
    """A pre-hook (runs after block swap's) that checks every tensor of a swapped block."""

    def probe(module, args):
        slots = [(s.flat.data_ptr(), s.flat.data_ptr() + s.flat.numel()) for s in fb_state_slots()]
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            ref = which[name]
            assert (tuple(t.shape), tuple(t.stride()), t.dtype) == ref[:3], name
            assert t.data_ptr() % 512 == 0, name
            assert any(lo <= t.data_ptr() < hi for lo, hi in slots) or t.numel() == 0, name
            seen.add(name)

    return probe


def test_every_parameter_and_buffer_moves_with_its_layout_whatever_the_module():
    model = _model()
    for b in model.blocks:
        b.ffn[0] = PackedLinear(b.ffn[0])
    inputs = _inputs(model.config)
    ref = _run(model, inputs)
    block = model.blocks[1]
    layouts = {
        n: (tuple(t.shape), tuple(t.stride()), t.dtype)
        for n, t in [*block.named_parameters(), *block.named_buffers()]
    }
    enable_block_swap(model, 1, backend=FakeTransferBackend())
    seen: set[str] = set()
    block.register_forward_pre_hook(
        _swapped_layout_probe(model, layouts, lambda: model._block_swap.slots, seen)
    )
    assert torch.equal(_run(model, inputs), ref)
    assert seen == set(layouts)  # fp8 weight, scale, packed bytes, non-persistent, strided
    # between forwards, every tensor is its pinned host master
    host = model._block_swap.units[-1].host.flat
    lo, hi = host.data_ptr(), host.data_ptr() + host.numel()
    for n, t in [*block.named_parameters(), *block.named_buffers()]:
        assert lo <= t.data_ptr() < hi, n
        assert (tuple(t.shape), tuple(t.stride()), t.dtype) == layouts[n]


def test_swapped_tensors_keep_layout_and_alignment():
    model = _model(layers=3)
    layouts = {
        i: {
            n: (tuple(t.shape), tuple(t.stride()), t.dtype)
            for n, t in [*b.named_parameters(), *b.named_buffers()]
        }
        for i, b in enumerate(model.blocks)
    }
    enable_block_swap(model, 2, backend=FakeTransferBackend())
    seen: set[str] = set()
    for i in (1, 2):
        model.blocks[i].register_forward_pre_hook(
            _swapped_layout_probe(model, layouts[i], lambda: model._block_swap.slots, seen)
        )
    _run(model, _inputs(model.config))
    assert seen == set(layouts[1])


def test_the_copy_declares_and_checks_a_layout_contract():
    assert BLOCK_SWAP_CONTRACT.kernel == "block_swap_copy"
    assert BLOCK_SWAP_CONTRACT.operand("swapped").align == 16
    model = _model()
    enable_block_swap(model, 1, backend=FakeTransferBackend())
    events = []
    with listen(events.append):
        _run(model, _inputs(model.config))
    swap_events = [e for e in events if e.kernel == "block_swap_copy"]
    names = {
        n
        for n, _ in [
            *model.blocks[1].named_parameters(prefix="blocks.1"),
            *model.blocks[1].named_buffers(prefix="blocks.1"),
        ]
    }
    assert {e.where for e in swap_events} == names
    assert not any(e.violations for e in swap_events)


# --- disable / re-enable --------------------------------------------------------------------------
def test_disable_removes_every_hook_and_restores_the_weights():
    model = _model()
    inputs = _inputs(model.config)
    ref = _run(model, inputs)
    before = _snapshot(model)
    hooks = _hooks(model)
    enable_block_swap(model, 2, prefetch=1, offload_txt_emb=True, backend=FakeTransferBackend())
    assert _hooks(model) > hooks
    _run(model, inputs)
    assert disable_block_swap(model) is model
    assert _hooks(model) == hooks
    assert not hasattr(model, "block_swap_stats") and "_block_swap" not in vars(model)
    after = _snapshot(model)
    for n, (shape, stride, dtype, device, value) in before.items():
        assert after[n][:4] == (shape, stride, dtype, device), n
        assert torch.equal(after[n][4], value), n
    # each tensor in its own allocation again (no flat buffer shared by a block)
    ptrs = [t.untyped_storage().data_ptr() for t in model.blocks[1].parameters()]
    assert len(set(ptrs)) == len(ptrs)
    assert torch.equal(_run(model, inputs), ref)
    assert disable_block_swap(model) is model  # idempotent


def test_zero_blocks_is_no_swap_at_all():
    model = _model()
    hooks = _hooks(model)
    fb = FakeTransferBackend()
    assert enable_block_swap(model, 0, backend=fb) is model
    assert _hooks(model) == hooks and fb.ops == [] and not hasattr(model, "block_swap_stats")
    enable_block_swap(model, 1, backend=fb)
    enable_block_swap(model, 0, backend=fb)  # turns it off
    assert _hooks(model) == hooks and not hasattr(model, "block_swap_stats")


def test_reenable_with_another_n_moves_only_the_blocks_that_change_sides():
    model = _model(layers=3)
    inputs = _inputs(model.config)
    ref = _run(model, inputs)
    fb = FakeTransferBackend()
    enable_block_swap(model, 1, backend=fb)
    assert torch.equal(_run(model, inputs), ref)
    enable_block_swap(model, 3, prefetch=2, backend=fb)
    assert model.block_swap_stats.swapped == ("blocks.0", "blocks.1", "blocks.2")
    assert sum(op[0] == "alloc_host" for op in fb.ops) == 3  # blocks.2 kept its host buffer
    assert torch.equal(_run(model, inputs), ref)
    enable_block_swap(model, 1, backend=fb)
    assert sum(op[0] == "to_device" for op in fb.ops) == sum(
        1 for b in model.blocks[:2] for _ in [*b.parameters(), *b.buffers()]
    )
    assert torch.equal(_run(model, inputs), ref)
    assert _hooks(model) == 2 + 2 * 1 + 1  # model pre/post; blocks.2 pre/post; blocks.1 pre


# --- the loader hook ------------------------------------------------------------------------------
def test_plan_on_a_meta_model_then_load_in_place_then_enable():
    ref_model = _model()
    inputs = _inputs(ref_model.config)
    ref = _run(ref_model, inputs)
    state = ref_model.state_dict()

    model = WanModel(ref_model.config, device="meta").eval()
    fb = FakeTransferBackend()
    plan = plan_block_swap(model, 1, backend=fb)
    assert plan.swapped == ("blocks.1",)
    assert plan.placement == swap_placement(model, 1)
    assert plan.bytes_pinned > 0
    # the loader: resident tensors on the device (here the simulated one: the CPU) ...
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if plan.placement[name] == "cuda":
            assert t.device.type == "meta"
            t_new = torch.empty_like(t, device="cpu")
            owner, _, attr = name.rpartition(".")
            mod = model.get_submodule(owner)
            if attr in mod._parameters:
                mod._parameters[attr] = nn.Parameter(t_new, requires_grad=t.requires_grad)
            else:
                mod._buffers[attr] = t_new
        else:
            assert t.device.type == "cpu"  # already in (uninitialised) host memory
    host_ptrs = {n: t.data_ptr() for n, t in model.blocks[1].named_parameters()}
    model.load_state_dict(state)  # copies into the planned host tensors, in place
    assert {n: t.data_ptr() for n, t in model.blocks[1].named_parameters()} == host_ptrs
    n_alloc = sum(op[0] == "alloc_host" for op in fb.ops)
    enable_block_swap(model, 1, backend=fb)
    assert sum(op[0] == "alloc_host" for op in fb.ops) == n_alloc  # nothing packed twice
    assert torch.equal(_run(model, inputs), ref)


def test_enable_packs_blocks_loaded_on_the_cpu():
    model = _model()
    inputs = _inputs(model.config)
    ref = _run(model, inputs)
    plan = swap_placement(model, 2)
    assert all(t.device.type == "cpu" for t in model.parameters())
    enable_block_swap(model, 2, backend=FakeTransferBackend())
    assert torch.equal(_run(model, inputs), ref)
    assert set(plan) == {
        n
        for n, _ in [
            *model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False),
        ]
    }


# --- errors ------------------------------------------------------------------------------------
def _untouched(model: WanModel, hooks: int) -> None:
    assert _hooks(model) == hooks and "_block_swap" not in vars(model)
    assert not hasattr(model, "block_swap_stats")


def test_more_blocks_than_the_model_has():
    model = _model()
    hooks = _hooks(model)
    with pytest.raises(BlockSwapError, match=r"blocks_to_swap=3 .* found 2 blocks.*0\.\.2"):
        enable_block_swap(model, 3, backend=FakeTransferBackend())
    with pytest.raises(BlockSwapError, match="found 2 blocks"):
        swap_placement(model.config, 3)
    _untouched(model, hooks)


@pytest.mark.parametrize("n", [-1, True, 1.5, "2"])
def test_negative_or_non_integer_block_counts(n):
    model = _model()
    with pytest.raises(BlockSwapError, match="blocks_to_swap must be"):
        enable_block_swap(model, n, backend=FakeTransferBackend())
    _untouched(model, _hooks(model))


def test_negative_prefetch():
    model = _model()
    with pytest.raises(BlockSwapError, match="prefetch must be >= 0"):
        enable_block_swap(model, 1, prefetch=-1, backend=FakeTransferBackend())


def test_cpu_device_is_meaningless():
    model = _model()
    hooks = _hooks(model)
    with pytest.raises(BlockSwapError, match="meaningless on the CPU.*Nothing to swap to"):
        enable_block_swap(model, 1, device="cpu")
    with pytest.raises(BlockSwapError, match="meaningless on the CPU"):
        plan_block_swap(model, 1, device="cpu")
    _untouched(model, hooks)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine message")
def test_cpu_only_machine_is_meaningless():
    model = _model()
    with pytest.raises(BlockSwapError, match="meaningless on a CPU-only machine"):
        enable_block_swap(model, 1)
    with pytest.raises(BlockSwapError, match="no CUDA device"):
        enable_block_swap(model, 1, device="cuda")
    _untouched(model, _hooks(model))


def test_not_enough_host_memory_says_what_is_needed_and_free():
    model = _model(layers=4)
    hooks = _hooks(model)
    before = _snapshot(model)
    available = (1 << 30) + (1 << 20)  # the 1 GiB headroom + 1 MiB: less than one block
    fb = FakeTransferBackend(host_available=available)
    with pytest.raises(BlockSwapError) as err:
        enable_block_swap(model, 4, backend=fb)
    msg = str(err.value)
    need = 4 * sum(t.numel() * t.element_size() for t in model.blocks[0].parameters())
    assert "not enough host memory to pin" in msg
    assert f"needs {need / 1e6:.1f} MB of pinned host memory for 4 unit(s)" in msg
    assert f"{available / 1e9:.2f} GB is available" in msg
    assert "headroom" in msg and "Swap fewer blocks" in msg
    assert fb.ops == []  # measured before pinning anything
    _untouched(model, hooks)
    after = _snapshot(model)
    assert all(torch.equal(after[n][4], v[4]) and after[n][:4] == v[:4] for n, v in before.items())


def test_not_enough_host_memory_when_growing_keeps_the_current_swap():
    model = _model(layers=4)
    inputs = _inputs(model.config)
    ref = _run(model, inputs)
    fb = FakeTransferBackend()
    enable_block_swap(model, 1, backend=fb)
    fb.host_available = 1 << 20
    with pytest.raises(BlockSwapError, match="not enough host memory"):
        enable_block_swap(model, 4, backend=fb)
    assert model.block_swap_stats.swapped == ("blocks.3",)
    assert torch.equal(_run(model, inputs), ref)


def test_offloading_an_img_emb_the_model_does_not_have():
    with pytest.raises(BlockSwapError, match="no img_emb"):
        enable_block_swap(_model(), 1, offload_img_emb=True, backend=FakeTransferBackend())


def test_weights_still_on_meta():
    model = WanModel(WanConfig.preset("tiny-t2v"), device="meta")
    with pytest.raises(BlockSwapError, match="meta device"):
        enable_block_swap(model, 1, backend=FakeTransferBackend())
    assert "_block_swap" not in vars(model)


def test_a_model_without_blocks():
    with pytest.raises(BlockSwapError, match="blocks"):
        enable_block_swap(nn.Linear(2, 2), 1, backend=FakeTransferBackend())


def test_a_tensor_shared_by_a_swapped_and_a_resident_block():
    model = _model()
    model.blocks[1].modulation = model.blocks[0].modulation
    with pytest.raises(BlockSwapError, match="same tensor"):
        enable_block_swap(model, 1, backend=FakeTransferBackend())
    assert "_block_swap" not in vars(model)


def test_autograd_on_is_refused():
    model = _model()
    inputs = _inputs(model.config)
    ref = _run(_model(), inputs)  # a twin: RoPE tables cached in inference mode refuse grad
    enable_block_swap(model, 2, backend=FakeTransferBackend())
    with pytest.raises(BlockSwapError, match="inference_mode"):
        model(inputs["x"], inputs["t"], inputs["context"])
    assert torch.equal(_run(model, inputs), ref)  # nothing left half-done


def test_a_forward_that_raises_releases_its_slot():
    model = _model()
    inputs = _inputs(model.config)
    ref = _run(model, inputs)
    enable_block_swap(model, 2, backend=FakeTransferBackend())
    block = model.blocks[1]

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    block.forward = boom
    with pytest.raises(RuntimeError, match="boom"):
        _run(model, inputs)
    del block.forward
    host = model._block_swap.units[-1].host.flat
    assert all(host.data_ptr() <= t.data_ptr() < host.data_ptr() + host.numel() for t in block.parameters())
    assert torch.equal(_run(model, inputs), ref)


def test_changing_a_swapped_block_after_enable_is_detected():
    model = _model()
    enable_block_swap(model, 1, backend=FakeTransferBackend())
    model.blocks[1].modulation = nn.Parameter(torch.zeros_like(model.blocks[1].modulation))
    with pytest.raises(BlockSwapError, match="disable_block_swap"):
        _run(model, _inputs(model.config))


def test_another_backend_while_enabled():
    model = _model()
    enable_block_swap(model, 1, backend=FakeTransferBackend())
    with pytest.raises(BlockSwapError, match="disable_block_swap"):
        enable_block_swap(model, 1, backend=FakeTransferBackend())


# --- blocks_to_swap, the one check -----------------------------------------------------------------
@pytest.mark.parametrize("n, num_blocks", [(0, 2), (2, 2), (np.int64(1), 2), (7, None), (0, None)])
def test_check_blocks_to_swap_accepts_counts_in_range(n, num_blocks):
    got = check_blocks_to_swap(n, num_blocks)
    assert got == int(n) and type(got) is int


@pytest.mark.parametrize(
    "value, num_blocks, found",
    [
        (True, 2, "found True (bool)"),
        (1.5, 2, "found 1.5 (float)"),
        ("2", 2, "found '2' (str)"),
        (-1, 2, "found -1"),
        (-1, None, "found -1"),
        (3, 2, "found 2 blocks"),
    ],
)
def test_check_blocks_to_swap_says_expected_found_and_what_to_do(value, num_blocks, found):
    with pytest.raises(BlockSwapError) as err:
        check_blocks_to_swap(value, num_blocks)
    msg = str(err.value)
    expected = "an integer >= 0" if num_blocks is None else f"an integer in [0, {num_blocks}]"
    assert expected in msg and found in msg and "no block swap" in msg
    if num_blocks is not None:
        assert f"use 0..{num_blocks} (0: no block swap, {num_blocks} swaps every block)" in msg


def test_enable_block_swap_validates_blocks_to_swap_with_check_blocks_to_swap():
    with pytest.raises(BlockSwapError, match=r"an integer in \[0, 2\], found -1"):
        enable_block_swap(_model(), -1, backend=FakeTransferBackend())
    with pytest.raises(BlockSwapError, match=r"found 2 blocks\. Expected an integer in \[0, 2\]"):
        swap_placement(WanConfig.preset("tiny-t2v"), 3)


# --- page-locked host memory ----------------------------------------------------------------------
def test_is_page_locked_is_false_for_pageable_memory_and_without_cuda():
    t = torch.empty(1 << 16, dtype=torch.uint8)
    assert is_page_locked(t) is False
    assert is_page_locked(torch.empty(0)) is False
    if not torch.cuda.is_available():  # the runtime, if any library is found, has no device here
        assert transfer._cuda_host_query(t.data_ptr()) is not True
        assert transfer._cuda_host_query(0) is None


class _FakeCudart:
    """torch.cuda.cudart() stand-in: cudaHostRegister succeeds (page-locked or not is up to the test)."""

    def __init__(self):
        self.calls: list[tuple] = []

    def cudaHostRegister(self, ptr, size, flags):
        self.calls.append(("register", ptr, size))
        return 0

    def cudaHostUnregister(self, ptr):
        self.calls.append(("unregister", ptr))
        return 0


def _cuda_backend_on_cpu(monkeypatch, page_locked):
    """A CudaTransferBackend whose CUDA calls are faked; records pin_memory requests."""
    cudart = _FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    monkeypatch.setattr(transfer, "_cuda_host_query", lambda ptr: page_locked)
    pins = []
    aligned_empty = transfer._aligned_empty

    def fake_aligned_empty(nbytes, device, pin_memory=False):
        pins.append(pin_memory)
        return aligned_empty(nbytes, device)  # no pinning on a CPU-only torch

    monkeypatch.setattr(transfer, "_aligned_empty", fake_aligned_empty)
    backend = object.__new__(CudaTransferBackend)  # no stream: only host allocation is used
    backend.device, backend._register, backend.host_memory = torch.device("cuda", 0), True, "cudaHostRegister"
    return backend, cudart, pins


def test_registered_memory_that_is_not_page_locked_falls_back_to_pin_memory(monkeypatch):
    backend, cudart, pins = _cuda_backend_on_cpu(monkeypatch, page_locked=False)
    with pytest.warns(RuntimeWarning, match="not page-locked.*falling back to pin_memory"):
        buf = backend.alloc_host(10_000)
    (_, ptr, size), unregister = cudart.calls
    assert unregister == ("unregister", ptr)  # the registration was undone
    assert buf.method == "pin_memory" and pins == [True] and buf.flat.numel() == 10_000
    assert backend.host_memory == "pin_memory" and not backend._register
    assert buf.reserved == 1 << 14  # pin_memory's power-of-two rounding, as reported to the stats
    backend.alloc_host(100)  # and later units go straight to pin_memory
    assert len(cudart.calls) == 2 and pins == [True, True]


@pytest.mark.parametrize("page_locked", [True, None])  # None: CUDA cannot be asked; trust cudaHostRegister
def test_registered_memory_that_is_page_locked_stays_registered(monkeypatch, page_locked):
    backend, cudart, pins = _cuda_backend_on_cpu(monkeypatch, page_locked)
    buf = backend.alloc_host(10_000)
    assert buf.method == "cudaHostRegister" and backend.host_memory == "cudaHostRegister"
    assert [c[0] for c in cudart.calls] == ["register"] and pins == []
    assert buf.flat.numel() == 10_000 and buf.flat.data_ptr() == cudart.calls[0][1]
    buf._finalizer.detach()  # nothing was really registered


def test_a_registration_ends_with_the_last_tensor_on_its_pages_not_with_its_host_buffer(monkeypatch):
    """Encoder weights are views into a HostBuffer's pages; a new EncoderRunner drops the old
    buffers while the weights still use them. Unregistered then, the pages turned pageable and
    the next runner packed every encoder again (+7.2 GiB host peak for umT5 fp8, measured)."""
    backend, cudart, _ = _cuda_backend_on_cpu(monkeypatch, page_locked=True)
    unregistered = []
    monkeypatch.setattr(transfer, "_unregister", unregistered.append)
    buf = backend.alloc_host(3 * 4096, fill=lambda flat: flat.fill_(7))
    weight = buf.flat[4096:8192].view(torch.int32)  # what an encoder's parameter holds
    ptr = cudart.calls[0][1]
    del buf
    gc.collect()
    assert unregistered == [] and bool((weight == 0x07070707).all())
    del weight
    gc.collect()
    assert unregistered == [ptr]
    buf = backend.alloc_host(4096)
    buf.release()  # block swap's explicit unpinning still ends it at once
    assert len(unregistered) == 2


def test_an_error_while_filling_a_host_buffer_is_not_taken_for_a_failed_registration(monkeypatch):
    """Only cudaHostRegister's refusal falls back to pin_memory; a failing copy (a CUDA error that
    surfaces in a device-to-host copy_) reaches the caller as it is, and registration stays on."""
    backend, cudart, pins = _cuda_backend_on_cpu(monkeypatch, page_locked=True)

    def fill(flat):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal memory access"):
        backend.alloc_host(4096, fill=fill)
    assert backend._register and pins == [] and cudart.calls == []
