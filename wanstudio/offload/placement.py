"""Which units are swapped, and where each tensor lives: validation and the loader's placement."""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import BlockSwapError

ON_DEVICE = "cuda"
ON_HOST = "cpu_pinned"


@dataclass(frozen=True)
class BlockSwapPlan:
    """What :func:`plan_block_swap` did: the swapped units and where every tensor lives."""

    blocks_to_swap: int
    swapped: tuple[str, ...]
    placement: Mapping[str, str]  # every parameter / buffer name -> 'cpu_pinned' | 'cuda'
    bytes_pinned: int
    device: torch.device


def _as_index(value: Any) -> int | None:
    """``value`` as an int (int, numpy integer, ...), or None for a bool or a non-integer."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _count(value: Any, what: str) -> int:
    """A non-negative int option (``prefetch``; blocks_to_swap has check_blocks_to_swap)."""
    if isinstance(value, bool):
        raise BlockSwapError(f"{what} must be an int, got the bool {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise BlockSwapError(f"{what} must be an int, got {value!r} ({type(value).__name__})") from None
    if n < 0:
        raise BlockSwapError(
            f"{what} must be >= 0, got {n}. Use 0 for no block swap"
            + (" and 1 or more to prefetch ahead" if what == "prefetch" else "")
            + "."
        )
    return n


def check_blocks_to_swap(value: Any, num_blocks: int | None = None) -> int:
    """``blocks_to_swap`` validated: an int in ``[0, num_blocks]`` (``>= 0`` when unknown).

    The one check of this option (the DiT's last ``value`` blocks live in host memory); returns
    it as a plain int. Bools and non-integers (1.5, "2") are refused. Raises BlockSwapError
    saying what was expected, what was found and what to pass instead.
    """
    if num_blocks is None:
        expected = "an integer >= 0"
        advice = "use 0 for no block swap, N to keep the model's last N blocks in host memory"
    else:
        expected = f"an integer in [0, {num_blocks}]"
        advice = f"use 0..{num_blocks} (0: no block swap, {num_blocks} swaps every block)"
    n = _as_index(value)
    if n is None:
        raise BlockSwapError(
            f"blocks_to_swap must be {expected}, found {value!r} ({type(value).__name__}). "
            f"Pass a whole number: {advice}."
        )
    if n < 0:
        raise BlockSwapError(f"blocks_to_swap must be {expected}, found {n}. To fix it, {advice}.")
    if num_blocks is not None and n > num_blocks:
        raise BlockSwapError(
            f"blocks_to_swap={n} is more than the model has: found {num_blocks} blocks. "
            f"Expected {expected}: {advice}."
        )
    return n


def _units(
    model: nn.Module, blocks_to_swap: Any, offload_txt_emb: bool, offload_img_emb: bool
) -> list[tuple[str, nn.Module, bool]]:
    """(name, module, swapped) for every unit that takes part, in execution order."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise BlockSwapError(
            f"block swap needs a model with a `blocks` nn.ModuleList (a WanModel); "
            f"{type(model).__name__} has {type(blocks).__name__ if blocks is not None else 'none'}"
        )
    n = check_blocks_to_swap(blocks_to_swap, len(blocks))
    units: list[tuple[str, nn.Module, bool]] = []
    for flag, name in ((offload_txt_emb, "text_embedding"), (offload_img_emb, "img_emb")):
        if flag:
            mod = getattr(model, name, None)
            if not isinstance(mod, nn.Module):
                raise BlockSwapError(
                    f"offload_{'txt' if name == 'text_embedding' else 'img'}_emb=True, but this "
                    f"model has no {name} (t2v models have no img_emb). Leave the option off."
                )
            units.append((name, mod, True))
    first = len(blocks) - n
    units += [(f"blocks.{i}", b, i >= first) for i, b in enumerate(blocks)]
    return units


def swap_placement(
    model_or_config: Any,
    blocks_to_swap: int,
    *,
    offload_txt_emb: bool = False,
    offload_img_emb: bool = False,
) -> dict[str, str]:
    """Where each tensor lives under block swap: ``{name: 'cpu_pinned' | 'cuda'}``.

    ``model_or_config`` is a model (any device, meta included) or a ``WanConfig``. Names are
    every parameter and buffer name (``named_parameters`` / ``named_buffers``, duplicates
    included), i.e. every state-dict key. 'cuda' stands for the device the model runs on.
    Allocates nothing; validates ``blocks_to_swap`` like :func:`enable_block_swap`.
    """
    from ..config import WanConfig

    model = model_or_config
    if isinstance(model_or_config, WanConfig):
        from ..model import WanModel

        model = WanModel(model_or_config, device="meta")
    prefixes = tuple(
        name + "."
        for name, _, swapped in _units(model, blocks_to_swap, offload_txt_emb, offload_img_emb)
        if swapped
    )
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in model.named_buffers(remove_duplicate=False)]
    return {n: ON_HOST if n.startswith(prefixes) else ON_DEVICE for n in names}
