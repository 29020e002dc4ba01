"""Dropdown choices, generated from the registry in ``options.py``, labelled with availability.

Every dropdown of the studio gets its options here, so a mode the registry adds appears in
every panel, and a mode that cannot run on this machine says why in its label
("sageattn — needs a CUDA GPU") instead of failing after a long load. Values are always the
registry's strings; labels are for people.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .. import options
from ..availability import Availability
from ..options import (
    AttentionMode,
    BasePrecision,
    CacheMode,
    EncoderOffload,
    GenerationPreset,
    Option,
    QuantMode,
    Scheduler,
    SizeClass,
    SpeakerMix,
    TextEncoderDevice,
    VAETilingMode,
)
from ..studio import attention_availability, precision_availability, quant_availability

SEP = " — "  # between a mode name and the reason it cannot run
MAX_REASON = 48  # the longest ``Availability.short`` a label should carry (the full reason sits below)

# The registries that become dropdowns, in the order the docs list them.
REGISTRIES: dict[str, type[Option]] = {
    "Quantization (`quantization=`)": QuantMode,
    "Attention (`attention=`)": AttentionMode,
    "Base precision (`dtype=`)": BasePrecision,
    "Sampler (`scheduler=`)": Scheduler,
    "Generation preset (`--preset`, the generate panel)": GenerationPreset,
    "Size class (`size_class=`)": SizeClass,
    "Two speakers (`speaker_mix=`)": SpeakerMix,
    "Step cache (`cache=`)": CacheMode,
    "Encoder offload (`offload_encoders=`, `--offload-encoders`)": EncoderOffload,
    "Text encoder device (`text_encoder_device=`, `--text-encoder-device`)": TextEncoderDevice,
    "Tiled VAE (`tiled_vae=`, `--tiled-vae`)": VAETilingMode,
}


def label(member: Option, status: Availability | None = None) -> str:
    """The mode's name, and when it cannot run here, the short reason its checker gave."""
    if status is None or status.available:
        return member.value
    return f"{member.value}{SEP}{status.short or 'not available here'}"


def choices(
    kind: type[Option], statuses: Mapping[Option, Availability] | None = None
) -> list[tuple[str, str]]:
    """(label, value) pairs for an ipywidgets Dropdown, in registry order."""
    statuses = statuses or {}
    return [(label(m, statuses.get(m)), m.value) for m in kind]


def quant_choices(device: torch.device | str = "cpu") -> list[tuple[str, str]]:
    """(label, value) Dropdown options of QuantMode; labels say why a mode cannot run on ``device``."""
    return choices(QuantMode, quant_availability(device))


def attention_choices(device: torch.device | str = "cpu") -> list[tuple[str, str]]:
    """(label, value) Dropdown options of AttentionMode; labels say why a mode cannot run on ``device``."""
    return choices(AttentionMode, attention_availability(device))


def precision_choices(device: torch.device | str = "cpu") -> list[tuple[str, str]]:
    """(label, value) Dropdown options of BasePrecision; labels say why one cannot run on ``device``."""
    return choices(BasePrecision, precision_availability(device))


def scheduler_choices() -> list[tuple[str, str]]:
    """(label, value) Dropdown options of Scheduler."""
    return choices(Scheduler)


def size_class_choices() -> list[tuple[str, str]]:
    """(label, value) Dropdown options of SizeClass, labelled '480p' / '720p'."""
    return [(f"{m.value}p", m.value) for m in SizeClass]


def speaker_mix_choices() -> list[tuple[str, str]]:
    """(label, value) Dropdown options of SpeakerMix, labelled with their descriptions."""
    return [(f"{m.value}: {m.description}", m.value) for m in SpeakerMix]


def device_choices() -> list[tuple[str, str]]:
    """The CPU and every visible CUDA device, named."""
    out = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            out.append((f"cuda:{i} ({torch.cuda.get_device_name(i)})", f"cuda:{i}"))
    out.append(("cpu", "cpu"))
    return out


def options_markdown(level: int = 3) -> str:
    """Every registry as a Markdown table under its own heading: the README's options section.

    ``tests/test_widgets.py`` checks that README.md contains exactly this text, so the README
    and the registry cannot drift apart.
    """
    hashes = "#" * level
    parts = []
    for title, kind in REGISTRIES.items():
        parts.append(f"{hashes} {title}\n\n{options.options_table(kind)}\n")
    return "\n".join(parts)
