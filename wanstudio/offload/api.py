"""The public block swap functions: plan, enable, disable (and the backend a model gets)."""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..errors import BlockSwapError
from .placement import BlockSwapPlan, _count, _units, swap_placement
from .schedule import _BlockSwap
from .transfer import CudaTransferBackend, TransferBackend


def _backend_for(model: nn.Module, device: Any, backend: TransferBackend | None) -> TransferBackend:
    if backend is not None:
        return backend
    if device is None:
        found = {t.device for t in model.parameters() if t.device.type not in ("cpu", "meta")}
        if len(found) == 1:
            device = found.pop()
        elif not found:
            where = next((t.device.type for t in model.parameters()), "nowhere")
            if not torch.cuda.is_available():
                raise BlockSwapError(
                    "block swap is meaningless on a CPU-only machine: it moves blocks between host "
                    f"memory and a GPU, and here the weights already live in host memory (model on "
                    f"{where}, no CUDA device found). Nothing to swap to: run without "
                    "blocks_to_swap."
                )
            raise BlockSwapError(
                f"block swap needs the device the model runs on; the model is on {where} and no "
                "device= was given. Pass device='cuda' (the resident part moves there)."
            )
        else:
            raise BlockSwapError(
                f"the model is spread over {sorted(map(str, found))}; pass device= to say where it runs"
            )
    device = torch.device(device)
    if device.type == "cpu":
        raise BlockSwapError(
            "block swap is meaningless on the CPU: it moves blocks between host memory and a GPU, "
            "and on the CPU the weights already live in host memory (device='cpu'). Nothing to "
            "swap to: run without blocks_to_swap, or pass device='cuda'."
        )
    if device.type != "cuda":
        raise BlockSwapError(
            f"block swap streams weights with CUDA streams and events; device {device} is not "
            "supported. Use a CUDA device or run without blocks_to_swap."
        )
    if not torch.cuda.is_available():
        raise BlockSwapError(
            f"device={device} was asked for, but torch finds no CUDA device (torch "
            f"{torch.__version__}). Block swap is meaningless on a CPU-only machine: run without "
            "blocks_to_swap."
        )
    return CudaTransferBackend(device)


def _state(model: nn.Module) -> _BlockSwap | None:
    return model.__dict__.get("_block_swap")


def _get_state(model: nn.Module, device: Any, backend: TransferBackend | None) -> _BlockSwap:
    state = _state(model)
    if state is not None:
        want = (
            backend.device
            if backend is not None
            else (torch.device(device) if device is not None else state.device)
        )
        if (
            want.type != state.device.type
            or (want.index is not None and want.index != state.device.index)
            or (backend is not None and backend is not state.backend)
        ):
            raise BlockSwapError(
                f"block swap is already set up for {state.device}; call "
                "disable_block_swap(model) before moving it to another device or backend"
            )
        return state
    state = _BlockSwap(model, _backend_for(model, device, backend))
    model.__dict__["_block_swap"] = state
    return state


@contextlib.contextmanager
def _rollback(model: nn.Module, state: _BlockSwap) -> Iterator[None]:
    """On an error (checked before anything moves): leave the model as it was."""
    fresh = not state.units
    was_active = bool(state.handles)
    try:
        yield
    except BaseException:
        if fresh:
            model.__dict__.pop("_block_swap", None)
        elif was_active and not state.handles:
            state.activate(state.prefetch)
            model.__dict__["block_swap_stats"] = state.stats
        raise


def plan_block_swap(
    model: nn.Module,
    blocks_to_swap: int,
    *,
    offload_txt_emb: bool = False,
    offload_img_emb: bool = False,
    device: torch.device | str | None = None,
    backend: TransferBackend | None = None,
) -> BlockSwapPlan:
    """Put the swapped units in pinned host memory now; install nothing yet (the loader hook).

    The model may be on the meta device: then the swapped tensors become uninitialised views of
    pinned host memory, and the loader fills them in place (``param.copy_(t)`` under
    ``torch.no_grad()``, or ``load_state_dict`` without ``assign=True``); they never touch the
    device. The loader materialises the other tensors ('cuda' in the placement) on the device,
    then calls :func:`enable_block_swap` with the same ``blocks_to_swap`` / offload options,
    which copies nothing more (tensors the loader replaced instead of filling are copied in).
    Raises BlockSwapError like :func:`enable_block_swap`, host memory check included.
    """
    flags = (bool(offload_txt_emb), bool(offload_img_emb))
    _units(model, blocks_to_swap, *flags)  # validate before touching anything
    state = _get_state(model, device, backend)
    with _rollback(model, state):
        if state.handles:
            state.deactivate()
            model.__dict__.pop("block_swap_stats", None)
        state.plan(operator.index(blocks_to_swap), flags, allow_meta=True)
    return BlockSwapPlan(
        blocks_to_swap=state.blocks_to_swap,
        swapped=tuple(u.name for u in state.swapped),
        placement=swap_placement(model, blocks_to_swap, offload_txt_emb=flags[0], offload_img_emb=flags[1]),
        bytes_pinned=sum(u.host.reserved for u in state.swapped),
        device=state.device,
    )


def enable_block_swap(
    model: nn.Module,
    blocks_to_swap: int,
    *,
    prefetch: int = 1,
    offload_txt_emb: bool = False,
    offload_img_emb: bool = False,
    device: torch.device | str | None = None,
    backend: TransferBackend | None = None,
) -> nn.Module:
    """Keep the last ``blocks_to_swap`` blocks in pinned host memory, stream them in to run.

    Args:
        model: a WanModel (anything with a ``blocks`` nn.ModuleList), on the device, on the CPU,
            or planned with :func:`plan_block_swap`. Apply quantization before this.
        blocks_to_swap: 0 .. num_layers; the last ones are swapped. 0 without offloads is no
            swap at all (any previous swap is disabled).
        prefetch: how many units ahead copies start (0: copy when reached, fully exposed).
        offload_txt_emb / offload_img_emb: also swap ``text_embedding`` / ``img_emb``.
        device: the CUDA device the model runs on (default: where its parameters are).
        backend: a :class:`TransferBackend` to use instead of CUDA (tests: FakeTransferBackend).

    The resident part moves to ``device``. Calling it again with other settings re-plans in
    place (only the units that change sides move). Run the model under
    ``torch.inference_mode()``. Returns the model; ``model.block_swap_stats`` reports.
    """
    flags = (bool(offload_txt_emb), bool(offload_img_emb))
    _units(model, blocks_to_swap, *flags)
    prefetch = _count(prefetch, "prefetch")
    n = operator.index(blocks_to_swap)
    if n == 0 and not any(flags):
        return disable_block_swap(model)
    state = _get_state(model, device, backend)
    with _rollback(model, state):
        if state.handles:
            state.deactivate()
        state.plan(n, flags, allow_meta=False)
        state.move_resident(allow_meta=False)
        state.activate(prefetch)
    model.__dict__["block_swap_stats"] = state.stats
    return model


def disable_block_swap(model: nn.Module) -> nn.Module:
    """Remove block swap: every tensor back on the device (own allocation), no hook left."""
    state = _state(model)
    if state is None:
        return model
    state.deactivate()
    for u in state.swapped:
        state._restore(u)
    state.move_resident(allow_meta=True)
    model.__dict__.pop("_block_swap", None)
    model.__dict__.pop("block_swap_stats", None)
    return model
