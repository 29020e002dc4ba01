"""The tiny preset's trained weights: where they live, how to save and load them.

``wanstudio/assets/tiny/`` holds three files (with ``PROVENANCE.md``):

* ``dit.safetensors`` — the tiny InfiniteTalk DiT (official key names).
* ``vae.safetensors`` — the tiny Wan VAE (diffusers keys) plus ``latents_mean`` /
  ``latents_std``, the per-channel statistics of its latents on the training faces (they
  replace the real Wan VAE's constants, which do not fit a retrained VAE).
* ``encoders.safetensors`` — the tiny umT5 / CLIP / wav2vec2 (``text.``, ``image.``,
  ``audio.`` prefixes): seeded random weights, never trained, stored so that a different
  transformers version cannot silently re-initialise them differently.

This module needs only torch and safetensors.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..atomic import atomic_write
from ..errors import CheckpointError

TINY_WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "tiny"
DIT_FILE, VAE_FILE, ENCODERS_FILE = "dit.safetensors", "vae.safetensors", "encoders.safetensors"
WEIGHT_FILES = (DIT_FILE, VAE_FILE, ENCODERS_FILE)
_LATENT_STATS = ("latents_mean", "latents_std")


def tiny_weights_available(folder: str | Path | None = None) -> bool:
    """Whether ``folder`` (default ``wanstudio/assets/tiny``) holds all three weight files."""
    folder = Path(folder) if folder is not None else TINY_WEIGHTS
    return all((folder / name).is_file() for name in WEIGHT_FILES)


def tiny_weights_note() -> str:
    """What the tiny preset's weights are, for a summary line."""
    if tiny_weights_available():
        return "DiT and VAE trained in this repository on drawn faces"
    return "random weights: the video is noise"


def load_tiny_trained(
    model, vae, text_encoder, image_encoder, audio_encoder, folder: str | Path | None = None
) -> None:
    """Load the trained tiny weights into freshly built tiny parts, in place.

    Args:
        model: ``WanModel(WanConfig.preset("tiny-infinitetalk"))`` (any device / dtype).
        vae, text_encoder, image_encoder, audio_encoder: the ``.tiny()`` adapters of
            ``wanstudio.encoders`` at the preset's widths.
        folder: where the three files are (default ``wanstudio/assets/tiny``).

    Raises CheckpointError when a file is missing or does not fit the parts (strict: every
    tensor present, same shapes).
    """
    folder = Path(folder) if folder is not None else TINY_WEIGHTS
    if not tiny_weights_available(folder):
        missing = [n for n in WEIGHT_FILES if not (folder / n).is_file()]
        raise CheckpointError(
            f"no trained tiny weights in {folder} (missing {', '.join(missing)}): train them with "
            f"`python -m wanstudio.train fit` and copy its weight files there, or use the "
            f"random-weight preset (trained=False)"
        )
    load_tiny_dit(model, folder / DIT_FILE)
    load_tiny_vae(vae, folder / VAE_FILE)
    enc = _read(folder / ENCODERS_FILE)
    for prefix, part in (("text", text_encoder), ("image", image_encoder), ("audio", audio_encoder)):
        sub = {k[len(prefix) + 1 :]: v for k, v in enc.items() if k.startswith(prefix + ".")}
        _load_into(part.model, sub, f"the tiny {prefix} encoder", folder / ENCODERS_FILE)


def load_tiny_dit(model, path: Path) -> None:
    """Load a trained tiny DiT file into ``WanModel(WanConfig.preset("tiny-infinitetalk"))``."""
    _load_into(model, _read(path), "the tiny DiT", path)


def load_tiny_vae(vae, path: Path) -> None:
    """Load a trained tiny VAE file (weights + latent statistics) into the ``VAE.tiny()`` adapter."""
    state = _read(path)
    stats = {k: state.pop(k) for k in _LATENT_STATS if k in state}
    if len(stats) != 2:
        raise CheckpointError(f"{path} lacks latents_mean / latents_std; re-export the VAE")
    _load_into(vae.model, state, "the tiny VAE", path)
    set_latent_stats(vae, stats["latents_mean"], stats["latents_std"])


def set_latent_stats(vae, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Give the VAE adapter (and its diffusers config) new per-channel latent mean / std."""
    mean, std = mean.float().flatten(), std.float().flatten()
    device = vae.latents_mean.device
    vae.latents_mean = mean.view(1, -1, 1, 1, 1).to(device)
    vae.latents_std = std.view(1, -1, 1, 1, 1).to(device)
    vae.model.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())


def save_tiny_trained(
    folder: str | Path, model, vae, text_encoder, image_encoder, audio_encoder
) -> list[Path]:
    """Write the three weight files (fp32, atomically) to ``folder``; returns their paths."""
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vae_state = _cpu(vae.model.state_dict())
    vae_state["latents_mean"] = vae.latents_mean.flatten().float().cpu()
    vae_state["latents_std"] = vae.latents_std.flatten().float().cpu()
    enc = {}
    for prefix, part in (("text", text_encoder), ("image", image_encoder), ("audio", audio_encoder)):
        enc.update({f"{prefix}.{k}": v for k, v in _cpu(part.model.state_dict()).items()})
    out = []
    for name, state in ((DIT_FILE, _cpu(model.state_dict())), (VAE_FILE, vae_state), (ENCODERS_FILE, enc)):
        data = save(state, metadata={"format": "pt", "what": f"wanstudio tiny-infinitetalk {name}"})
        atomic_write(folder / name, lambda f, data=data: f.write(data))
        out.append(folder / name)
    return out


def _cpu(state: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().contiguous().clone() for k, v in state.items()}


def _read(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"cannot read {path}: {e}. Copy the file again from the training output") from e


def _load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, path: Path) -> None:
    own = module.state_dict()
    params = {name for name, _ in module.named_parameters()}
    # computed buffers (e.g. position ids) may be absent from a file; parameters may not
    missing = sorted(k for k in set(own) - set(state) if k in params)
    extra = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or extra or wrong:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", extra), ("other shape", wrong))
            if keys
        )
        raise CheckpointError(
            f"{path} does not fit {what} ({detail}); the file was trained for another tiny "
            f"preset: retrain or use the random-weight preset"
        )
    with torch.no_grad():
        for k, v in own.items():
            if k in state:
                v.copy_(state[k].to(v.dtype))
