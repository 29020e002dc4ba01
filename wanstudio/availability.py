"""Whether a mode can run on a device: one small record, made by whoever decides it.

Attention backends, quantization, base precision and block swap each answer "can this run
here?" with an :class:`Availability`. It sits at the bottom of the layers (it imports nothing
of wanstudio) so every layer can make one and the studio's panels can show any of them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Availability:
    """Whether a mode can run on a device, and if not, why.

    Args:
        available: it runs here.
        reason: why it cannot, in full (what is needed, what was found, what to do).
        kernel: what runs when it is available (e.g. ``"FA3 (flash_attn_interface 3.0.0)"``).
        short: the reason at label size, for a dropdown ("not installed", "needs a CUDA GPU",
            "GPU too old (needs sm89+)"); set by whoever decides, never parsed out of ``reason``.
    """

    available: bool
    reason: str = ""
    kernel: str = ""
    short: str = ""

    @classmethod
    def runs(cls, kernel: str = "") -> Availability:
        """Available; ``kernel`` says what runs."""
        return cls(True, "", kernel)

    @classmethod
    def refused(cls, short: str, reason: str = "") -> Availability:
        """Not available: ``short`` for a label, ``reason`` in full (default: ``short``)."""
        return cls(False, reason or short, "", short)

    def __str__(self) -> str:
        return f"available: {self.kernel}" if self.available else f"unavailable: {self.reason}"


def sm(capability: tuple[int, int]) -> str:
    """A CUDA compute capability as its short architecture name: (8, 9) -> 'sm89'."""
    return f"sm{capability[0]}{capability[1]}"


def too_old(min_capability: tuple[int, int]) -> str:
    """The short reason of a GPU below ``min_capability``: 'GPU too old (needs sm89+)'."""
    return f"GPU too old (needs {sm(min_capability)}+)"


NEEDS_CUDA = "needs a CUDA GPU"
