"""Notebook helpers: everything a studio notebook or panel does beyond one call lives here.

The notebooks stay thin: they call these functions, and ``tests/test_widgets.py`` tests them.
One module per concern, all importable from ``wanstudio.studio``:

* :mod:`.weights` — :class:`WeightPaths` and :func:`find_weights`: real checkpoints named by
  the ``WANSTUDIO_WEIGHTS`` environment variable or a ``wanstudio.toml`` / ``.json`` file;
* :mod:`.availability` — what each registry mode does on a device (runs, and through which
  kernel, or why not), for the dropdown labels and the load summary;
* :mod:`.session` — :class:`LoadSettings`, :func:`load_pipeline` (tiny preset or real files),
  :func:`summarize` (parameters, bytes per dtype, memory, kernel paths), output paths;
* :mod:`.comparisons` — :func:`compare_quant_modes` (memory and SQNR of every quantization
  mode; ``wanstudio.widgets.plots`` draws it);
* :mod:`.incidents` — :func:`misalign`, :func:`strict_forward_error`, :func:`hidden_copy_cost`,
  the inspector and the block-swap timeline: the layout incidents of notebook 03;
* :mod:`.inputs` — :func:`example_inputs`: small seeded forward inputs for any config.

The studio sits above the pipeline and below the widgets: it returns data, the widgets draw.
"""

from ..availability import Availability
from .availability import (
    attention_availability,
    default_device,
    default_precision,
    modes_table,
    precision_availability,
    quant_availability,
    quant_kernel_path,
    swap_availability,
)
from .comparisons import QuantComparison, QuantRow, compare_quant_modes, truncated
from .incidents import (
    CopyCost,
    Span,
    block_swap,
    contract_layers,
    fast_linear_layers,
    hidden_copy_cost,
    inspect_model,
    misalign,
    realign,
    report_rows,
    row_field,
    simulated_block_swap,
    strict_forward_error,
    swap_timeline,
)
from .inputs import example_inputs, forward
from .session import (
    OUTPUT_ENV,
    ComponentMemory,
    LoadResult,
    LoadSettings,
    ModelSummary,
    apply_settings,
    default_settings,
    kernel_paths,
    load_dit,
    load_pipeline,
    module_memory,
    output_path,
    pipeline_presets,
    quant_paths,
    quant_report,
    sample_media,
    summarize,
)
from .weights import (
    CONFIG_NAMES,
    TINY_PRESET,
    WEIGHTS_ENV,
    WeightPaths,
    config_search_path,
    describe_weights,
    find_weights,
)

__all__ = [
    "CONFIG_NAMES",
    "OUTPUT_ENV",
    "TINY_PRESET",
    "WEIGHTS_ENV",
    "Availability",
    "ComponentMemory",
    "CopyCost",
    "LoadResult",
    "LoadSettings",
    "ModelSummary",
    "QuantComparison",
    "QuantRow",
    "Span",
    "WeightPaths",
    "apply_settings",
    "attention_availability",
    "block_swap",
    "compare_quant_modes",
    "config_search_path",
    "contract_layers",
    "default_device",
    "default_precision",
    "default_settings",
    "describe_weights",
    "example_inputs",
    "fast_linear_layers",
    "find_weights",
    "forward",
    "hidden_copy_cost",
    "inspect_model",
    "kernel_paths",
    "load_dit",
    "load_pipeline",
    "misalign",
    "modes_table",
    "module_memory",
    "output_path",
    "pipeline_presets",
    "precision_availability",
    "quant_availability",
    "quant_kernel_path",
    "quant_paths",
    "quant_report",
    "realign",
    "report_rows",
    "row_field",
    "sample_media",
    "simulated_block_swap",
    "strict_forward_error",
    "summarize",
    "swap_availability",
    "swap_timeline",
    "truncated",
]
