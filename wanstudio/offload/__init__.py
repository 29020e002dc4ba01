"""Block swap: run a DiT whose last N blocks live in pinned host memory.

Semantics are in ``docs/MODES.md`` (Block swap). How it is done here:

* **Units.** The swapped units are the last N of ``model.blocks`` plus, when asked,
  ``text_embedding`` and ``img_emb``. Each one is packed once into its own pinned host buffer:
  every parameter and buffer of the unit (whatever the module types: quantized weights, their
  scales, packed fp4 bytes, non-persistent buffers) sits at a 512-byte-aligned offset with its
  shape, dtype and strides. That host copy is the master; nothing is ever copied back.
* **Slots.** On the device a pool of ``min(prefetch + 1, swapped units)`` slots is allocated
  once, each one flat buffer as large as the largest unit. A unit's tensors are views into a
  slot at the offsets of its host buffer, so one copy moves a whole unit and each tensor
  arrives with the layout it had resident, 512-byte aligned like a fresh allocation from the
  CUDA caching allocator. (cuBLASLt's heuristics take pointer alignment into account, up to
  256 bytes: with the same alignment the swapped model gets the same kernels, and the GPU tests
  check that its outputs are bit-identical.)
* **Schedule.** Before unit i runs (forward pre-hook), the swapped units among
  i+1 .. i+prefetch are copied on a side stream; the model's own pre-hook starts units
  0 .. prefetch-1. Compute waits for the copy event of its unit; before a slot is rewritten,
  the copy stream waits for the event recorded when the slot's previous unit finished
  (forward post-hook, which also points the unit's tensors back at the host master). Every
  forward copies every swapped unit once from its host master, so in-place edits of the
  weights between forwards are seen.
* **No trace when off.** :func:`disable_block_swap` removes every hook and puts the weights
  back on the device, each tensor in its own allocation.

The device is behind :class:`TransferBackend`. :class:`CudaTransferBackend` is the real one;
:class:`FakeTransferBackend` simulates the two streams on the CPU with a virtual clock and logs
every operation: the bookkeeping is tested with it, without a GPU.

Loader hook: :func:`swap_placement` says where each tensor of a model goes; a loader that
wants the swapped blocks never to touch the GPU either loads them on the CPU and calls
:func:`enable_block_swap` (it packs them unit by unit, releasing each CPU copy as it goes), or
calls :func:`plan_block_swap` on a meta model first and copies the checkpoint tensors into the
pinned host views in place (no extra host copy at all).

Modules: ``transfer`` (backends, host memory), ``packing`` (a unit's tensors as views of one
flat buffer), ``stats`` (timeline, ``block_swap_stats``), ``placement`` (which units swap,
:func:`check_blocks_to_swap`, :func:`swap_placement`), ``schedule`` (the per-model state
machine: plan, slots, hooks), ``api`` (plan / enable / disable) and ``planner`` (which savings a
clip needs to fit a VRAM budget: :func:`plan_memory`, :class:`MemoryPlan`).
"""

from .api import disable_block_swap, enable_block_swap, plan_block_swap
from .packing import BLOCK_SWAP_CONTRACT
from .placement import ON_DEVICE, ON_HOST, BlockSwapPlan, check_blocks_to_swap, swap_placement
from .planner import (
    MemoryPlan,
    PartSizes,
    PhasePeak,
    dit_activation_bytes,
    measure_block_bytes,
    measure_parts,
    plan_dit_memory,
    plan_memory,
)
from .schedule import HOST_HEADROOM_BYTES
from .stats import STATS_HISTORY, BlockSwapStats, BlockSwapStep, TimelineEntry
from .transfer import (
    PLACEMENT_ALIGN,
    CudaTransferBackend,
    FakeEvent,
    FakeTransferBackend,
    HostBuffer,
    TransferBackend,
    is_page_locked,
)

__all__ = [
    "BLOCK_SWAP_CONTRACT",
    "HOST_HEADROOM_BYTES",
    "ON_DEVICE",
    "ON_HOST",
    "PLACEMENT_ALIGN",
    "STATS_HISTORY",
    "BlockSwapPlan",
    "BlockSwapStats",
    "BlockSwapStep",
    "CudaTransferBackend",
    "FakeEvent",
    "FakeTransferBackend",
    "HostBuffer",
    "MemoryPlan",
    "PartSizes",
    "PhasePeak",
    "TimelineEntry",
    "TransferBackend",
    "check_blocks_to_swap",
    "disable_block_swap",
    "dit_activation_bytes",
    "enable_block_swap",
    "is_page_locked",
    "measure_block_bytes",
    "measure_parts",
    "plan_block_swap",
    "plan_dit_memory",
    "plan_memory",
    "swap_placement",
]
