"""VRAM planner: the savings a clip needs to fit a memory budget, from measured part sizes.

A clip goes through phases; the DiT (its resident part and the block-swap slots) and the VAE
stay on the GPU through all of them, the encoders are there while they run (and all the time
unless ``offload_encoders``):

=========== =============================================================================
phase       on the GPU besides the DiT and the VAE
=========== =============================================================================
text        the text encoder (unless it runs on the CPU) and its activations
image       CLIP and its activations
audio       wav2vec2 and its activations
vae         the VAE encode / decode working set (tiled or not)
denoise     the DiT's activations
=========== =============================================================================

plus, in every phase, the encoders left resident and a reserve (allocator rounding, cuBLAS /
cuDNN workspaces, conditioning tensors). :func:`plan_memory` picks, in this order of cost:
the fewest swapped blocks (a swapped block is copied in at every DiT call), then the cheapest
combination of: encoders parked on the host between uses (one upload per generation), a tiled
VAE (some recomputation in every clip), the text encoder on the CPU (slow, once per generation);
then the deepest prefetch up to ``prefetch_max``. With ``n`` of ``N`` blocks
swapped and prefetch ``p``, the DiT holds ``other + (N - n) * block + min(p + 1, n) * block``
bytes (block swap allocates ``min(p + 1, n)`` slots, each the size of a block).

**DiT activations** (:func:`dit_activation_bytes`), in units of ``tokens * dim * dtype bytes``,
traced on the meta device for the 1.3B and 14B configs (``tests/test_planner.py`` checks them):
five token-by-dim tensors are alive whenever a block's sub-layer starts (the embedded tokens,
held by ``WanModel.forward`` while the blocks run; the block's input; the previous sub-layer's
output; the updated residual stream; the sub-layer's normalised input). The largest sub-layer
adds to that: attention at most 7 (q, the float32 copy and product inside its RMSNorm, 2 units
each at a 2-byte dtype, the attention output), the FFN its hidden activation before and after
GELU, ``2 * ffn_dim / dim`` (5.4 for 14B: 13824 / 5120; 11.7 for 1.3B). A quarter unit covers
the small tensors (modulation, RoPE tables, audio tokens). Fixed: ``4 * (text_len + 257)``
token-sized tensors (text and CLIP context, their keys and values). Measured k: 12.07 (14B),
16.85 (1.3B); formula: 12.25, 16.92.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import BlockSwapError, ConfigError
from .placement import check_blocks_to_swap
from .transfer import _align_up

GiB = 2**30
VAE_SPATIAL_STRIDE = 8  # video pixels per latent pixel (Wan2.1 VAE)
CLIP_TOKENS = 257  # CLIP ViT-H/14 tokens the i2v cross-attention reads
DEFAULT_RESERVE_BYTES = 512 * 2**20  # allocator rounding, cuBLAS / cuDNN workspaces, conditions
# An encoder's own activations: umT5-XXL on 512 tokens keeps a few 512 x 4096 hidden states and
# 64 heads x 512^2 attention scores (~70 MB); wav2vec2 on a minute of audio keeps 13 hidden states
# of 3000 x 768 (~120 MB in fp32). 256 MiB covers both.
ENCODER_ACTIVATION_BYTES = 256 * 2**20
AUTO_CLIP = (81, 480, 832)  # frames, height, width that blocks_to_swap="auto" plans for
# token x dim units of a DiT forward: see the module docstring
_UNITS_AT_SUBLAYER = 5.0
_UNITS_ATTENTION = 7.0
_UNITS_SMALL = 0.25


def _bytes(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a number of bytes, got the bool {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        if isinstance(value, float) and value.is_integer():
            n = int(value)
        else:
            raise ConfigError(f"{what} must be a whole number of bytes, got {value!r}") from None
    if n < 0:
        raise ConfigError(f"{what} must be >= 0 bytes, got {n}")
    return n


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


# --- measuring ---------------------------------------------------------------------------------
def module_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``module`` (shared ones once); any device, meta too."""
    seen: set[int] = set()
    total = 0
    for t in itertools.chain(module.parameters(), module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.nelement() * t.element_size()
    return total


def measure_block_bytes(model: nn.Module) -> int:
    """The largest block of ``model.blocks`` as block swap packs it (each tensor at a 512-byte
    aligned offset): the size of one swap slot."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise ConfigError(f"{type(model).__name__} has no `blocks` nn.ModuleList to measure")

    def packed(block: nn.Module) -> int:
        seen: set[int] = set()
        total = 0
        for t in itertools.chain(block.parameters(), block.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += _align_up(t.nelement() * t.element_size())
        return total

    return max(packed(b) for b in blocks)


_PART_NAMES = {
    "dit": "dit",
    "model": "dit",
    "text_encoder": "text_encoder",
    "text": "text_encoder",
    "image_encoder": "image_encoder",
    "image": "image_encoder",
    "clip": "image_encoder",
    "audio_encoder": "audio_encoder",
    "audio": "audio_encoder",
    "vae": "vae",
}


@dataclass(frozen=True)
class PartSizes:
    """Bytes of parameters + buffers of each part of a pipeline (0: absent / not counted)."""

    dit: int = 0  # the whole DiT, blocks included
    dit_blocks: int = 0  # of which in model.blocks (what block swap can move)
    text_encoder: int = 0
    image_encoder: int = 0
    audio_encoder: int = 0
    vae: int = 0

    def __post_init__(self) -> None:
        for f in ("dit", "dit_blocks", "text_encoder", "image_encoder", "audio_encoder", "vae"):
            object.__setattr__(self, f, _bytes(getattr(self, f), f"PartSizes.{f}"))
        if self.dit_blocks > self.dit:
            raise ConfigError(f"PartSizes: dit_blocks {self.dit_blocks} exceeds the whole DiT {self.dit}")

    @property
    def dit_other(self) -> int:
        """DiT bytes outside its blocks (embeddings, head, audio projection): always resident."""
        return self.dit - self.dit_blocks

    def describe(self) -> str:
        """One line: each part's size."""
        return (
            f"DiT {_gib(self.dit)} ({_gib(self.dit_blocks)} in blocks), text encoder "
            f"{_gib(self.text_encoder)}, image encoder {_gib(self.image_encoder)}, audio encoder "
            f"{_gib(self.audio_encoder)}, VAE {_gib(self.vae)}"
        )


def _module(part: Any) -> nn.Module | None:
    if part is None or isinstance(part, nn.Module):
        return part
    model = getattr(part, "model", None)
    return model if isinstance(model, nn.Module) else None


def measure_parts(source: Any) -> PartSizes:
    """Sum parameter + buffer bytes per part of a loaded (or meta) pipeline.

    ``source`` is a pipeline-like object (attributes ``model``, ``text_encoder``,
    ``image_encoder``, ``audio_encoder``, ``vae``), a mapping from those names (or 'dit',
    'text', 'image' / 'clip', 'audio') to modules or encoder wrappers, or a bare DiT module.
    """
    if isinstance(source, Mapping):
        unknown = set(source) - set(_PART_NAMES)
        if unknown:
            raise ConfigError(
                f"measure_parts: unknown part name(s) {sorted(unknown)}; use {sorted(_PART_NAMES)}"
            )
        items = {_PART_NAMES[k]: v for k, v in source.items()}
    elif isinstance(source, nn.Module):
        items = {"dit": source}
    else:
        items = {
            name: getattr(source, attr)
            for attr, name in _PART_NAMES.items()
            if attr in ("model", "text_encoder", "image_encoder", "audio_encoder", "vae")
            and getattr(source, attr, None) is not None
        }
    sizes: dict[str, int] = {}
    for name, part in items.items():
        module = _module(part)
        if module is None:
            raise ConfigError(
                f"measure_parts: {name} is a {type(part).__name__}, not a module or encoder wrapper"
            )
        sizes[name] = module_bytes(module)
        if name == "dit" and isinstance(getattr(module, "blocks", None), nn.ModuleList):
            sizes["dit_blocks"] = sum(module_bytes(b) for b in module.blocks)
    return PartSizes(**sizes)


def dit_activation_bytes(
    config: Any,
    frames: int,
    height: int,
    width: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    batch: int = 1,
    quantized: bool = False,
) -> int:
    """Activation peak of one DiT forward on a clip of ``frames`` x ``height`` x ``width`` pixels.

    tokens = (1 + (frames - 1) // 4) * (height / 16) * (width / 16) for the (1, 2, 2) patches;
    bytes = batch * dim * dtype bytes * (k * tokens + 4 * (text_len + 257)) with
    k = 5 + max(7, 2 * ffn_dim / dim) + 0.25 (module docstring). ``quantized`` adds what an fp8
    Linear keeps on top: an 8-bit copy of the FFN hidden activation (ffn_dim / (2 dim) units)
    and one weight dequantized to the compute dtype (dim * ffn_dim elements).
    """
    pt, ph, pw = config.patch_size
    s = VAE_SPATIAL_STRIDE
    latent_frames = 1 + (frames - 1) // config.vae_scale
    tokens = (latent_frames // pt) * (height // s // ph) * (width // s // pw)
    k = _UNITS_AT_SUBLAYER + max(_UNITS_ATTENTION, 2 * config.ffn_dim / config.dim) + _UNITS_SMALL
    extra = 0
    if quantized:
        k += config.ffn_dim / (2 * config.dim)
        extra = config.dim * config.ffn_dim * dtype.itemsize
    unit = config.dim * dtype.itemsize
    fixed = 4 * (config.text_len + CLIP_TOKENS)
    return int(batch * unit * (k * tokens + fixed)) + extra


def free_device_bytes(device: torch.device | str, *, held_by: nn.Module | None = None) -> int | None:
    """Bytes the allocator can still give on ``device`` (free memory plus what the caching
    allocator holds unused, plus ``held_by``'s tensors already there); None off CUDA."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    held = 0
    if held_by is not None:
        seen: set[int] = set()
        for t in itertools.chain(held_by.parameters(), held_by.buffers()):
            if t.device.type == "cuda" and id(t) not in seen:
                seen.add(id(t))
                held += t.nelement() * t.element_size()
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device) + held


# --- planning ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PhasePeak:
    """A phase of a clip and what it holds on the device, labelled."""

    name: str
    contributions: tuple[tuple[str, int], ...]

    @property
    def total(self) -> int:
        return sum(b for _, b in self.contributions)


@dataclass(frozen=True)
class MemoryPlan:
    """What :func:`plan_memory` chose, and each phase's device bytes under that choice."""

    budget_bytes: int
    blocks_to_swap: int
    prefetch: int  # 0 when nothing is swapped
    offload_encoders: bool  # encoders parked on the host between uses
    text_on_cpu: bool  # the text encoder runs on the CPU
    tile_vae: bool
    num_blocks: int
    block_bytes: int
    parts: PartSizes
    reserve_bytes: int
    phases: tuple[PhasePeak, ...] = field(default=())

    @property
    def slots(self) -> int:
        """Device slots block swap allocates (each ``block_bytes``)."""
        return 0 if self.blocks_to_swap == 0 else max(1, min(self.prefetch + 1, self.blocks_to_swap))

    @property
    def dit_device_bytes(self) -> int:
        """The DiT on the device: resident part plus slots."""
        return _dit_device(self.parts, self.num_blocks, self.block_bytes, self.blocks_to_swap, self.prefetch)

    @property
    def peak(self) -> PhasePeak:
        return max(self.phases, key=lambda p: p.total)

    @property
    def peak_bytes(self) -> int:
        return self.peak.total

    @property
    def text_encoder_device(self) -> str:
        """'cpu' or 'device' (the compute device)."""
        return "cpu" if self.text_on_cpu else "device"

    def summary(self) -> str:
        """A few readable lines (the load panel, ``wanstudio doctor``)."""
        peak = self.peak
        lines = [
            f"VRAM plan: peak {_gib(peak.total)} of a {_gib(self.budget_bytes)} budget (in {peak.name}), "
            f"{_gib(self.reserve_bytes)} of it kept in reserve"
        ]
        if self.blocks_to_swap:
            lines.append(
                f"  DiT: {self.blocks_to_swap} of {self.num_blocks} blocks in host memory, prefetch "
                f"{self.prefetch} ({self.slots} slots x {_gib(self.block_bytes)}); "
                f"{_gib(self.dit_device_bytes)} on the GPU"
            )
        else:
            lines.append(f"  DiT: all {self.num_blocks} blocks on the GPU, {_gib(self.dit_device_bytes)}")
        enc = "on the GPU only while they run" if self.offload_encoders else "stay on the GPU"
        text = "; text encoder on the CPU" if self.text_on_cpu else ""
        lines.append(f"  encoders: {enc}{text}")
        lines.append(f"  VAE: {'tiled' if self.tile_vae else 'untiled'}")
        lines.append("  peaks: " + " | ".join(f"{p.name} {p.total / GiB:.2f}" for p in self.phases) + " GiB")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _dit_device(parts: PartSizes, num_blocks: int, block_bytes: int, n: int, p: int) -> int:
    other = parts.dit_other if parts.dit_blocks else max(0, parts.dit - num_blocks * block_bytes)
    slots = 0 if n == 0 else max(1, min(p + 1, n))
    return other + (num_blocks - n + slots) * block_bytes


def _phases(
    parts: PartSizes,
    *,
    num_blocks: int,
    block_bytes: int,
    n: int,
    p: int,
    offload: bool,
    text_cpu: bool,
    tile: bool,
    activation_bytes: int,
    vae_bytes: int,
    vae_tiled_bytes: int,
    encoder_activation_bytes: int,
    reserve: int,
) -> tuple[PhasePeak, ...]:
    dit = _dit_device(parts, num_blocks, block_bytes, n, p)
    encoders = {
        "text encoder": 0 if text_cpu else parts.text_encoder,
        "image encoder": parts.image_encoder,
        "audio encoder": parts.audio_encoder,
    }
    base = [("DiT", dit), ("VAE", parts.vae), ("reserve", reserve)]

    def phase(name: str, running: str | None, work: tuple[str, int]) -> PhasePeak:
        held = [(k, v) for k, v in encoders.items() if v and (k == running or not offload)]
        return PhasePeak(name, tuple(base + held + [work]))

    out = []
    if parts.text_encoder:
        act = 0 if text_cpu else encoder_activation_bytes
        out.append(phase("text", None if text_cpu else "text encoder", ("activations", act)))
    if parts.image_encoder:
        out.append(phase("image", "image encoder", ("activations", encoder_activation_bytes)))
    if parts.audio_encoder:
        out.append(phase("audio", "audio encoder", ("activations", encoder_activation_bytes)))
    if parts.vae:
        work = ("VAE tiles", vae_tiled_bytes) if tile else ("VAE working set", vae_bytes)
        out.append(phase("vae", None, work))
    out.append(phase("denoise", None, ("activations", activation_bytes)))
    return tuple(out)


# every (offload_encoders, text_on_cpu, tile_vae), cheapest first: a choice costs 1 (encoder
# uploads, once per generation), 2 (tiled VAE, some recomputation in every clip) or 4 (text
# encoder on the CPU, seconds to a minute per generation); combinations add up.
_OPTIONS = tuple(
    sorted(itertools.product((False, True), repeat=3), key=lambda o: o[0] * 1 + o[2] * 2 + o[1] * 4)
)


def plan_memory(
    parts: PartSizes,
    budget_bytes: int,
    *,
    num_blocks: int,
    block_bytes: int,
    activation_bytes: int,
    prefetch_max: int = 2,
    prefetch_min: int = 1,
    vae_bytes: int = 0,
    vae_tiled_bytes: int | None = None,
    encoder_activation_bytes: int = ENCODER_ACTIVATION_BYTES,
    reserve_bytes: int = DEFAULT_RESERVE_BYTES,
    blocks_to_swap: int | None = None,
    offload_encoders: bool | None = None,
    text_on_cpu: bool | None = None,
    tile_vae: bool | None = None,
) -> MemoryPlan:
    """Choose blocks_to_swap, prefetch, encoder offload, text-on-CPU and VAE tiling for a budget.

    Args:
        parts: measured sizes (:func:`measure_parts`).
        budget_bytes: what the PyTorch allocator may hold on the device.
        num_blocks / block_bytes: the DiT's blocks and the size of one
            (:func:`measure_block_bytes`).
        activation_bytes: one DiT forward at the clip's size (:func:`dit_activation_bytes`).
        prefetch_max / prefetch_min: the prefetch depths to consider (slots: prefetch + 1).
        vae_bytes / vae_tiled_bytes: the VAE working set untiled / tiled
            (``VAE.working_set_bytes``; the larger of encode and decode). ``vae_tiled_bytes``
            None: tiling is not an option.
        encoder_activation_bytes: an encoder's own activations while it runs.
        reserve_bytes: kept free in every phase (see ``DEFAULT_RESERVE_BYTES``).
        blocks_to_swap / offload_encoders / text_on_cpu / tile_vae: fix that choice (None: the
            planner decides).

    Order of preference: fewest swapped blocks, then the cheapest combination of encoder
    offload (cost 1), tiled VAE (2) and text encoder on the CPU (4), then the deepest prefetch.
    Raises BlockSwapError when nothing fits, with the shortfall of the most frugal choice.
    """
    budget = _bytes(budget_bytes, "budget_bytes")
    num_blocks = _bytes(num_blocks, "num_blocks")
    block_bytes = _bytes(block_bytes, "block_bytes")
    if prefetch_min > prefetch_max or prefetch_min < 0:
        raise ConfigError(f"need 0 <= prefetch_min <= prefetch_max, got {prefetch_min}, {prefetch_max}")
    common = dict(
        num_blocks=num_blocks,
        block_bytes=block_bytes,
        activation_bytes=_bytes(activation_bytes, "activation_bytes"),
        vae_bytes=_bytes(vae_bytes, "vae_bytes"),
        vae_tiled_bytes=_bytes(vae_tiled_bytes or 0, "vae_tiled_bytes"),
        encoder_activation_bytes=_bytes(encoder_activation_bytes, "encoder_activation_bytes"),
        reserve=_bytes(reserve_bytes, "reserve_bytes"),
    )
    if blocks_to_swap is not None:
        counts: list[int] = [check_blocks_to_swap(blocks_to_swap, num_blocks)]
    else:
        counts = list(range(num_blocks + 1))
    fixed = (offload_encoders, text_on_cpu, tile_vae)
    options = [
        o
        for o in _OPTIONS
        if all(f is None or f == v for f, v in zip(fixed, o)) and not (o[2] and vae_tiled_bytes is None)
    ]
    if not options:
        raise ConfigError("tile_vae=True needs vae_tiled_bytes (the tiled VAE working set)")

    def make(n: int, p: int, option: tuple[bool, bool, bool]) -> MemoryPlan:
        phases = _phases(parts, n=n, p=p, offload=option[0], text_cpu=option[1], tile=option[2], **common)
        return MemoryPlan(
            budget_bytes=budget,
            blocks_to_swap=n,
            prefetch=p,
            offload_encoders=option[0],
            text_on_cpu=option[1],
            tile_vae=option[2],
            num_blocks=num_blocks,
            block_bytes=block_bytes,
            parts=parts,
            reserve_bytes=common["reserve"],
            phases=phases,
        )

    for n in counts:
        depths = [0] if n == 0 else list(range(prefetch_max, prefetch_min - 1, -1))
        for option in options:
            for p in depths:
                plan = make(n, p, option)
                if plan.peak_bytes <= budget:
                    return plan
    frugal = make(counts[-1], 0 if counts[-1] == 0 else prefetch_min, options[-1])
    raise BlockSwapError(_refusal(frugal, fixed))


def _refusal(plan: MemoryPlan, fixed: tuple[bool | None, ...]) -> str:
    peak = plan.peak
    parts = dict(peak.contributions)
    slots = plan.slots * plan.block_bytes
    resident = parts["DiT"] - slots
    other_resident = sum(v for k, v in peak.contributions if k.endswith("encoder"))
    work = sum(v for k, v in peak.contributions if k in ("activations", "VAE tiles", "VAE working set"))
    short = peak.total - plan.budget_bytes
    pieces = [
        f"resident non-block parts {_gib(resident + parts['VAE'] + other_resident)} (DiT outside the "
        f"swapped blocks {_gib(resident)}, VAE {_gib(parts['VAE'])}"
        + (f", encoders {_gib(other_resident)}" if other_resident else "")
        + ")",
        f"{plan.slots} swapped-block slot{'s' * (plan.slots != 1)} {_gib(slots)}",
        f"{'VAE working set' if peak.name == 'vae' else 'activations'} {_gib(work)}",
        f"reserve {_gib(parts['reserve'])}",
    ]
    done = [
        f"{plan.blocks_to_swap} of {plan.num_blocks} blocks swapped with prefetch {plan.prefetch}",
        "encoders on the host between uses" if plan.offload_encoders else "encoders resident (fixed)",
        "text encoder on the CPU" if plan.text_on_cpu else "text encoder on the GPU",
        "VAE tiled" if plan.tile_vae else "VAE untiled",
    ]
    forced = [
        name for name, f in zip(("offload_encoders", "text_on_cpu", "tile_vae"), fixed) if f is not None
    ]
    return (
        f"this clip needs at least {_gib(peak.total)} of VRAM (in its {peak.name} phase): "
        + " + ".join(pieces)
        + f"; the budget is {_gib(plan.budget_bytes)}, short by {_gib(short)}. That is with "
        + ", ".join(done)
        + (f" ({', '.join(forced)} fixed by the caller)" if forced else "")
        + ". Lower the resolution or the frames per clip, quantize the DiT (fp8 halves the block "
        "bytes), or give a larger budget."
    )


def plan_dit_memory(
    model: nn.Module,
    budget_bytes: int,
    *,
    prefetch: int,
    frames: int = AUTO_CLIP[0],
    height: int = AUTO_CLIP[1],
    width: int = AUTO_CLIP[2],
    quantized: bool = False,
    reserve_bytes: int = DEFAULT_RESERVE_BYTES,
) -> MemoryPlan:
    """The plan ``blocks_to_swap="auto"`` uses: the DiT alone (measured) in ``budget_bytes``, for
    a clip of ``frames`` x ``height`` x ``width`` (default: 81 frames at 832 x 480), with
    ``prefetch`` fixed. The encoders and the VAE are the pipeline's: it plans them with
    :func:`plan_memory`."""
    config = model.config
    dtype = next(model.parameters()).dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        dtype = torch.bfloat16
    return plan_memory(
        measure_parts(model),
        budget_bytes,
        num_blocks=len(model.blocks),
        block_bytes=measure_block_bytes(model),
        activation_bytes=dit_activation_bytes(
            config, frames, height, width, dtype=dtype, quantized=quantized
        ),
        prefetch_max=prefetch,
        prefetch_min=prefetch,
        reserve_bytes=reserve_bytes,
    )
