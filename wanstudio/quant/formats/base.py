"""The interface of a quantized storage format (one module per format in this package).

A format owns everything about what a ``QuantizedLinear`` stores: the buffers (names, shapes,
dtypes for an [N, K] weight), how a weight becomes those tensors, how they turn back into a
weight, their size and a one-line description. ``QuantizedLinear`` holds one format object and
delegates to it; the matmul-path choice (``linear.py``) reads the format's capability flags
(:attr:`StorageFormat.scaled_mm_dtype`, :attr:`StorageFormat.native_fp4`).

Format objects are immutable and shared by every layer of a mode.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .. import kernels
from ..fp8 import FP8_DTYPES
from ..spec import QuantSpec


@dataclass(frozen=True)
class Buffer:
    """One stored tensor of a quantized [N, K] weight."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    fill: float | None = None  # value of a fresh layer's tensor; None = uninitialised

    def allocate(self, device: torch.device | str | None) -> torch.Tensor:
        """A fresh tensor of this buffer (nothing is allocated on ``"meta"``)."""
        if self.fill is None:
            return torch.empty(self.shape, dtype=self.dtype, device=device)
        return torch.full(self.shape, self.fill, dtype=self.dtype, device=device)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class StorageFormat(ABC):
    """How the weights of one quant mode are stored. Subclasses set the class fields.

    Args:
        spec: the mode's :class:`QuantSpec` (its ``storage`` names this format).
    """

    name: str = ""  # equals ``QuantSpec.storage`` and this format's module name
    label: str = ""  # how path details name the weight ("fp8", "NVFP4", ...)
    block_size: int = 0  # weights sharing one scale along K (0: none)
    bits_per_weight: float = 16.0  # nominal, scales included (docs/MODES.md)
    native_fp4: bool = False  # packed e2m1 + e4m3 block scales that FP4 tensor cores read

    def __init__(self, spec: QuantSpec):
        if spec.storage != self.name:
            raise ValueError(f"{type(self).__name__} stores {self.name!r}, not {spec.storage!r}")
        self.spec = spec

    @property
    def scaled_mm_dtype(self) -> torch.dtype | None:
        """The dtype of a stored weight ``torch._scaled_mm`` takes as is (mat2), or None."""
        return None

    # --- stored tensors ---------------------------------------------------------------------------
    @abstractmethod
    def buffers(self, n: int, k: int) -> tuple[Buffer, ...]:
        """The tensors a fresh [N, K] layer registers, in state-dict order."""

    @property
    @abstractmethod
    def names(self) -> tuple[str, ...]:
        """The names of :meth:`buffers` (state-dict keys relative to the layer)."""

    @property
    def required(self) -> tuple[str, ...]:
        """The names a checkpoint must provide (the others keep their fresh value)."""
        return self.names

    def expected_shape(self, name: str, t: torch.Tensor, n: int, k: int) -> tuple[int, ...]:
        """The shape ``t`` must have to be stored as ``name`` in an [N, K] layer."""
        return next(b.shape for b in self.buffers(n, k) if b.name == name)

    def nbytes(self, n: int, k: int) -> int:
        """Bytes of a quantized [N, K] weight and its scales, as :meth:`quantize` makes them."""
        return sum(b.nbytes for b in self.buffers(n, k))

    # --- numerics ---------------------------------------------------------------------------------
    @abstractmethod
    def quantize(self, weight: torch.Tensor, scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Weight [N, K] (float, or fp8 as a checkpoint stores it, detached) -> tensors by name.

        ``scale`` is a checkpoint's stored fp32 scale ([N] or one value; real weight = weight *
        scale) or None. Raises ``CheckpointError`` for a stored format this one cannot hold.
        """

    @abstractmethod
    def dequantize(
        self, tensors: Mapping[str, torch.Tensor], k: int, dtype: torch.dtype, where: str
    ) -> torch.Tensor:
        """The stored tensors -> a fresh weight [N, K] in ``dtype`` (``where`` names the layer)."""

    def rowwise_scale(self, tensors: Mapping[str, torch.Tensor], n: int) -> torch.Tensor:
        """The weight scale as ``torch._scaled_mm``'s row-wise ``scale_b``: fp32 [1, N].

        Only formats with a :attr:`scaled_mm_dtype` implement it.
        """
        raise NotImplementedError(f"{self.name} weights do not feed torch._scaled_mm")

    # --- descriptions -----------------------------------------------------------------------------
    @abstractmethod
    def describe(self) -> str:
        """One line: what is stored per weight."""

    @abstractmethod
    def dequantize_detail(self, device: torch.device) -> str:
        """One line: what the dequantize path does with this format on ``device``."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.describe()}>"

    # immutable and shared: copies of a layer keep the same object
    def __copy__(self) -> StorageFormat:
        return self

    def __deepcopy__(self, memo) -> StorageFormat:
        return self


def dequantize_how(device: torch.device) -> str:
    """How a weight with a fused Triton dequantize kernel is dequantized on ``device``."""
    fused = kernels.HAS_TRITON and device.type == "cuda"
    return "fused Triton kernel" if fused else f"eager on {device.type}"


def real_weight(weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The weight a checkpoint means: stored * scale (fp32), or the weight itself (fp8 -> fp32)."""
    if scale is None:
        return weight.float() if weight.dtype in FP8_DTYPES else weight
    s = scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(())
    return weight.float() * s
