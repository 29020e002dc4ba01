"""VRAM planner: choices for given part sizes and budgets, refusals, measuring, activation bytes."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs
from memtrace import PeakBytes

import wanstudio as ws
from wanstudio.errors import BlockSwapError, ConfigError
from wanstudio.offload import (
    FakeTransferBackend,
    PartSizes,
    dit_activation_bytes,
    enable_block_swap,
    measure_block_bytes,
    measure_parts,
    plan_dit_memory,
    plan_memory,
)
from wanstudio.offload.planner import module_bytes

G = 2**30

# A made-up pipeline with round sizes (GiB): DiT = 1 outside its blocks + 40 blocks of 0.5;
# text encoder 10, CLIP 1, wav2vec2 0.5, VAE 0.25. Per clip: DiT activations 2, each encoder's
# activations 0.25, the VAE working set 4 untiled / 1 tiled; 0.5 kept in reserve.
PARTS = PartSizes(
    dit=21 * G, dit_blocks=20 * G, text_encoder=10 * G, image_encoder=G, audio_encoder=G // 2, vae=G // 4
)
KW = dict(
    num_blocks=40,
    block_bytes=G // 2,
    activation_bytes=2 * G,
    vae_bytes=4 * G,
    vae_tiled_bytes=G,
    encoder_activation_bytes=G // 4,
    reserve_bytes=G // 2,
)
# With n blocks swapped at prefetch p the DiT holds D = 1 + (40 - n + min(p + 1, n)) * 0.5, and
# every phase holds D + VAE 0.25 + reserve 0.5 = D + 0.75, plus:
#   text     the text encoder 10 + 0.25 (nothing if it runs on the CPU)
#   image    CLIP 1 + 0.25          audio    wav2vec2 0.5 + 0.25
#   vae      4 untiled / 1 tiled    denoise  2
#   and, unless offload_encoders, the resident encoders 1.5 (+ 10 when the text one is on the GPU)


@pytest.mark.parametrize(
    ("budget", "forced", "expect"),
    [
        # n = 0: D = 21. Nothing offloaded: vae 21.75 + 11.5 + 4 = 37.25 <= 40.
        (
            40,
            {},
            dict(blocks_to_swap=0, prefetch=0, offload_encoders=False, text_on_cpu=False, tile_vae=False),
        ),
        # 37.25 > 36, so the cheapest saving: encoders offloaded. Peak text 21.75 + 10.25 = 32.
        (36, {}, dict(blocks_to_swap=0, offload_encoders=True, text_on_cpu=False, tile_vae=False)),
        # offload forbidden: tiling instead, peak denoise 21.75 + 11.5 + 2 = 35.25 (vae 34.25).
        (
            36,
            dict(offload_encoders=False),
            dict(blocks_to_swap=0, offload_encoders=False, text_on_cpu=False, tile_vae=True),
        ),
        # n = 0 fits only with every saving: text on CPU, denoise 21.75 + 2 = 23.75 <= 24 (untiled
        # vae would be 25.75; keeping the text encoder on the GPU needs 18 blocks swapped).
        (24, {}, dict(blocks_to_swap=0, offload_encoders=True, text_on_cpu=True, tile_vae=True)),
        # text encoder pinned to the GPU: D + 0.75 + 10.25 <= 25 needs D <= 14, i.e.
        # 40 - n + slots <= 26: n = 16 with 2 slots (prefetch 1; prefetch 2 would need n = 17).
        (
            25,
            dict(text_on_cpu=False),
            dict(blocks_to_swap=16, prefetch=1, offload_encoders=True, text_on_cpu=False, tile_vae=False),
        ),
        # n fixed at 10, prefetch 2: D = 1 + 33 * 0.5 = 17.5. Text on the GPU needs 28.5. Text on
        # the CPU, encoders resident (1.5): vae 18.25 + 1.5 + 4 = 23.75 <= 24 (cost 4, before
        # offload + text on CPU, cost 5).
        (
            24,
            dict(blocks_to_swap=10),
            dict(blocks_to_swap=10, prefetch=2, offload_encoders=False, text_on_cpu=True, tile_vae=False),
        ),
        # 5 GiB: every block swapped, prefetch 1: D = 1 + 2 * 0.5 = 2; denoise 2.75 + 2 = 4.75.
        (5, {}, dict(blocks_to_swap=40, prefetch=1, offload_encoders=True, text_on_cpu=True, tile_vae=True)),
    ],
)
def test_plan_choices(budget, forced, expect):
    plan = plan_memory(PARTS, budget * G, **KW, **forced)
    assert {k: getattr(plan, k) for k in expect} == expect
    assert plan.peak_bytes <= budget * G


def test_plan_phase_totals_are_the_arithmetic_above():
    plan = plan_memory(PARTS, 36 * G, **KW)  # n = 0, encoders offloaded
    totals = {p.name: p.total / G for p in plan.phases}
    assert totals == {"text": 32.0, "image": 23.0, "audio": 22.5, "vae": 25.75, "denoise": 23.75}
    assert plan.peak.name == "text" and plan.dit_device_bytes == 21 * G


def test_a_large_vae_working_set_makes_the_planner_tile():
    # vae untiled 12: n = 0 with offload has vae 21.75 + 12 = 33.75 > 32.5 >= text 32; tiled 22.75
    plan = plan_memory(PARTS, int(32.5 * G), **{**KW, "vae_bytes": 12 * G})
    assert (plan.blocks_to_swap, plan.offload_encoders, plan.text_on_cpu, plan.tile_vae) == (
        0,
        True,
        False,
        True,
    )


def test_without_a_tiled_estimate_tiling_is_not_an_option():
    plan = plan_memory(PARTS, 24 * G, **{**KW, "vae_tiled_bytes": None})
    # 24 GiB needed tiling at n = 0 (above). Untiled, with every other saving, the vae phase is
    # D + 0.75 + 4 <= 24: D <= 19.25, 40 - n + slots <= 36.5: n = 6 with 2 slots (prefetch 1)
    assert (plan.blocks_to_swap, plan.prefetch, plan.tile_vae, plan.text_on_cpu) == (6, 1, False, True)
    with pytest.raises(ConfigError, match="tile_vae=True needs vae_tiled_bytes"):
        plan_memory(PARTS, 24 * G, **{**KW, "vae_tiled_bytes": None}, tile_vae=True)


def test_refusal_says_why_and_by_how_much():
    # every saving on: D = 2 (1 outside the blocks + 2 slots of 0.5); denoise
    # 2 + 0.25 + 0.5 + 2 = 4.75 GiB against 4
    with pytest.raises(BlockSwapError) as info:
        plan_memory(PARTS, 4 * G, **KW)
    msg = str(info.value)
    assert "needs at least 4.75 GiB of VRAM (in its denoise phase)" in msg
    assert "resident non-block parts 1.25 GiB (DiT outside the swapped blocks 1.00 GiB, VAE 0.25 GiB)" in msg
    assert "2 swapped-block slots 1.00 GiB + activations 2.00 GiB + reserve 0.50 GiB" in msg
    assert "the budget is 4.00 GiB, short by 0.75 GiB" in msg
    assert "40 of 40 blocks swapped with prefetch 1" in msg and "text encoder on the CPU" in msg


def test_refusal_names_the_choices_the_caller_fixed():
    with pytest.raises(BlockSwapError, match=r"\(text_on_cpu fixed by the caller\)") as info:
        plan_memory(PARTS, 12 * G, **KW, text_on_cpu=False)
    # text phase: 2 + 0.75 + 10 + 0.25 = 13 > 12
    assert "needs at least 13.00 GiB of VRAM (in its text phase)" in str(info.value)


@pytest.mark.parametrize(
    "kw",
    [dict(prefetch_min=3, prefetch_max=2), dict(blocks_to_swap=41), dict(activation_bytes=-1)],
)
def test_bad_arguments_are_refused(kw):
    with pytest.raises((ConfigError, BlockSwapError)):
        plan_memory(PARTS, 10 * G, **{**KW, **kw})


def test_summary_is_readable():
    text = plan_memory(PARTS, 25 * G, **KW, text_on_cpu=False).summary()
    assert text.splitlines() == [
        "VRAM plan: peak 25.00 GiB of a 25.00 GiB budget (in text), 0.50 GiB of it kept in reserve",
        "  DiT: 16 of 40 blocks in host memory, prefetch 1 (2 slots x 0.50 GiB); 14.00 GiB on the GPU",
        "  encoders: on the GPU only while they run",
        "  VAE: untiled",
        "  peaks: text 25.00 | image 16.00 | audio 15.50 | vae 18.75 | denoise 16.75 GiB",
    ]


# --- measuring ---------------------------------------------------------------------------------
def test_measure_parts_sums_parameters_and_buffers_per_part():
    pipe = ws.InfiniteTalkPipeline.tiny()

    def size(m):
        tensors = {id(t): t for t in [*m.parameters(), *m.buffers()]}.values()
        return sum(t.numel() * t.element_size() for t in tensors)

    parts = measure_parts(pipe)
    assert parts.dit == size(pipe.model) and parts.dit_blocks == sum(size(b) for b in pipe.model.blocks)
    assert parts.text_encoder == size(pipe.text_encoder.model)
    assert parts.image_encoder == size(pipe.image_encoder.model)
    assert parts.audio_encoder == size(pipe.audio_encoder.model)
    assert parts.vae == size(pipe.vae.model)
    assert measure_parts({"dit": pipe.model, "vae": pipe.vae}) == PartSizes(
        dit=parts.dit, dit_blocks=parts.dit_blocks, vae=parts.vae
    )
    with pytest.raises(ConfigError, match="unknown part name"):
        measure_parts({"unet": pipe.model})


def test_measure_parts_works_on_the_meta_device():
    cfg = ws.WanConfig.preset("infinitetalk-14b")
    model = ws.WanModel(cfg, device="meta", dtype=torch.bfloat16)
    parts = measure_parts(model)
    assert parts.dit == 2 * sum(p.numel() for p in model.parameters())
    assert 30 * G < parts.dit < 36 * G and parts.dit_other < 2 * G  # 16.4 B parameters in bf16


def test_block_bytes_is_the_swap_slot_size():
    torch.manual_seed(0)
    model = ws.WanModel(ws.WanConfig.preset("tiny-i2v")).eval()
    expected = measure_block_bytes(model)
    enable_block_swap(model, 2, prefetch=1, backend=FakeTransferBackend())
    assert model.block_swap_stats.slot_bytes == expected


# --- DiT activations -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("preset", "frames", "height", "width"),
    [("infinitetalk-14b", 81, 480, 832), ("infinitetalk-14b", 17, 480, 832), ("t2v-1.3b", 81, 480, 832)],
)
def test_dit_activation_formula_bounds_the_traced_forward(preset, frames, height, width):
    """A real-size config (2 blocks: activations do not depend on depth) traced on meta."""
    cfg = ws.WanConfig.preset(preset).replace(num_layers=2)
    model = ws.WanModel(cfg, device="meta", dtype=torch.bfloat16).eval()
    lat = (1 + (frames - 1) // 4, height // 8, width // 8)
    inputs = {
        k: v.to("meta") for k, v in make_inputs(cfg, frames=lat[0], height=lat[1], width=lat[2]).items()
    }
    with torch.inference_mode(), PeakBytes() as trace:
        model(inputs.pop("x"), inputs.pop("t"), inputs.pop("context"), **inputs)
    formula = dit_activation_bytes(cfg, frames, height, width)
    assert trace.peak <= formula <= 1.05 * trace.peak
    tokens = lat[0] * (lat[1] // 2) * (lat[2] // 2)  # 21 * 30 * 52 = 32760 at 81 frames 480p
    k = 5 + max(7, 2 * cfg.ffn_dim / cfg.dim) + 0.25
    assert formula == int(cfg.dim * 2 * (k * tokens + 4 * (cfg.text_len + 257)))


def test_quantized_activations_add_the_fp8_copies():
    cfg = ws.WanConfig.preset("infinitetalk-14b")
    plain = dit_activation_bytes(cfg, 81, 480, 832)
    fp8 = dit_activation_bytes(cfg, 81, 480, 832, quantized=True)
    tokens = 21 * 30 * 52
    assert fp8 - plain == pytest.approx(tokens * cfg.ffn_dim / 2 * 2 + cfg.dim * cfg.ffn_dim * 2, abs=2)


# --- a real-size case ----------------------------------------------------------------------------
def test_infinitetalk_14b_on_a_12_gib_card():
    """The issue's case, from sizes measured on meta models: InfiniteTalk 14B in fp8 (~16.6 GB),
    umT5-XXL 11 GB, CLIP ViT-H, wav2vec2-base, Wan VAE; an 81-frame 832 x 480 clip."""
    cfg = ws.WanConfig.preset("infinitetalk-14b")
    dit = ws.WanModel(cfg, device="meta", dtype=torch.bfloat16)
    blocks = dit.blocks[0]
    block_fp8 = module_bytes(blocks) // 2  # fp8 weights: ~half of a bf16 block (norms aside)
    parts = PartSizes(
        dit=module_bytes(dit) - 40 * (module_bytes(blocks) - block_fp8),
        dit_blocks=40 * block_fp8,
        text_encoder=11_360_000_000,  # umT5-XXL encoder, 5.68 B parameters in bf16
        image_encoder=1_264_000_000,  # ViT-H/14 vision tower, 632 M in fp16
        audio_encoder=380_000_000,  # wav2vec2-base, 95 M in fp32
        vae=254_000_000,  # 127 M in bf16
    )
    plan = plan_memory(
        parts,
        12 * G,
        num_blocks=40,
        block_bytes=block_fp8,
        activation_bytes=dit_activation_bytes(cfg, 81, 480, 832, quantized=True),
        vae_bytes=4_200_000_000,
        vae_tiled_bytes=1_000_000_000,
    )
    assert plan.text_on_cpu and plan.offload_encoders  # 11 GB of umT5 cannot share 12 GiB
    assert 0 < plan.blocks_to_swap < 40 and plan.peak_bytes <= 12 * G
    assert plan.peak.name == "denoise"


# --- plan_dit_memory / RuntimeModes ---------------------------------------------------------------
def test_plan_dit_memory_measures_the_model():
    torch.manual_seed(0)
    model = ws.WanModel(ws.WanConfig.preset("tiny-infinitetalk").replace(num_layers=6)).eval()
    parts = measure_parts(model)
    block = measure_block_bytes(model)
    act = dit_activation_bytes(model.config, 81, 480, 832, dtype=torch.float32)
    # budget: everything resident but one block, so one block beyond the slots must be swapped
    budget = parts.dit + act + 512 * 2**20 - block
    plan = plan_dit_memory(model, budget, prefetch=1)
    # 2 slots of prefetch 1: 3 swapped blocks hold 2 slots, saving exactly one block
    assert (plan.blocks_to_swap, plan.prefetch) == (3, 1)
    assert plan.block_bytes == block and plan.num_blocks == len(model.blocks)
