"""THE registry of user-facing choices.

Every mode name a user can type lives here, once. Widgets, the CLI and the docs table derive
their choices from these enums; other modules refer to members (``QuantMode.FP8_E4M3FN_FAST``),
never to the strings. Meanings are in ``docs/MODES.md``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

import torch

from .errors import UnknownOptionError


class Option(str, Enum):
    """A str Enum whose members carry a one-line description and a hardware requirement."""

    description: str
    requires: str

    def __new__(cls, value: str, description: str = "", requires: str = "any device"):
        member = str.__new__(cls, value)
        member._value_ = value
        member.description = description
        member.requires = requires
        return member

    def __str__(self) -> str:
        return self.value

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every member's value (the strings a user may type), in registry order."""
        return tuple(m.value for m in cls)


class QuantMode(Option):
    """How the DiT's linear weights are stored and multiplied (``quantization=``)."""

    DISABLED = (
        "disabled",
        "base precision; layers stored as fp8 / GGUF Q8_0 / quanto run in the storage mode of their file",
    )
    FP8_E4M3FN = ("fp8_e4m3fn", "fp8 e4m3 weights (direct cast), upcast before the matmul")
    FP8_E4M3FN_FAST = (
        "fp8_e4m3fn_fast",
        "fp8 e4m3 weights, fp8 tensor-core matmul with per-token activation scales",
        "CUDA compute capability >= 8.9, or the CPU",
    )
    FP8_E4M3FN_SCALED = (
        "fp8_e4m3fn_scaled",
        "fp8 e4m3 weights + fp32 scale per output channel, dequantized before the matmul",
    )
    FP8_E4M3FN_SCALED_FAST = (
        "fp8_e4m3fn_scaled_fast",
        "scaled fp8 e4m3 weights, fp8 tensor-core matmul with activation + weight scales",
        "CUDA compute capability >= 8.9, or the CPU",
    )
    FP8_E5M2 = ("fp8_e5m2", "fp8 e5m2 weights (direct cast), upcast before the matmul")
    FP8_E5M2_FAST = (
        "fp8_e5m2_fast",
        "fp8 e5m2 weights, fp8 tensor-core matmul (e4m3 activations)",
        "CUDA compute capability >= 8.9, or the CPU",
    )
    FP8_E5M2_SCALED = (
        "fp8_e5m2_scaled",
        "fp8 e5m2 weights + fp32 scale per output channel, dequantized before the matmul",
    )
    FP8_E5M2_SCALED_FAST = (
        "fp8_e5m2_scaled_fast",
        "scaled fp8 e5m2 weights, fp8 tensor-core matmul (e4m3 activations)",
        "CUDA compute capability >= 8.9, or the CPU",
    )
    FP4_EXPERIMENTAL = (
        "fp4_experimental",
        "MXFP4 weights (e2m1 + power-of-two scale per 32), dequantized before the matmul",
    )
    FP4_SCALED = (
        "fp4_scaled",
        "NVFP4 weights (e2m1 + e4m3 scale per 16 + fp32 tensor scale), dequantized per layer",
    )
    FP4_SCALED_FAST = (
        "fp4_scaled_fast",
        "NVFP4 weights; native FP4 matmul on Blackwell, fused dequantize path elsewhere",
        "Blackwell (sm100 / sm120) for the native path; any device otherwise",
    )
    GGUF_Q8_0 = (
        "gguf_q8_0",
        "GGUF Q8_0: int8 weights + fp16 scale per 32 along K (8.5 bits), dequantized per layer",
    )

    @property
    def is_fp8(self) -> bool:
        return self.value.startswith("fp8")

    @property
    def is_fp4(self) -> bool:
        return self.value.startswith("fp4")

    @property
    def is_scaled(self) -> bool:
        return "scaled" in self.value

    @property
    def is_fast(self) -> bool:
        return self.value.endswith("_fast")

    @property
    def is_gguf(self) -> bool:
        return self.value.startswith("gguf")


