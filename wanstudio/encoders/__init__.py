"""The models around the DiT: umT5 text, CLIP image and wav2vec2 audio encoders, and the VAE.

Each wraps the transformers / diffusers class, loads users' files offline (official Wan key
layouts are converted), and has a ``tiny()`` preset with seeded random weights.
"""

from .audio import AudioEncoder, audio_windows
from .clip import ImageEncoder
from .text import TextEncoder
from .vae import VAE

__all__ = ["VAE", "AudioEncoder", "ImageEncoder", "TextEncoder", "audio_windows"]
