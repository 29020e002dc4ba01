"""Where the encoders and the VAE work during a call, for cards smaller than the whole pipeline.

umT5-XXL (11 GB in bf16), CLIP ViT-H (1.3 GB) and wav2vec2 run once per call (CLIP once per
source frame when dubbing); left on the GPU they sit beside the DiT through every step.
:class:`EncoderRunner` is how the pipeline calls them:

* ``offload=True``: each encoder is on the GPU only while it runs (an
  :class:`~wanstudio.encoders.EncoderPlacement` with ``park="free"``: one host copy, pinned,
  is the master; the device copy is dropped after the call). The default whenever the DiT
  swaps blocks or the card has less than ``SMALL_CARD_GIB`` of memory.
* ``text_device="cpu"``: the text encoder always runs on the CPU. ``None`` (the default) runs
  it on the GPU when it fits there *now* (beside the DiT and the VAE, within the budget),
  else on the CPU for that call, with one log line; with ``offload=False`` it simply stays
  where it is.
* The VAE stays on the device (250 MB in bf16); its encode / decode are tiled when the
  untiled working set would not fit what is left of the budget (``vae_budget``).

The budget is ``budget_bytes`` (``vram_budget_gb``) minus what the allocator holds, or the
device's free memory when no budget is given.
"""

from __future__ import annotations

import logging

import torch

from ..encoders import EncoderPlacement
from ..errors import ConfigError, UnknownOptionError
from ..offload.planner import (
    DEFAULT_RESERVE_BYTES,
    ENCODER_ACTIVATION_BYTES,
    GiB,
    free_device_bytes,
    module_bytes,
)
from ..options import EncoderOffload, TextEncoderDevice, VAETilingMode, parse_option

log = logging.getLogger(__name__)

SMALL_CARD_GIB = 48  # the resident pipeline peaked at 35-43.5 GiB at 480p (H200): below this, park


def _named(kind, value, what: str, allowed: str):
    """``value`` as a ``kind`` member's setting (a name) or itself when it is already one."""
    if isinstance(value, str):
        try:
            return parse_option(kind, value).setting
        except UnknownOptionError as e:
            raise ConfigError(f"{what}: {e}") from None
    if value in (True, False, None) and value in {m.setting for m in kind}:
        return value
    raise ConfigError(f"{what} must be {allowed}, got {value!r}")


def check_tiled(value) -> bool | str:
    """``tiled_vae``: True, False, "auto" (or the names "on" / "off")."""
    return _named(VAETilingMode, value, "tiled_vae", "True, False, 'auto', 'on' or 'off'")


def check_offload(value) -> bool | None:
    """``offload_encoders``: None (decide), True, False (or "auto" / "on" / "off")."""
    return _named(EncoderOffload, value, "offload_encoders", "None, True, False, 'auto', 'on' or 'off'")


def swaps_blocks(model) -> bool:
    """Whether the DiT streams blocks from host memory."""
    stats = getattr(model, "block_swap_stats", None)
    modes = getattr(model, "modes", None)
    swapped = getattr(modes, "blocks_to_swap", 0)
    return stats is not None or (isinstance(swapped, int) and swapped > 0)


def is_small_card(device: torch.device | str) -> bool:
    """A CUDA device with less than ``SMALL_CARD_GIB`` of memory."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_properties(device).total_memory < SMALL_CARD_GIB * GiB


def default_offload(device: torch.device | str, swapping: bool) -> bool:
    """``offload_encoders=None``: park the encoders when the DiT swaps blocks (``swapping``) or
    the card is small (never off CUDA: there is no device memory to save)."""
    if torch.device(device).type != "cuda":
        return False
    return bool(swapping) or is_small_card(device)


def dit_budget_gb(device: torch.device | str, budget_gb: float | None, vae, encoders) -> float:
    """What ``blocks_to_swap="auto"`` gives the DiT, in GiB: the pipeline's budget (default: the
    free memory, the VAE already loaded there) less the VAE (when a budget is given) and room
    for the largest of ``encoders`` (CLIP, wav2vec2) with its activations while it runs. The text
    encoder gets no room: it runs on the CPU when it does not fit beside the DiT."""
    device = torch.device(device)
    if budget_gb is None:
        total = free_device_bytes(device) or 0
    else:
        total = int(budget_gb * GiB) - module_bytes(vae.model)
    room = max(module_bytes(e.model) for e in encoders) + ENCODER_ACTIVATION_BYTES
    left = total - room
    if left <= 0:
        raise ConfigError(
            f"a VRAM budget of {total / GiB:.2f} GiB (after the VAE) cannot hold the largest encoder "
            f"while it runs ({room / GiB:.2f} GiB with its activations), let alone the DiT; give a "
            f"larger vram_budget_gb"
        )
    return left / GiB


def memory_report(device: torch.device | str) -> list[str]:
    """What the memory settings do on ``device`` by default (``wanstudio doctor``)."""
    import psutil

    device = torch.device(device)
    host = f"host RAM {psutil.virtual_memory().total / GiB:.1f} GiB"
    if device.type != "cuda" or not torch.cuda.is_available():
        return [
            f"{device}: no CUDA device, so block swap and encoder offload have nothing to save; "
            f"the VAE does not tile by itself ({host})"
        ]
    total = torch.cuda.get_device_properties(device).total_memory
    free = free_device_bytes(device) or 0
    small = total < SMALL_CARD_GIB * GiB
    parked = (
        f"encoders on the GPU only while they run (card < {SMALL_CARD_GIB} GiB)"
        if small
        else f"encoders stay on the GPU unless blocks are swapped (card >= {SMALL_CARD_GIB} GiB)"
    )
    return [
        f"{device}: {total / GiB:.1f} GiB, {free / GiB:.1f} free: --offload-encoders auto keeps the {parked}",
        f"--blocks-to-swap auto plans the DiT for --vram-budget-gb, default the {free / GiB:.1f} GiB free",
        f"{host}; swapped blocks and parked encoders live there (a 480p clip, all 40 blocks swapped, "
        "umT5 in fp8: 32.3 GiB peak RSS on an H200)",
    ]


def check_budget_gb(value) -> float | None:
    """``vram_budget_gb``: None (the free memory) or a finite number of GiB > 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ConfigError(
            f"vram_budget_gb must be None (the device's free memory) or a number of GiB > 0, e.g. "
            f"11 for a 12 GB card, got {value!r}"
        )
    return float(value)