class AttentionMode(Option):
    """Which attention kernel the DiT runs (``attention=``)."""

    SDPA = (
        "sdpa",
        "torch scaled_dot_product_attention (cuDNN kernel on CUDA where fastest)",
    )
    FLASH_ATTN = (
        "flash_attn",
        "best installed FlashAttention (Hopper: FA3, else FA4, else FA2; Blackwell: FA4 first)",
        "CUDA, fp16/bf16, package flash-attn, flash_attn_interface (FA3) or flash-attn-4",
    )
    FLASH_ATTN_2 = ("flash_attn_2", "FlashAttention 2 exactly", "CUDA, fp16/bf16, flash-attn 2")
    FLASH_ATTN_3 = (
        "flash_attn_3",
        "FlashAttention 3 exactly",
        "Hopper GPU, fp16/bf16, flash_attn_interface",
    )
    SAGEATTN = ("sageattn", "SageAttention (INT8 QK)", "CUDA, package sageattention")
    SAGEATTN_3 = (
        "sageattn_3",
        "SageAttention3 FP4 microscaling, per-block mean smoothing on (accurate)",
        "Blackwell (sm100 / sm120), package sageattn3",
    )
    SAGEATTN_3_FP4 = (
        "sageattn_3_fp4",
        "SageAttention3 FP4 microscaling, smoothing off (fastest)",
        "Blackwell (sm100 / sm120), package sageattn3",
    )
    SAGEATTN_3_FP8 = (
        "sageattn_3_fp8",
        "8-bit attention: INT8 QK, FP8 PV (sageattention's kernel, else wanstudio's Triton one)",
        "CUDA compute capability >= 8.9; sageattention >= 2 or Triton",
    )
    XFORMERS = (
        "xformers",
        "xformers memory_efficient_attention",
        "CUDA, xformers built for this torch",
    )


class BasePrecision(Option):
    """The dtype of unquantized weights and of compute (``dtype=``)."""

    FP32 = ("fp32", "float32 weights and compute")
    BF16 = ("bf16", "bfloat16 weights and compute, fp32 islands as in the official code")
    FP16 = ("fp16", "float16 weights and compute, fp32 islands")
    FP16_FAST = (
        "fp16_fast",
        "float16 with fp16 matmul accumulation (faster, less accurate)",
        "CUDA",
    )

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype weights and activations are held in."""
        return {"fp32": torch.float32, "bf16": torch.bfloat16}.get(self.value, torch.float16)

    @classmethod
    def of(cls, value: BasePrecision | str | torch.dtype) -> BasePrecision:
        """A precision from its name or from a torch dtype (float32 / bfloat16 / float16)."""
        if isinstance(value, torch.dtype):
            for member in (cls.FP32, cls.BF16, cls.FP16):
                if member.dtype == value:
                    return member
            raise UnknownOptionError(
                f"BasePrecision: dtype {value} is not a base precision; use torch.float32, "
                f"torch.bfloat16 or torch.float16 (or one of {', '.join(cls.names())})."
            )
        return parse_option(cls, value)


class Scheduler(Option):
    """The sampler of the denoising steps (``scheduler=``)."""

    EULER = ("euler", "InfiniteTalk's Euler flow-matching sampler with shift")
    UNIPC = ("unipc", "UniPC multistep (diffusers' flow-matching scheduler)")
    DISTILL = (
        "euler_distill",
        "Euler on a step-distill LoRA's trained timesteps (1000, 750, 500, 250 at 4 steps, shifted)",
    )


class EncoderOffload(Option):
    """Where umT5, CLIP and wav2vec2 wait between their uses (``offload_encoders=``)."""

    AUTO = ("auto", "on when blocks are swapped or the card has less than 48 GiB, else off")
    ON = ("on", "each encoder is on the GPU only while it runs (host copy pinned)")
    OFF = ("off", "the encoders stay on the device")

    @property
    def setting(self) -> bool | None:
        """The pipeline keyword's value: None (decide), True or False."""
        return {"auto": None, "on": True, "off": False}[self.value]


class TextEncoderDevice(Option):
    """Where umT5 runs (``text_encoder_device=``)."""

    AUTO = ("auto", "the GPU when it fits beside the DiT now, else the CPU for that call")
    CPU = ("cpu", "always the CPU (the official --t5_cpu): slower, no GPU memory")

    @property
    def setting(self) -> str | None:
        return None if self is TextEncoderDevice.AUTO else "cpu"


