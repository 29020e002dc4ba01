"""Quantized storage formats, one module per format: ``fp8``, ``nvfp4``, ``mxfp4``, ``q8_0``.

Every mode's :class:`~wanstudio.quant.spec.QuantSpec` names its storage; the module of that
name in this package defines the format class and binds it to ``FORMAT``. That name is the
registration: a new storage format is a new module here plus the ``QuantSpec`` entries of the
modes that use it (and their ``QuantMode`` members), and nothing else changes.
"""

from __future__ import annotations

import importlib

from ...options import QuantMode
from ..spec import FP4_NATIVE, SCALED_MM, QuantSpec, spec_for
from .base import Buffer, StorageFormat

__all__ = ["Buffer", "StorageFormat", "format_for"]

_BUILT: dict[QuantSpec, StorageFormat] = {}


def format_for(mode: QuantMode | str | QuantSpec) -> StorageFormat:
    """The storage format of a quantization mode (one shared, immutable object per mode).

    Raises ``ValueError`` for ``disabled`` (nothing is stored quantized) and for a spec whose
    matmul its format cannot feed.
    """
    spec = mode if isinstance(mode, QuantSpec) else spec_for(mode)
    fmt = _BUILT.get(spec)
    if fmt is not None:
        return fmt
    if spec.storage is None:
        raise ValueError(f"mode {spec.mode.value!r} is no quantization: it has no storage format")
    module = importlib.import_module(f"{__name__}.{spec.storage}")
    fmt = module.FORMAT(spec)
    if spec.matmul == SCALED_MM and fmt.scaled_mm_dtype is None:
        raise ValueError(f"{spec.mode.value}: {fmt.label} weights cannot feed torch._scaled_mm")
    if spec.matmul == FP4_NATIVE and not fmt.native_fp4:
        raise ValueError(f"{spec.mode.value}: {fmt.label} weights are not an FP4 tensor-core operand")
    _BUILT[spec] = fmt
    return fmt
