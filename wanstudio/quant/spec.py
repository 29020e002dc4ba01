"""What each :class:`QuantMode` means, as data, and the hardware checks that go with it.

Every member of ``QuantMode`` has a :class:`QuantSpec` here (or a refusal in ``REFUSED`` with
its reason); ``tests/test_quant.py`` proves the registry is complete. Meanings follow
``docs/MODES.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import CheckpointError, UnsupportedModeError
from ..options import QuantMode, parse_option

# Storage formats a quantized Linear can hold: each names its module in ``quant/formats/``.
FP8 = "fp8"  # weight [N, K] fp8 (+ scale_weight fp32, per output channel or per tensor)
NVFP4 = "nvfp4"  # e2m1 packed + e4m3 scale per 16 along K + fp32 scale per tensor
MXFP4 = "mxfp4"  # e2m1 packed + e8m0 (power-of-two) scale per 32 along K
Q8_0 = "q8_0"  # GGUF Q8_0: int8 + fp16 scale per 32 along K

# Matmul kinds (the paths of ``quant.kernel_path``).
LINEAR = "linear"  # not quantized: nn.Linear at base precision (``disabled``)
DEQUANTIZE = "dequantize"  # weight -> compute dtype, then F.linear
SCALED_MM = "scaled_mm"  # fp8 tensor-core matmul (torch._scaled_mm), per-token e4m3 activations
FP4_NATIVE = "fp4_native"  # Blackwell fp4 _scaled_mm where present, else per-layer dequantize

# `_fast` fp8 needs fp8 tensor cores: Ada (8.9) / Hopper (9.0) and newer.
FP8_MIN_CAPABILITY = (8, 9)
# Native FP4 tensor cores: Blackwell (sm100 datacenter, sm120 consumer).
FP4_MIN_CAPABILITY = (10, 0)


@dataclass(frozen=True)
class QuantSpec:
    """How one mode stores weights and multiplies."""

    mode: QuantMode
    storage: str | None  # FP8 / NVFP4 / MXFP4 / Q8_0; None = not quantized (``disabled``)
    matmul: str  # DEQUANTIZE / SCALED_MM / FP4_NATIVE
    fp8_dtype: torch.dtype | None = None  # weight storage dtype of the fp8 modes
    per_channel_scale: bool = False  # fp32 scale per output channel (the `_scaled` fp8 modes)

    def __post_init__(self) -> None:
        if (self.storage == FP8) != (self.fp8_dtype is not None):
            raise ValueError(f"{self.mode}: fp8 storage needs an fp8 dtype and nothing else does")
        if self.matmul == SCALED_MM and self.storage != FP8:
            raise ValueError(f"{self.mode}: _scaled_mm with per-token scales is an fp8 path")

    @property
    def needs_fp8_tensor_cores(self) -> bool:
        return self.matmul == SCALED_MM


_E4, _E5 = torch.float8_e4m3fn, torch.float8_e5m2

SPECS: dict[QuantMode, QuantSpec] = {
    s.mode: s
    for s in (
        QuantSpec(QuantMode.DISABLED, None, DEQUANTIZE),
        QuantSpec(QuantMode.FP8_E4M3FN, FP8, DEQUANTIZE, _E4),
        QuantSpec(QuantMode.FP8_E4M3FN_FAST, FP8, SCALED_MM, _E4),
        QuantSpec(QuantMode.FP8_E4M3FN_SCALED, FP8, DEQUANTIZE, _E4, per_channel_scale=True),
        QuantSpec(QuantMode.FP8_E4M3FN_SCALED_FAST, FP8, SCALED_MM, _E4, per_channel_scale=True),
        QuantSpec(QuantMode.FP8_E5M2, FP8, DEQUANTIZE, _E5),
        QuantSpec(QuantMode.FP8_E5M2_FAST, FP8, SCALED_MM, _E5),
        QuantSpec(QuantMode.FP8_E5M2_SCALED, FP8, DEQUANTIZE, _E5, per_channel_scale=True),
        QuantSpec(QuantMode.FP8_E5M2_SCALED_FAST, FP8, SCALED_MM, _E5, per_channel_scale=True),
        QuantSpec(QuantMode.FP4_EXPERIMENTAL, MXFP4, DEQUANTIZE),
        QuantSpec(QuantMode.FP4_SCALED, NVFP4, DEQUANTIZE),
        QuantSpec(QuantMode.FP4_SCALED_FAST, NVFP4, FP4_NATIVE),
        QuantSpec(QuantMode.GGUF_Q8_0, Q8_0, DEQUANTIZE),
    )
}

# Modes the registry offers but this implementation refuses, with the reason shown to users.
REFUSED: dict[QuantMode, str] = {}


def spec_for(mode: QuantMode | str) -> QuantSpec:
    """The spec of a mode (parsing user strings through the registry)."""
    mode = parse_option(QuantMode, mode)
    if mode in REFUSED:
        raise UnsupportedModeError(f"quantization {mode.value!r} is not available: {REFUSED[mode]}")
    return SPECS[mode]


def storage_mode_for(dtype: torch.dtype, scaled: bool) -> QuantMode:
    """The storage mode that runs an fp8 checkpoint as stored (what ``disabled`` picks)."""
    table = {
        (torch.float8_e4m3fn, False): QuantMode.FP8_E4M3FN,
        (torch.float8_e4m3fn, True): QuantMode.FP8_E4M3FN_SCALED,
        (torch.float8_e5m2, False): QuantMode.FP8_E5M2,
        (torch.float8_e5m2, True): QuantMode.FP8_E5M2_SCALED,
    }
    try:
        return table[(dtype, bool(scaled))]
    except KeyError:
        raise CheckpointError(f"{dtype} is not an fp8 storage dtype wanstudio runs") from None


def counted_text(counts) -> str:
    """(label, count) pairs as 'fp8_e5m2_scaled x 400, fp8_e4m3fn_scaled x 10': the one wording of
    a storage or kernel mix in summaries, tables and messages."""
    return ", ".join(f"{label} x {n}" for label, n in counts)


@dataclass(frozen=True)
class QuantMix:
    """The quantization of a model whose layers run in different modes: a checkpoint that mixes
    storage formats (an e5m2 base with e4m3 audio layers, a GGUF file mixing Q8_0 and K-quants)
    loaded with ``quantization="disabled"``, each layer in the mode its file gave it.

    ``model.quantization`` is a :class:`QuantMode` when every quantizable layer runs in one mode,
    and a ``QuantMix`` otherwise. Like a mode it has a ``value`` (``"mixed"``) and is never
    ``QuantMode.DISABLED``; :attr:`modes` counts the quantizable layers per mode (``disabled``:
    layers dequantized to the base precision).
    """

    counts: tuple[tuple[QuantMode, int], ...]  # (mode, layers), most layers first

    @classmethod
    def of(cls, modes: dict[str, QuantMode]) -> QuantMode | QuantMix:
        """The model's quantization from its layers' modes: one mode, or the mix."""
        tally: dict[QuantMode, int] = {}
        for mode in modes.values():
            tally[mode] = tally.get(mode, 0) + 1
        if len(tally) <= 1:
            return next(iter(tally), QuantMode.DISABLED)
        return cls(tuple(sorted(tally.items(), key=lambda kv: (-kv[1], kv[0].value))))

    @property
    def value(self) -> str:
        return "mixed"

    @property
    def modes(self) -> dict[QuantMode, int]:
        """Quantizable layers per mode."""
        return dict(self.counts)

    @property
    def description(self) -> str:
        return "mixed layers: " + counted_text((m.value, n) for m, n in self.counts)

    def __str__(self) -> str:
        return self.description


# --- hardware -------------------------------------------------------------------------------------
def cuda_capability(device: torch.device) -> tuple[int, int]:
    """Compute capability of a CUDA device (tests monkeypatch this to simulate other GPUs)."""
    return torch.cuda.get_device_capability(device)


def cuda_name(device: torch.device) -> str:
    """Marketing name of a CUDA device (tests monkeypatch this with :func:`cuda_capability`)."""
    return torch.cuda.get_device_name(device)


def _modes_that_work(capability: tuple[int, int]) -> list[str]:
    return [
        m.value
        for m, s in SPECS.items()
        if m not in REFUSED and not (s.needs_fp8_tensor_cores and capability < FP8_MIN_CAPABILITY)
    ]


def check_device(mode: QuantMode | str, device: torch.device | str | None) -> None:
    """Raise :class:`UnsupportedModeError` if ``mode`` cannot run on ``device``.

    Only the fp8 ``_fast`` modes have a hard requirement (fp8 tensor cores, compute capability
    >= 8.9, or the CPU where torch implements ``_scaled_mm``). ``fp4_scaled_fast`` runs anywhere:
    it picks its path per device (see ``QuantizedLinear.path``).
    """
    spec = spec_for(mode)
    if device is None or not spec.needs_fp8_tensor_cores:
        return
    device = torch.device(device)
    if device.type != "cuda":
        return
    cap = tuple(cuda_capability(device))
    if cap >= FP8_MIN_CAPABILITY:
        return
    raise UnsupportedModeError(
        f"quantization {spec.mode.value!r} needs {spec.mode.requires} (fp8 tensor cores); "
        f"{device} ({cuda_name(device)}) has compute capability {cap[0]}.{cap[1]}. "
        f"Modes that work on this GPU: {', '.join(_modes_that_work(cap))}."
    )


def fp4_native_available(device: torch.device | str) -> bool:
    """Whether this device has FP4 tensor cores that ``torch._scaled_mm`` can drive."""
    device = torch.device(device)
    return (
        device.type == "cuda"
        and hasattr(torch, "float4_e2m1fn_x2")
        and tuple(cuda_capability(device)) >= FP4_MIN_CAPABILITY
    )
