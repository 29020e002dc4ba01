"""Quantization of the DiT's Linear layers: fp8 (plain / scaled / fast), real fp4, GGUF Q8_0.

Every mode of :class:`wanstudio.options.QuantMode` is implemented with the meaning
``docs/MODES.md`` gives it:

* :func:`quantize` swaps ``nn.Linear`` layers for :class:`QuantizedLinear` in place;
* :func:`quantize_weight` quantizes one tensor (the checkpoint loader's entry point);
* :func:`quant_report` measures per-layer and whole-model SQNR, bytes and matmul paths;
* :func:`kernel_path` says what runs the matmul of a mode on a device;
* :func:`format_for` gives a mode's storage format (``quant/formats/``);
* :func:`swap_linears` replaces Linear layers (quantization and checkpoint loading use it).
"""

from . import fp4, fp8, kernels, q8_0  # noqa: F401  (submodules the GPU suite and benchmark use)
from .apply import (
    DEFAULT_KEEP,
    dequantize,
    is_kept,
    is_quantizable,
    quantizable_linears,
    quantize,
    quantized_layers,
    swap_linears,
)
from .formats import StorageFormat, format_for
from .linear import QuantizedLinear, kernel_path
from .report import LayerQuantStats, QuantReport, quant_report, sqnr_db
from .spec import REFUSED, SPECS, QuantMix, QuantSpec, check_device, spec_for, storage_mode_for
from .weights import quantize_weight

__all__ = [
    "DEFAULT_KEEP",
    "REFUSED",
    "SPECS",
    "LayerQuantStats",
    "QuantMix",
    "QuantReport",
    "QuantSpec",
    "QuantizedLinear",
    "StorageFormat",
    "check_device",
    "dequantize",
    "format_for",
    "is_kept",
    "is_quantizable",
    "kernel_path",
    "quant_report",
    "quantizable_linears",
    "quantize",
    "quantize_weight",
    "quantized_layers",
    "spec_for",
    "sqnr_db",
    "storage_mode_for",
    "swap_linears",
]
