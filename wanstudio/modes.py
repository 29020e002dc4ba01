"""Runtime modes: every choice that changes how a loaded model runs, in one validated object.

``RuntimeModes`` is what a user picks (quantization, attention, base precision, block swap,
compilation, strict layout checks); :func:`apply_modes` is the one path from those choices to a
configured model. ``load_model``, ``InfiniteTalkPipeline.from_files``, the studio's panels, the
CLI and ``bench`` all go through it, so a mode means the same thing everywhere and is checked
once. LoRAs, step caching and parallelism join it as fields when they land.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .errors import BlockSwapError, ConfigError, UnsupportedModeError
from .lora import LoRA, sync_loras
from .offload import check_blocks_to_swap
from .options import AttentionMode, BasePrecision, QuantMode, parse_option

log = logging.getLogger(__name__)


def _count(value: object, what: str) -> int:
    """An int >= 0 (bools refused: ``True`` blocks is a mistake, not 1)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{what} must be an integer >= 0, got {value!r}")
    return value


@dataclass(frozen=True)
class RuntimeModes:
    """How a model runs. Frozen; every field is parsed and checked when it is made.

    Strings are accepted wherever an option is expected (``quantization="fp8_e4m3fn_fast"``),
    and ``precision`` also takes a torch dtype. Device-specific checks (an fp8 tensor-core mode
    on an old GPU, ``fp16_fast`` off CUDA) are :meth:`check_device`'s, run by the loaders
    before any file is read.
    """

    quantization: QuantMode = QuantMode.DISABLED  # DiT Linear layers (options.QuantMode)
    attention: AttentionMode = AttentionMode.SDPA  # attention backend of every block
    precision: BasePrecision = BasePrecision.BF16  # weights and activations outside quantized layers
    blocks_to_swap: int | Literal["auto"] = 0  # last N blocks live in host memory, streamed in
    # (CUDA); "auto": apply_modes picks N with offload.plan_dit_memory for vram_budget_gb
    vram_budget_gb: float | None = None  # GiB the DiT may use ("auto"; None: free device memory)
    prefetch: int = 1  # blocks copied ahead while others compute (0: copy when reached)
    compile: bool = False  # torch.compile each block's forward (fuses elementwise work)
    strict_layout: bool = False  # every forward checks kernel layout contracts strictly
    loras: tuple[LoRA, ...] = ()  # merged into the weights (at load: before quantization)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise in place once
        set_(self, "quantization", parse_option(QuantMode, self.quantization))
        set_(self, "attention", parse_option(AttentionMode, self.attention))
        set_(self, "precision", BasePrecision.of(self.precision))
        if not (isinstance(self.blocks_to_swap, str) and self.blocks_to_swap == "auto"):
            set_(self, "blocks_to_swap", check_blocks_to_swap(self.blocks_to_swap))
        budget = self.vram_budget_gb
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0
        ):
            raise ConfigError(f"vram_budget_gb must be a number of GiB > 0 or None, got {budget!r}")
        set_(self, "prefetch", _count(self.prefetch, "prefetch"))
        if isinstance(self.loras, (str, LoRA)) or not isinstance(self.loras, (list, tuple)):
            raise ConfigError(f"loras must be a list of LoRA files, got {self.loras!r}")
        set_(self, "loras", tuple(LoRA.of(x) for x in self.loras))
        for name in ("compile", "strict_layout"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype of ``precision``."""
        return self.precision.dtype

    def replace(self, **changes) -> RuntimeModes:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def merge(cls, modes: RuntimeModes | None = None, **keywords) -> RuntimeModes:
        """``modes`` (default: the defaults) with every keyword that is not None applied.

        The loaders' old keyword arguments (``quantization=``, ``dtype=``, ...) arrive here, so
        they keep working beside ``modes=``; a keyword given wins over the same field of
        ``modes``.
        """
        given = {k: v for k, v in keywords.items() if v is not None}
        unknown = set(given) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown runtime mode field(s) {sorted(unknown)}")
        return (modes or cls()).replace(**given) if given else (modes or cls())

    def check_device(self, device: torch.device | str) -> None:
        """Refuse modes this device cannot run, before anything heavy happens."""
        from .quant import check_device

        device = torch.device(device)
        check_device(self.quantization, device)
        if self.precision is BasePrecision.FP16_FAST:
            if device.type != "cuda":
                raise UnsupportedModeError(
                    f"base precision 'fp16_fast' (fp16 matmul accumulation) needs a CUDA GPU; device is "
                    f"{device}. Use 'fp16' or 'bf16' here."
                )
            if not hasattr(torch.backends.cuda.matmul, "allow_fp16_accumulation"):
                raise UnsupportedModeError(
                    f"base precision 'fp16_fast' needs torch >= 2.7 (allow_fp16_accumulation); this is "
                    f"torch {torch.__version__}. Use 'fp16'."
                )

    def describe(self) -> str:
        """One line for logs and summaries."""
        parts = [f"{self.precision.value}", f"quantization {self.quantization.value}"]
        parts.append(f"attention {self.attention.value}")
        if self.blocks_to_swap == "auto":
            budget = f"{self.vram_budget_gb:g} GiB" if self.vram_budget_gb else "free memory"
            parts.append(f"blocks swapped: auto for {budget} (prefetch {self.prefetch})")
        elif self.blocks_to_swap:
            parts.append(f"{self.blocks_to_swap} blocks swapped (prefetch {self.prefetch})")
        if self.compile:
            parts.append("compiled blocks")
        if self.strict_layout:
            parts.append("strict layout")
        parts += [f"LoRA {lora.path.name} x{lora.strength:g}" for lora in self.loras]
        return ", ".join(parts)


def enable_precision(modes: RuntimeModes) -> None:
    """Process-wide switches a precision needs (``fp16_fast``: cuBLAS fp16 accumulation)."""
    if modes.precision is BasePrecision.FP16_FAST:
        torch.backends.cuda.matmul.allow_fp16_accumulation = True
        log.info("fp16_fast: cuBLAS fp16 accumulation enabled for this process")


def apply_modes(
    model: nn.Module, modes: RuntimeModes, *, device: torch.device | str | None = None
) -> nn.Module:
    """Configure a loaded model as ``modes`` says (in place; returns it).

    Order matters: LoRAs first (they change float weights), then quantize (block swap packs the
    quantized buffers), then attention,
    block swap, strict layout, compilation. Layers the loader already quantized while
    streaming are left as they are (``quantize`` skips them). Fields that
    are off undo an earlier setting (swap, strict layout, compilation), so applying other
    modes to the same model moves it to them.

    Args:
        model: a WanModel at base precision or already in ``modes.quantization``.
        modes: the runtime modes.
        device: the compute device for block swap (default: where the model's parameters are).
    """
    from .attention import set_attention
    from .fusion import compile_blocks, uncompile_blocks
    from .layout import set_strict_layout
    from .offload import enable_block_swap
    from .quant import quantize

    enable_precision(modes)
    sync_loras(model, modes.loras)  # before quantization: LoRAs merge into float weights
    if modes.quantization is not QuantMode.DISABLED:  # idempotent; another mode is refused
        quantize(model, modes.quantization)
        model.quantization = modes.quantization
    set_attention(model, modes.attention)
    if modes.blocks_to_swap == "auto":  # measured after quantization: block bytes depend on it
        modes = modes.replace(blocks_to_swap=resolve_blocks_to_swap(model, modes, device))
    if modes.blocks_to_swap or getattr(model, "block_swap_stats", None) is not None:
        enable_block_swap(model, modes.blocks_to_swap, prefetch=modes.prefetch, device=device)
    set_strict_layout(model, modes.strict_layout)
    (compile_blocks if modes.compile else uncompile_blocks)(model)
    model.modes = modes
    return model


def resolve_blocks_to_swap(model: nn.Module, modes: RuntimeModes, device=None) -> int:
    """``blocks_to_swap="auto"`` as a count: 0 off CUDA (nothing to swap to), else
    offload.plan_dit_memory's choice for ``vram_budget_gb`` (default: the device's free memory,
    the model's own tensors there counted as free) and an 81-frame 832 x 480 clip. The plan is
    kept as ``model.memory_plan``; ``model.modes`` gets the count. Raises BlockSwapError when
    even every block swapped does not fit."""
    from .offload import plan_dit_memory
    from .offload.planner import GiB, free_device_bytes

    if device is None:
        device = next((t.device for t in model.parameters() if t.device.type not in ("cpu", "meta")), "cpu")
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    budget = None if modes.vram_budget_gb is None else int(modes.vram_budget_gb * GiB)
    if budget is None:
        budget = free_device_bytes(device, held_by=model)
    if budget is None:
        raise BlockSwapError(
            f"blocks_to_swap='auto' plans against {device}'s free memory, but torch finds no CUDA "
            "device. Pass vram_budget_gb, or a blocks_to_swap count."
        )
    plan = plan_dit_memory(
        model, budget, prefetch=modes.prefetch, quantized=modes.quantization is not QuantMode.DISABLED
    )
    model.memory_plan = plan
    log.info("blocks_to_swap='auto': %s", plan.summary().replace("\n", "; "))
    return plan.blocks_to_swap
