"""Three frames of `wanstudio demo` for the README (docs/demo_frames.png), and its scores.

Runs the tiny preset exactly as `wanstudio demo` does (shipped weights, portrait, speech and
prompt, 8 steps, seed 42) and saves the middle of its longest pause and two loud frames side by
side, each 4x upscaled (nearest) with the speech's loudness as a bar under it.

    python benchmarks/tiny_demo_frames.py docs/demo_frames.png
"""

from __future__ import annotations

import sys

import numpy as np
from PIL import Image

from wanstudio import eval as scores
from wanstudio.atomic import atomic_write
from wanstudio.cli import DEMO_PROMPT
from wanstudio.media import asset_path, load_audio, load_image
from wanstudio.pipeline import InfiniteTalkPipeline


def main(path: str) -> None:
    image, wave = load_image(asset_path("portrait.png")), load_audio(asset_path("speech.wav"))
    pipe = InfiniteTalkPipeline.tiny(seed=0)
    frames = pipe(
        image, wave, prompt=DEMO_PROMPT, steps=8, seed=42, progress=False
    ).frames.numpy()  # (T, 64, 64, 3)
    env = scores.loudness_envelope(wave, frames=len(frames))
    silent = np.flatnonzero(env < 0.05)
    runs = np.split(silent, np.flatnonzero(np.diff(silent) > 1) + 1)
    quiet = int(np.median(max(runs, key=len)))  # the middle of the longest pause
    loud = [int(i) for i in np.argsort(-env[5:]) + 5 if abs(i - quiet) > 10]
    picked = sorted([quiet, loud[0], next(i for i in loud if abs(i - loud[0]) > 10)])
    tiles = []
    for i in picked:
        tile = np.repeat(np.repeat(frames[i], 4, 0), 4, 1)
        bar = np.full((10, tile.shape[1], 3), 24, np.uint8)
        bar[2:8, : int(round(env[i] * tile.shape[1]))] = (240, 190, 40)
        tiles += [np.concatenate([tile, bar]), np.full((tile.shape[0] + 10, 6, 3), 255, np.uint8)]
    strip = Image.fromarray(np.concatenate(tiles[:-1], 1))
    atomic_write(path, lambda f: strip.save(f, format="PNG"))
    print(f"frames {picked} (loudness {[round(float(env[i]), 2) for i in picked]}) -> {path}")
    print(f"{pipe!r}: {scores.describe(frames, wave, image)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/demo_frames.png")