class VAETilingMode(Option):
    """Whether the VAE encodes and decodes in spatial tiles (``tiled_vae=``)."""

    AUTO = ("auto", "tiles when the untiled working set would not fit, or the device runs out")
    ON = ("on", "always tiles (least memory; blended seams)")
    OFF = ("off", "never tiles (the reference result)")

    @property
    def setting(self) -> bool | str:
        return {"auto": "auto", "on": True, "off": False}[self.value]


class SizeClass(Option):
    """The resolution class whose bucket sizes a clip is generated at (``size_class=``)."""

    P480 = ("480", "480-class buckets (~640x640 pixels)")
    P720 = ("720", "720-class buckets (~960x960 pixels)")


class SpeakerMix(Option):
    """How two speakers' audio tracks are combined (``speaker_mix=``)."""

    PARA = ("para", "two speakers talk at the same time (tracks overlaid)")
    ADD = ("add", "two speakers talk in turn (speaker 1, then speaker 2)")


class ParallelMode(Option):
    """How the processes of a ``torchrun`` launch share the work (``wanstudio.parallel``)."""

    NONE = ("none", "one process computes everything")
    ULYSSES = (
        "ulysses",
        "sequence parallel: tokens split across processes, all-to-all around self-attention",
        "torchrun, 2+ processes; the attention heads (40 for 14B) divisible by their number",
    )
    CFG = (
        "cfg",
        "the 2 or 3 guidance calls of a step on different processes",
        "torchrun with 2 or 3 processes",
    )
    ULYSSES_CFG = (
        "ulysses+cfg",
        "guidance calls on groups of processes, each group sequence parallel",
        "torchrun, cfg_size (2 or 3) x a head-count divisor processes",
    )

    @property
    def splits_tokens(self) -> bool:
        """Ulysses sequence parallelism is on."""
        return self in (ParallelMode.ULYSSES, ParallelMode.ULYSSES_CFG)

    @property
    def splits_guidance(self) -> bool:
        """The guidance calls of a step run on different processes."""
        return self in (ParallelMode.CFG, ParallelMode.ULYSSES_CFG)


class CacheMode(Option):
    """Step caching: reuse a condition's last block residual instead of running the blocks."""

    NONE = ("none", "every DiT call runs every block")
    TEACACHE = (
        "teacache",
        "TeaCache: skip a condition's blocks while the accumulated, polynomial-rescaled change of "
        "its time signal stays under the threshold (first steps and the last step always run)",
    )
    MAGCACHE = (
        "magcache",
        "MagCache: skip while the accumulated error of the published residual magnitude ratios "
        "stays under the threshold, at most K steps in a row (first 20% and the last step run)",
    )

    @property
    def default_threshold(self) -> float:
        """TeaCache 0.2 (InfiniteTalk's --teacache_thresh default), MagCache 0.12
        (MagCache4Wan2.1's --magcache_thresh default), 0 for none."""
        return {"none": 0.0, "teacache": 0.2, "magcache": 0.12}[self.value]


class TeaCacheIndicator(Option):
    """What TeaCache compares between a condition's consecutive calls."""

    E0 = (
        "e0",
        "the block modulation e0 = time_projection(e): the published Wan2.1 i2v coefficients "
        "with use_ret_steps (InfiniteTalk's default); 5 retained steps",
    )
    E = ("e", "the time embedding e: the published Wan2.1 i2v coefficients without retention steps")
    MODULATED = (
        "modulated",
        "block 0's modulated input LN(x) (1 + scale) + shift (the TeaCache paper's signal); no "
        "published Wan polynomial: the raw relative L1 accumulates, so use a smaller threshold",
    )