def check_text_device(value) -> str | None:
    """``text_encoder_device``: None / "auto" (the GPU when it fits) or "cpu"."""
    if isinstance(value, torch.device):
        value = str(value)
    return _named(
        TextEncoderDevice,
        value,
        "text_encoder_device",
        "None or 'auto' (the GPU when it fits, else the CPU) or 'cpu'",
    )


class EncoderRunner:
    """Runs the pipeline's encoders on ``device`` as the memory settings say (module docstring).

    Args:
        device: the DiT's device.
        offload: park the encoders on the host between uses.
        text_device: None or 'cpu' (see the module docstring).
        budget_bytes: the device memory the whole call may use (None: the free memory).
        pin: page-locked host copies (CUDA only; faster uploads).
    """

    def __init__(
        self,
        device: torch.device | str,
        *,
        offload: bool,
        text_device: str | None = None,
        budget_bytes: int | None = None,
        pin: bool = True,
    ):
        self.device = torch.device(device)
        self.offload = bool(offload)
        self.text_device = check_text_device(text_device)
        self.budget_bytes = budget_bytes
        self.placement = (
            EncoderPlacement(self.device, park="free", text_device=self.text_device, pin=pin)
            if self.offload
            else None
        )
        self.text_ran_on: str | None = None  # where the last text encode ran

    def describe(self) -> str:
        """One line for summaries."""
        where = "on the GPU only while they run" if self.offload else "resident"
        text = "; text encoder on the CPU" if self.text_device == "cpu" else ""
        budget = f"; budget {self.budget_bytes / GiB:.1f} GiB" if self.budget_bytes else ""
        return f"encoders {where}{text}{budget}"

    def prepare(self, *encoders) -> None:
        """Put each encoder where it waits between calls (the host when offloading; the text
        encoder on the CPU when asked)."""
        from ..encoders.text import TextEncoder

        for encoder in encoders:
            if self.placement is not None:
                self.placement.park(encoder)
            elif self.text_device == "cpu" and isinstance(encoder, TextEncoder):
                encoder.model.to("cpu")

    def left_bytes(self) -> int | None:
        """Device bytes the allocator may still hand out within the budget (None off CUDA)."""
        if self.device.type != "cuda" or not torch.cuda.is_available():
            return None
        if self.budget_bytes is None:
            return free_device_bytes(self.device)
        return self.budget_bytes - torch.cuda.memory_allocated(self.device)

    def vae_budget(self) -> int | None:
        """What the VAE's ``tiled="auto"`` may plan against (None: the VAE's own default)."""
        left = self.left_bytes()
        return None if left is None else max(0, left - DEFAULT_RESERVE_BYTES)

    def vae(self, vae, method: str, x: torch.Tensor, tiled: bool | str) -> torch.Tensor:
        """``vae.encode(x)`` / ``vae.decode(x)`` (``method``), tiled as ``tiled`` says: True,
        False, or "auto" (tiles when the untiled working set would not fit :meth:`vae_budget`;
        never off CUDA)."""
        if tiled == "auto" and self.left_bytes() is None:
            tiled = False
        if tiled is False:
            return getattr(vae, method)(x)
        budget = {"memory_budget_bytes": self.vae_budget()} if tiled == "auto" else {}
        return getattr(vae, method)(x, tiled=tiled, **budget)

    def _text_fits(self, encoder) -> bool:
        left = self.left_bytes()
        if left is None:
            return True
        need = module_bytes(encoder.model) + ENCODER_ACTIVATION_BYTES + DEFAULT_RESERVE_BYTES
        return need <= left

    def run(self, encoder, *args, method: str = "encode", **kwargs):
        """``encoder.<method>(*args, **kwargs)`` where the settings say; tensors of the output are
        moved to the device."""
        from ..encoders.placement import move_output
        from ..encoders.text import TextEncoder

        is_text = isinstance(encoder, TextEncoder)
        if self.placement is None:
            out = getattr(encoder, method)(*args, **kwargs)
            if is_text:
                self.text_ran_on = str(next(encoder.model.parameters()).device)
            return move_output(out, self.device)
        if is_text:
            on_cpu = self.text_device == "cpu" or not self._text_fits(encoder)
            if on_cpu and self.text_device is None:
                log.info(
                    "the text encoder (%.1f GiB) does not fit beside the DiT now; it runs on the CPU",
                    module_bytes(encoder.model) / GiB,
                )
            self.placement.text_device = torch.device("cpu") if on_cpu else None
            self.text_ran_on = "cpu" if on_cpu else str(self.device)
        return self.placement.run(encoder, *args, method=method, **kwargs)
