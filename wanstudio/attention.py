"""Attention dispatch: one call site for the model, one backend per AttentionMode.

The model calls only :func:`attention` with q, k, v in its native [B, L, H, D] layout and the
``attention_mode`` of the calling module. Each backend (``attention_backends/``) declares what
it needs (device, compute capability, dtypes, head dims) and a layout contract, and converts
to its own layout inside its wrapper. Meanings and measured facts: ``docs/MODES.md``.

* :func:`available_attention_modes` says, per device, which modes run and why the others do
  not (package missing, built for another torch, GPU architecture). Where importing is not
  proof, a tiny real call decides. Results are cached per device.
* :func:`set_attention` sets the mode on every attending module (or those of some blocks);
  an unavailable mode raises :class:`BackendUnavailableError` unless ``fallback=`` is given,
  in which case it warns once and uses the fallback.
* The hot path is a dict lookup, the cached kernel, and the contract check: no probing.
* A kernel may declare shapes outside its domain (sageattention 1.x miscounts a short
  partial block of keys: image and audio tokens). Those calls run SDPA, with one warning,
  counted by :func:`rerouted_attention_calls`.
* SDPA on CUDA tries its kernels in a measured order (cuDNN first on Hopper for fp16/bf16,
  head dim <= 128); :func:`sdpa_kernel_choice` says which kernel a call will use.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable

import torch
from torch import nn

from .attention_backends import registry, sdpa
from .attention_backends.base import normalize_device
from .availability import Availability
from .errors import BackendUnavailableError, ConfigError
from .layout import layout_name
from .options import AttentionMode, parse_option

__all__ = [
    "Availability",
    "attention",
    "available_attention_modes",
    "clear_attention_cache",
    "model_attention_modes",
    "rerouted_attention_calls",
    "sdpa_kernel_choice",
    "set_attention",
]

BACKENDS = registry.BACKENDS

# (where, mode) -> calls that ran SDPA because their shape is outside the kernel's domain
REROUTED: Counter = Counter()
_WARNED_REROUTE: set[tuple[str, str]] = set()  # (mode, rule)
_WARNED_FALLBACK: set[tuple[AttentionMode, AttentionMode, str]] = set()  # (mode, fallback, reason)


@torch.compiler.disable  # a kernel wrapper: dispatch and contract checks stay eager (fusion.py)
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mode: AttentionMode | str = AttentionMode.SDPA,
    where: str | nn.Module = "attention",
) -> torch.Tensor:
    """Softmax attention with scale D^-0.5, no mask.

    Args:
        q: [B, Lq, H, D]; k, v: [B, Lk, H, D] (the model's layout; views are fine).
        mode: an :class:`AttentionMode` (or its name).
        where: the calling module (or its name), for layout errors and warnings. Modules pass
            themselves, not ``layout_name(self)``: a per-block string read inside a compiled
            block would make torch.compile specialise (and recompile) for every block.

    Returns:
        [B, Lq, H, D] (possibly a transposed view of the kernel's output).
    """
    if not isinstance(where, str):
        where = layout_name(where)
    backend = BACKENDS.get(mode)
    if backend is None:
        backend = BACKENDS[parse_option(AttentionMode, mode)]
    kernel = backend.kernels.get(q.device) or registry.kernel_for(backend, q.device, where)
    needs = backend.needs
    if needs.head_dims is not None or needs.max_head_dim is not None:
        problem = needs.head_dim_problem(q.shape[-1])
        if problem:
            raise BackendUnavailableError(f"{where}: attention mode {backend.name!r}: {problem}")
    checked = backend.contract.enforce(where, q=q, k=k, v=v)
    q, k, v = checked["q"], checked["k"], checked["v"]
    if kernel.key_block and -k.shape[1] % kernel.key_block > kernel.max_key_padding * k.shape[1]:
        return _reroute(backend.name, kernel.key_rule, q, k, v, where)
    if k.shape[1] < kernel.sdpa_below_keys:  # a speed choice, not a correctness one: no warning
        return attention(q, k, v, mode=AttentionMode.SDPA, where=where)
    return kernel.run(q, k, v)


def _reroute(name: str, rule: str, q, k, v, where: str) -> torch.Tensor:
    """Run SDPA for a call whose shape the chosen kernel cannot compute correctly."""
    REROUTED[(where, name)] += 1
    if (name, rule) not in _WARNED_REROUTE:
        _WARNED_REROUTE.add((name, rule))
        warnings.warn(
            f"attention mode {name!r}: {rule}. Such calls run SDPA instead (first: "
            f"{k.shape[1]} keys at {where}; see wanstudio.attention.rerouted_attention_calls())",
            stacklevel=3,
        )
    return attention(q, k, v, mode=AttentionMode.SDPA, where=where)


def rerouted_attention_calls() -> dict[tuple[str, str], int]:
    """(module, mode) -> how many calls ran SDPA because their shape was outside the kernel's."""
    return dict(REROUTED)


# --- availability ----------------------------------------------------------------------------
def available_attention_modes(
    device: torch.device | str | int | None = None,
) -> dict[AttentionMode, Availability]:
    """For every mode: can it run on ``device`` (default: the current CUDA device, else CPU)?

    Each :class:`Availability` has ``available``, ``reason`` (why not) and ``kernel`` (what
    runs). Probed once per device (imports, and a tiny real call where importing is not proof).
    """
    device = normalize_device(device)
    return {mode: registry.availability(mode, device) for mode in AttentionMode}


def clear_attention_cache() -> None:
    """Forget probe results, loaded kernels, reroute counts and which warnings were given
    (e.g. after installing a package)."""
    registry.clear()
    REROUTED.clear()
    _WARNED_REROUTE.clear()
    _WARNED_FALLBACK.clear()


def sdpa_kernel_choice(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """Which SDPA kernel ('cudnn', 'flash', 'efficient', 'math') the ``sdpa`` mode will use
    for these [B, L, H, D] tensors, under our measured preference order."""
    return sdpa.kernel_choice(q, k, v)


# --- setting the mode on a model -------------------------------------------------------------
def set_attention(
    model: nn.Module,
    mode: AttentionMode | str,
    *,
    fallback: AttentionMode | str | None = None,
    blocks: Iterable[int] | None = None,
) -> nn.Module:
    """Use attention ``mode`` in every attending module of ``model`` (in place; returns it).

    Args:
        model: a WanModel (or any module whose attending submodules carry ``attention_mode``).
        mode: the attention mode.
        fallback: a mode to use instead when ``mode`` cannot run here (warns once per mode and
            reason). Without it, an unavailable mode raises :class:`BackendUnavailableError`
            naming the reason and the modes that work.
        blocks: only these block indices (negative counts from the end), e.g. ``[0, -1]`` for
            a different backend in the first and last blocks. None: all.

    The check covers the model's device, compute dtype and head dims.
    """
    mode = parse_option(AttentionMode, mode)
    modules = _attending_modules(model, blocks)
    device, dtype, head_dims = _target(model, modules)
    reason = _why_not(mode, device, dtype, head_dims)
    if reason:
        working = [m.value for m in AttentionMode if not _why_not(m, device, dtype, head_dims)]
        if fallback is None:
            raise BackendUnavailableError(
                f"attention mode {mode.value!r} cannot run here: {reason}. "
                f"Modes that work here: {', '.join(working) or 'none'}. "
                "Pass fallback='sdpa' to use SDPA instead."
            )
        chosen = parse_option(AttentionMode, fallback)
        fallback_reason = _why_not(chosen, device, dtype, head_dims)
        if fallback_reason:
            raise BackendUnavailableError(
                f"attention mode {mode.value!r} cannot run here ({reason}), nor can its "
                f"fallback {chosen.value!r} ({fallback_reason}). "
                f"Modes that work here: {', '.join(working) or 'none'}."
            )
        key = (mode, chosen, reason)
        if key not in _WARNED_FALLBACK:
            _WARNED_FALLBACK.add(key)
            warnings.warn(
                f"attention mode {mode.value!r} cannot run here ({reason}); using {chosen.value!r} instead",
                stacklevel=2,
            )
        mode = chosen
    for _, module in modules:
        module.attention_mode = mode
    return model


def model_attention_modes(model: nn.Module) -> dict[str, AttentionMode]:
    """Qualified module name -> attention mode, for every attending module."""
    return {name: m.attention_mode for name, m in _attending_modules(model, None)}


def _why_not(mode: AttentionMode, device: torch.device, dtype, head_dims) -> str:
    """'' if ``mode`` can run the model's attention on ``device``, else the reason."""
    found = registry.availability(mode, device)
    if not found.available:
        return found.reason
    needs = BACKENDS[mode].needs
    if dtype is not None and needs.dtype_problem(dtype):
        return f"{needs.dtype_problem(dtype)}; the model computes in {str(dtype).replace('torch.', '')}"
    for d in sorted(head_dims):
        if needs.head_dim_problem(d):
            return f"{needs.head_dim_problem(d)}; the model's heads have {d} dims"
    return ""


def _attending_modules(model: nn.Module, blocks: Iterable[int] | None) -> list[tuple[str, nn.Module]]:
    found = [(n, m) for n, m in model.named_modules() if hasattr(m, "attention_mode")]
    if blocks is None:
        if not found:
            raise ConfigError(f"{type(model).__name__} has no attending modules (attention_mode)")
        return found
    count = len(getattr(model, "blocks", ()))
    if not count:
        raise ConfigError(f"blocks= needs a model with .blocks; {type(model).__name__} has none")
    wanted = set()
    for i in blocks:
        if not -count <= i < count:
            raise ConfigError(f"block index {i} is out of range: the model has {count} blocks")
        wanted.add(str(i % count))
    chosen = [
        (n, m)
        for n, m in found
        if n.split(".")[:1] == ["blocks"] and n.split(".")[1:2] and n.split(".")[1] in wanted
    ]
    if not chosen:
        raise ConfigError(f"blocks {sorted(int(w) for w in wanted)} hold no attending modules")
    return chosen


def _target(model: nn.Module, modules) -> tuple[torch.device, torch.dtype | None, set[int]]:
    """Device, compute dtype and head dims the modules will attend with."""
    params = [p for _, m in modules for p in m.parameters()] or list(model.parameters())
    device = getattr(model, "device", None)  # WanModel: where it computes, even with block swap
    if not isinstance(device, torch.device) or device.type == "meta":
        device = next((p.device for p in params if p.device.type != "meta"), None)
    dtype = getattr(model, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        dtype = next((p.dtype for p in params if p.dtype.is_floating_point and p.element_size() >= 2), None)
    head_dims = {m.head_dim for _, m in modules if isinstance(getattr(m, "head_dim", None), int)}
    return normalize_device(device), dtype, head_dims