@dataclass(frozen=True)
class SamplingSettings:
    """What a :class:`GenerationPreset` sets (the pipeline's keyword of the same name).

    Args:
        steps: model evaluations per clip.
        shift: timestep shift; None = the size class's default (7 at 480, 11 at 720).
        text_scale / audio_scale: guidance scales (both 1: one model call per step).
        scheduler: the sampler.
        lora_strength: the strength the preset's LoRA is meant to run at (None: no LoRA).
        source: where the numbers come from.
    """

    steps: int
    shift: float | None
    text_scale: float
    audio_scale: float
    scheduler: Scheduler
    lora_strength: float | None = None
    source: str = ""

    def as_kwargs(self) -> dict:
        """The pipeline call's keywords (``shift`` left out when it follows the size class)."""
        kw = dict(
            steps=self.steps,
            text_scale=self.text_scale,
            audio_scale=self.audio_scale,
            scheduler=self.scheduler.value,
        )
        return kw if self.shift is None else {**kw, "shift": self.shift}


class GenerationPreset(Option):
    """Named sampling settings; :attr:`settings` holds the numbers."""

    STANDARD = ("standard", "InfiniteTalk as released: 40 Euler steps, text 5, audio 4, shift by size")
    DISTILL_4STEP = (
        "distill_4step",
        "lightx2v step/CFG-distill LoRA: 4 steps on its trained timesteps, shift 5, text 1, audio 2",
        "a lightx2v cfg_step_distill LoRA (e.g. Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32)",
    )
    FUSIONX_8STEP = (
        "fusionx_8step",
        "FusionX LoRA as InfiniteTalk's README runs it: 8 Euler steps, shift 2, text 1, audio 2",
        "the FusionX LoRA (Wan2.1_I2V_14B_FusionX_LoRA)",
    )

    @property
    def settings(self) -> SamplingSettings:
        """The preset's steps, shift, guidance scales, scheduler and LoRA strength."""
        return _PRESET_SETTINGS[self]


_README = "MeiGen-AI/InfiniteTalk README"
_PRESET_SETTINGS: dict[GenerationPreset, SamplingSettings] = {
    GenerationPreset.STANDARD: SamplingSettings(40, None, 5.0, 4.0, Scheduler.EULER, None, _README),
    # timesteps and shift: lightx2v configs/distill/wan_i2v_distill_4step_cfg_lora.json and the
    # Self-Forcing-Plus training config (denoising_step_list 1000/750/500/250, timestep_shift 5);
    # text 1 / audio 2 / strength 1: InfiniteTalk's README for its 4-8 step LoRA runs
    GenerationPreset.DISTILL_4STEP: SamplingSettings(
        4, 5.0, 1.0, 2.0, Scheduler.DISTILL, 1.0, f"lightx2v distill configs; {_README}"
    ),
    GenerationPreset.FUSIONX_8STEP: SamplingSettings(8, 2.0, 1.0, 2.0, Scheduler.EULER, 1.0, _README),
}

QUANT_MODES: tuple[str, ...] = QuantMode.names()
ATTENTION_MODES: tuple[str, ...] = AttentionMode.names()
BASE_PRECISIONS: tuple[str, ...] = BasePrecision.names()
SCHEDULERS: tuple[str, ...] = Scheduler.names()
GENERATION_PRESETS: tuple[str, ...] = GenerationPreset.names()
PARALLEL_MODES: tuple[str, ...] = ParallelMode.names()
CACHE_MODES: tuple[str, ...] = CacheMode.names()

E = TypeVar("E", bound=Option)


def parse_option(kind: type[E], value: str | E) -> E:
    """Parse a user-facing string into a member of ``kind``; reject unknown names helpfully."""
    if isinstance(value, kind):
        return value
    text = str(value).strip()
    for member in kind:
        if member.value == text or member.value == text.lower():
            return member
    valid = kind.names()
    close = difflib.get_close_matches(text.lower(), valid, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    label = kind.__name__
    raise UnknownOptionError(f"{label}: {text!r} is not a known mode.{hint} Valid: {', '.join(valid)}.")


def options_table(kind: type[Option]) -> str:
    """A Markdown table of a registry (name, meaning, needs): the README's source of truth."""
    rows = ["| name | meaning | needs |", "|---|---|---|"]
    rows += [f"| `{m.value}` | {m.description} | {m.requires} |" for m in kind]
    return "\n".join(rows)
