"""The models around the DiT: umT5 text, CLIP image and wav2vec2 audio encoders, and the VAE.

Each wraps the transformers / diffusers class, loads users' files offline (official Wan key
layouts are converted), and has a ``tiny()`` preset with seeded random weights.
"""

from .audio import AudioEncoder, audio_windows
from .clip import ImageEncoder
from .placement import EncoderPlacement, PlacementEvent, on_device
from .text import TextEncoder
from .vae import VAE
from .vae_tiling import VAETiling

__all__ = [
    "VAE",
    "AudioEncoder",
    "EncoderPlacement",
    "ImageEncoder",
    "PlacementEvent",
    "TextEncoder",
    "VAETiling",
    "audio_windows",
    "on_device",
]
