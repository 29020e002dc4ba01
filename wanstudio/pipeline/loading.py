"""Building an InfiniteTalk pipeline: from local weight files, or the seeded tiny preset.

Both take :class:`~wanstudio.modes.RuntimeModes` (``modes=``) and apply them through
:func:`~wanstudio.modes.apply_modes`, the one path from modes to a configured model; the older
keywords (``quantization=``, ``dtype=``, ...) are merged into them by ``RuntimeModes.merge``.
They are bound to :class:`~wanstudio.pipeline.InfiniteTalkPipeline` as the classmethods
``from_files`` and ``tiny`` (``cls`` is that class).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import PipelineError
from ..modes import RuntimeModes, apply_modes
from ..options import AttentionMode, QuantMode
from .memory import check_budget_gb, check_offload, check_text_device, default_offload, dit_budget_gb
from .tiny_weights import load_tiny_trained, tiny_weights_available


def tiny(
    cls,
    seed: int = 0,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    modes: RuntimeModes | None = None,
    frame_num: int = 17,
    size: tuple[int, int] = (64, 64),
    trained: bool | str | os.PathLike | None = None,
):
    """Every part at toy size (the 'tiny-infinitetalk' preset): the trained weights shipped in
    ``wanstudio/assets/tiny`` when there are any, else seeded random weights.

    Exercises every code path in seconds on a CPU; with random weights the video is noise.
    Clips default to ``frame_num`` frames of ``size`` (width, height) instead of 81 frames of
    a 480p bucket, carry 5 frames to the next clip instead of 9, and with the trained weights
    skip the colour match (``color_correction`` 0): it moves each frame's Lab mean and spread to
    the reference's, and on a 64x64 face the opening mouth shifts those enough to make the
    whole picture pulse with it (held-out speech, drawn portrait: pause motion 0.17 of the
    speech's without it, 0.34 with it; benchmarks/results/h200_tiny_training.md, round 4).

    Args:
        seed: the random weights' seed (the caller's random state is left alone); the trained
            weights replace every part's, so it no longer matters there.
        trained: True: the shipped trained weights (CheckpointError when absent); a folder:
            the weights a ``python -m wanstudio.train fit`` wrote there; False: random weights
            (wiring tests); None (default): trained when shipped.
        device: where every part lives.
        modes: how the DiT runs; the model is built at ``modes.precision``, then quantized
            and configured by :func:`~wanstudio.modes.apply_modes`. Default: fp32, nothing else.
        dtype: the base precision as a keyword (wins over ``modes.precision``).
    """
    from ..config import WanConfig
    from ..encoders import VAE, AudioEncoder, ImageEncoder, TextEncoder
    from ..model import WanModel

    if modes is None and dtype is None:
        dtype = torch.float32  # the toy model's default: exact on any CPU
    modes = RuntimeModes.merge(modes, precision=dtype)
    modes.check_device(device)
    if trained is None:
        trained = tiny_weights_available()
    cfg = WanConfig.preset("tiny-infinitetalk")
    with torch.random.fork_rng(devices=[]):  # seeded parts; the caller's RNG is left alone
        torch.manual_seed(seed)
        model = WanModel(cfg).eval().requires_grad_(False)
        parts = (
            VAE.tiny(seed=seed),
            TextEncoder.tiny(text_dim=cfg.text_dim, seed=seed),
            ImageEncoder.tiny(clip_dim=cfg.clip_dim, seed=seed),
            AudioEncoder.tiny(layers=cfg.audio_layers, dim=cfg.audio_dim, seed=seed),
        )
    if trained:
        load_tiny_trained(model, *parts, folder=None if trained is True else trained)
    model.to(device=device, dtype=modes.dtype)
    apply_modes(model, modes, device=device)  # built at base precision, then quantized
    weights = "trained" if trained else f"seed={seed}"
    return cls(
        model,
        *parts,
        identity=f"tiny-infinitetalk({weights}, {str(modes.dtype).replace('torch.', '')})",
        frame_num=frame_num,
        motion_frame=5,
        color_correction=0.0 if trained else 1.0,
        size=tuple(size),
    )


def from_files(
    cls,
    *,
    dit,
    infinitetalk=None,
    vae,
    text_encoder,
    tokenizer=None,
    clip,
    wav2vec,
    modes: RuntimeModes | None = None,
    quantization: QuantMode | str | None = None,
    attention: AttentionMode | str | None = None,
    blocks_to_swap: int | None = None,
    prefetch: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    vae_dtype: torch.dtype | str = torch.float32,
    config=None,
    compile_blocks: bool | None = None,
    strict_layout: bool | None = None,
    loras=None,
    offload_encoders: bool | str | None = None,
    text_encoder_device: str | None = None,
    text_encoder_quantization: str | None = None,
    vram_budget_gb: float | None = None,
):
    """Load every part from local files.

    Args:
        dit: Wan2.1-I2V-14B DiT file(s): shards, their index json or folder, or one file
            (a str / path or a list of them, merged in order).
        infinitetalk: InfiniteTalk's audio weights (``infinitetalk.safetensors``), merged on
            top of ``dit``; None when ``dit`` already holds them.
        vae: ``Wan2.1_VAE.pth`` / safetensors. text_encoder (+ tokenizer): umT5-XXL.
        clip: CLIP ViT-H/14. wav2vec: chinese-wav2vec2-base folder or file.
        modes: a :class:`~wanstudio.modes.RuntimeModes` for the DiT (default bf16, no
            quantization, sdpa); its precision is also the text encoder's and CLIP's dtype.
        loras: LoRA files merged into the DiT while it streams in, before quantization: paths,
            ``(path, strength)`` pairs or :class:`~wanstudio.lora.LoRA` (``RuntimeModes.loras``).
        quantization, attention, blocks_to_swap, prefetch, dtype, compile_blocks, strict_layout:
            the same choices as keywords (``dtype`` is ``RuntimeModes.precision``,
            ``compile_blocks`` is ``compile``); one given wins over ``modes``. Names come from
            ``wanstudio.QUANT_MODES`` / ``ATTENTION_MODES``; ``blocks_to_swap`` DiT blocks stay
            in host memory and stream in (CUDA); ``compile_blocks`` torch.compiles each DiT
            block (on an H200 a 14B forward goes from 3.67 s to 2.92 s in bf16; the first call
            compiles); ``strict_layout`` checks kernel layout contracts in every forward.
        device: default CUDA when available.
        vae_dtype: the VAE's dtype (fp32 as in the reference code).
        config: a WanConfig or preset name; None infers it from the DiT file headers.
        offload_encoders / text_encoder_device: where the encoders wait and run
            (:mod:`wanstudio.pipeline.memory`); parked encoders are loaded into host memory and
            never sit on the GPU all at once. None: park them when blocks are swapped or the
            card has < 48 GiB.
        text_encoder_quantization: e.g. 'fp8_e4m3fn_scaled' stores umT5's block Linears in
            8 bits (11.4 -> 7.7 GB; ``TextEncoder.quantize``).
        vram_budget_gb: the device memory the whole pipeline may use (default: the free
            memory). With ``blocks_to_swap="auto"`` the DiT plans for this budget less the VAE
            and room for the largest of CLIP and wav2vec2 while it runs; the text encoder runs on
            the GPU when it fits beside the DiT, else on the CPU.

    Bad modes fail before any file is read. The DiT's shapes are read from the file headers
    first, and each encoder is checked against them as soon as it is loaded, so mismatched
    parts fail before the DiT loads.
    """
    from ..checkpoints import load_model, parse_dtype, scan_checkpoint
    from ..config import WanConfig
    from ..encoders import VAE, AudioEncoder, ImageEncoder, TextEncoder

    modes = RuntimeModes.merge(
        modes,
        precision=dtype,
        quantization=quantization,
        attention=attention,
        blocks_to_swap=blocks_to_swap,
        prefetch=prefetch,
        compile=compile_blocks,
        strict_layout=strict_layout,
        loras=loras,
    )
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    modes.check_device(device)
    dtype, vae_dtype = modes.dtype, parse_dtype(vae_dtype)
    text_encoder_device = check_text_device(text_encoder_device)
    offload_encoders = check_offload(offload_encoders)
    vram_budget_gb = check_budget_gb(vram_budget_gb)
    if offload_encoders is None:  # decided before loading: parked encoders load to the host
        offload_encoders = default_offload(device, modes.blocks_to_swap != 0)
    enc_device = "cpu" if offload_encoders else device
    text_device = "cpu" if offload_encoders or text_encoder_device == "cpu" else device
    paths = as_list(dit) + ([infinitetalk] if infinitetalk is not None else [])
    if not paths:
        raise PipelineError("dit= needs at least one checkpoint file")

    if config is None:  # headers only: cheap, and every later check can use it
        entries, _ = scan_checkpoint(paths)
        cfg = WanConfig.from_state_dict({k: e.shape for k, e in entries.items()})
    else:
        cfg = WanConfig.preset(config) if isinstance(config, str) else config
    if not (cfg.is_i2v and cfg.audio):
        raise PipelineError(
            f"the DiT files describe a {cfg.model_type} model without InfiniteTalk's audio "
            f"modules; pass the Wan2.1-I2V-14B shards as dit= and infinitetalk.safetensors as "
            f"infinitetalk="
        )
    # small parts first, each checked against the DiT's shapes before the next loads
    audio_enc = AudioEncoder.from_files(wav2vec, device=enc_device, dtype=torch.float32)
    check_components(cfg, audio_encoder=audio_enc)
    image_enc = ImageEncoder.from_files(clip, device=enc_device, dtype=dtype)
    check_components(cfg, image_encoder=image_enc)
    vae_m = VAE.from_files(vae, device=device, dtype=vae_dtype)
    check_components(cfg, vae=vae_m)
    text_enc = TextEncoder.from_files(
        text_encoder,
        tokenizer=tokenizer,
        device=text_device,
        dtype=dtype,
        quantization=text_encoder_quantization,
    )
    check_components(cfg, text_encoder=text_enc)
    if modes.blocks_to_swap == "auto" and device.type == "cuda":
        modes = modes.replace(
            vram_budget_gb=dit_budget_gb(device, vram_budget_gb, vae_m, [image_enc, audio_enc])
        )

    # load_model quantizes tensor by tensor while streaming, reads swapped blocks to pinned
    # host memory (never the GPU), then applies the rest of the modes
    model = load_model(paths, config=cfg, device=device, modes=modes)
    model.eval().requires_grad_(False)
    identity = "dit=" + ",".join(file_id(p) for p in paths)
    return cls(
        model,
        vae_m,
        text_enc,
        image_enc,
        audio_enc,
        identity=identity,
        offload_encoders=offload_encoders,
        text_encoder_device=text_encoder_device,
        vram_budget_gb=vram_budget_gb,
    )


def check_components(cfg, *, vae=None, text_encoder=None, image_encoder=None, audio_encoder=None) -> None:
    """Raise PipelineError when a part does not fit the DiT's shapes (before any heavy work)."""
    problems = []
    if not (cfg.is_i2v and cfg.audio):
        problems.append(
            f"the DiT is a {cfg.model_type} model without audio modules; InfiniteTalk "
            f"needs an i2v model with audio_proj / audio_cross_attn weights"
        )
    if text_encoder is not None and text_encoder.text_dim != cfg.text_dim:
        problems.append(f"text encoder width {text_encoder.text_dim} != DiT text_dim {cfg.text_dim}")
    if image_encoder is not None and image_encoder.clip_dim != cfg.clip_dim:
        problems.append(f"image encoder width {image_encoder.clip_dim} != DiT clip_dim {cfg.clip_dim}")
    if audio_encoder is not None and (audio_encoder.layers, audio_encoder.dim) != (
        cfg.audio_layers,
        cfg.audio_dim,
    ):
        problems.append(
            f"audio encoder gives {audio_encoder.layers} layers x {audio_encoder.dim}, "
            f"the DiT's audio_proj expects {cfg.audio_layers} x {cfg.audio_dim}"
        )
    if vae is not None:
        if vae.z_dim != cfg.out_dim:
            problems.append(f"VAE latent channels {vae.z_dim} != DiT out_dim {cfg.out_dim}")
        if cfg.is_i2v and cfg.cond_dim != vae.z_dim + vae.temporal_stride:
            problems.append(
                f"DiT condition channels {cfg.cond_dim} != VAE mask + latents "
                f"{vae.temporal_stride} + {vae.z_dim}"
            )
        if cfg.audio and vae.temporal_stride != cfg.vae_scale:
            problems.append(f"VAE temporal stride {vae.temporal_stride} != DiT vae_scale {cfg.vae_scale}")
    if problems:
        raise PipelineError("the parts of this pipeline do not fit together: " + "; ".join(problems))


def as_list(paths) -> list:
    """One path or many -> a list (None -> [])."""
    if paths is None:
        return []
    if isinstance(paths, (str, os.PathLike)):
        return [paths]
    return list(paths)


def file_id(path) -> str:
    """A weight file's name and size (a folder: its name), for the pipeline's identity."""
    p = Path(path)
    try:
        return f"{p.name}:{p.stat().st_size}" if p.is_file() else p.name
    except OSError:
        return p.name
