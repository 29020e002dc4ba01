"""Weight layouts: recognise which model a state dict belongs to, and rename official keys to
the transformers / diffusers names.

Official names come from the public Wan2.1 code (``wan/modules/t5.py``, ``clip.py``,
``vae.py``); the Wan VAE conversion is diffusers' own (``convert_wan_vae_to_diffusers``).
Converters only rename and reshape; a key they do not know passes through unchanged, so
``weights.load_into`` reports it as unexpected.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

from ..errors import CheckpointError

StateDict = dict[str, torch.Tensor]

# What each component is called in messages, and who loads it.
COMPONENTS: dict[str, tuple[str, str]] = {
    "text": ("a umT5 text encoder", "TextEncoder.from_files"),
    "image": ("a CLIP ViT-H/14 image encoder", "ImageEncoder.from_files"),
    "audio": ("a wav2vec2 audio encoder", "AudioEncoder.from_files"),
    "vae": ("a Wan VAE", "VAE.from_files"),
    "dit": ("a Wan DiT / InfiniteTalk checkpoint", "wanstudio.load_model"),
    "lora": ("a LoRA", "a LoRA loader (it patches a DiT; it is not a model)"),
}


def umt5_official_to_hf(state: Mapping[str, torch.Tensor]) -> StateDict:
    """``models_t5_umt5-xxl-enc-bf16.pth`` keys -> ``UMT5EncoderModel`` keys.

    Official block i: ``norm1``, ``attn.{q,k,v,o}``, ``pos_embedding.embedding`` (one relative
    bias per block in umT5), ``norm2``, ``ffn.gate.0`` (the GELU branch), ``ffn.fc1`` (the
    linear branch), ``ffn.fc2``. The token embedding feeds both HF names (they are tied).
    """
    block = {
        "norm1.weight": "layer.0.layer_norm.weight",
        "attn.q.weight": "layer.0.SelfAttention.q.weight",
        "attn.k.weight": "layer.0.SelfAttention.k.weight",
        "attn.v.weight": "layer.0.SelfAttention.v.weight",
        "attn.o.weight": "layer.0.SelfAttention.o.weight",
        "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
        "norm2.weight": "layer.1.layer_norm.weight",
        "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
        "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
        "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
    }
    out: StateDict = {}
    for key, tensor in state.items():
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if key == "token_embedding.weight":
            out["shared.weight"] = out["encoder.embed_tokens.weight"] = tensor
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = tensor
        elif match and match[2] in block:
            out[f"encoder.block.{match[1]}.{block[match[2]]}"] = tensor
        else:
            out[key] = tensor
    return out


def umt5_hf_encoder(state: Mapping[str, torch.Tensor]) -> StateDict:
    """HF umT5 (encoder-only or full encoder-decoder) -> ``UMT5EncoderModel`` keys."""
    out = {k: v for k, v in state.items() if k.startswith("encoder.") or k == "shared.weight"}
    embedding = out.get("shared.weight", out.get("encoder.embed_tokens.weight"))
    if embedding is not None:
        out["shared.weight"] = out["encoder.embed_tokens.weight"] = embedding
    return out


def open_clip_visual_to_hf(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Visual tower of the open-clip file (keys below ``visual.``) -> ``CLIPVisionModel`` keys.

    ``attn.to_qkv`` [3D, D] holds q, k, v stacked in that order (the official forward views it
    as (3, heads, head_dim)); ``cls_embedding`` [1, 1, D] and ``pos_embedding`` [1, N, D] lose
    their batch dims. ``head`` projects to the joint text-image space, which Wan never uses.
    """
    layer = {
        "norm1": "layer_norm1",
        "norm2": "layer_norm2",
        "attn.proj": "self_attn.out_proj",
        "mlp.0": "mlp.fc1",
        "mlp.2": "mlp.fc2",
    }
    top = {
        "patch_embedding.weight": "embeddings.patch_embedding.weight",
        "pre_norm.weight": "pre_layrnorm.weight",
        "pre_norm.bias": "pre_layrnorm.bias",
        "post_norm.weight": "post_layernorm.weight",
        "post_norm.bias": "post_layernorm.bias",
    }
    out: StateDict = {}
    for key, tensor in state.items():
        match = re.fullmatch(r"transformer\.(\d+)\.(.+)\.(weight|bias)", key)
        if key == "cls_embedding":
            out["embeddings.class_embedding"] = tensor.reshape(-1)  # (1, 1, D) -> (D,)
        elif key == "pos_embedding":
            out["embeddings.position_embedding.weight"] = tensor.reshape(
                tensor.shape[-2:]
            )  # (1, N, D) -> (N, D)
        elif key in top:
            out[top[key]] = tensor
        elif key == "head":
            continue
        elif match and match[2] == "attn.to_qkv":
            prefix = f"encoder.layers.{match[1]}.self_attn"
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                out[f"{prefix}.{name}.{match[3]}"] = part  # (3D, ...) -> 3 x (D, ...)
        elif match and match[2] in layer:
            out[f"encoder.layers.{match[1]}.{layer[match[2]]}.{match[3]}"] = tensor
        else:
            out[key] = tensor
    return out


def hf_clip_vision(state: Mapping[str, torch.Tensor]) -> StateDict:
    """HF CLIP vision tower (keys below ``vision_model.``) -> ``CLIPVisionModel`` keys.

    Older checkpoints store ``embeddings.position_ids``, now a computed buffer: dropped.
    """
    return {k: v for k, v in state.items() if not k.endswith("position_ids")}


def wav2vec2_to_hf(state: Mapping[str, torch.Tensor]) -> StateDict:
    """A wav2vec2 backbone (keys below ``wav2vec2.`` in pre-training checkpoints) -> ``Wav2Vec2Model``.

    The positional conv's weight norm is stored as ``weight_g`` / ``weight_v`` in older files and
    as parametrizations in newer ones. ``masked_spec_embed`` only serves training-time masking,
    which wanstudio's inference configs switch off.
    """
    renames = {
        "pos_conv_embed.conv.weight_g": "pos_conv_embed.conv.parametrizations.weight.original0",
        "pos_conv_embed.conv.weight_v": "pos_conv_embed.conv.parametrizations.weight.original1",
    }
    out: StateDict = {}
    for key, tensor in state.items():
        if key == "masked_spec_embed":
            continue
        for old, new in renames.items():
            key = key.replace(old, new)
        out[key] = tensor
    return out


def identity(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Keys already carry the transformers / diffusers names."""
    return dict(state)


@dataclass(frozen=True)
class Layout:
    """A weight layout, recognised by a marker key relative to the component's root."""

    component: str  # a key of COMPONENTS
    description: str
    marker: str  # matches a key equal to it or ending in "." + marker; the rest is a prefix
    convert: Callable[[Mapping[str, torch.Tensor]], StateDict] | None = None  # -> HF / diffusers


# Most specific first: the open-clip file also holds XLM-RoBERTa keys (textual.blocks.N.attn.q).
LAYOUTS: tuple[Layout, ...] = (
    Layout("lora", "a LoRA (low-rank adapter)", "lora_down.weight"),
    Layout("lora", "a LoRA (low-rank adapter)", "lora_A.weight"),
    Layout(
        "image",
        "the official Wan open-clip XLM-RoBERTa ViT-H/14 file",
        "transformer.0.attn.to_qkv.weight",
        open_clip_visual_to_hf,
    ),
    Layout("image", "a transformers CLIP vision tower", "embeddings.patch_embedding.weight", hf_clip_vision),
    Layout(
        "text",
        "the official Wan umT5-XXL encoder file",
        "blocks.0.pos_embedding.embedding.weight",
        umt5_official_to_hf,
    ),
    Layout(
        "text",
        "a transformers umT5 encoder",
        "encoder.block.0.layer.1.DenseReluDense.wi_0.weight",
        umt5_hf_encoder,
    ),
    Layout(
        "audio",
        "a transformers wav2vec2 model",
        "feature_extractor.conv_layers.0.conv.weight",
        wav2vec2_to_hf,
    ),
    Layout(
        "vae",
        "the official Wan2.1 VAE (Wan2.1_VAE.pth layout)",
        "decoder.middle.0.residual.0.gamma",
        convert_wan_vae_to_diffusers,
    ),
    Layout("vae", "a diffusers AutoencoderKLWan", "decoder.mid_block.resnets.0.norm1.gamma", identity),
    Layout("dit", "an InfiniteTalk audio-module file", "audio_proj.proj1.weight"),
    Layout("dit", "a Wan2.1 DiT (official names)", "head.modulation"),
    Layout("dit", "a Wan2.1 DiT (diffusers names)", "condition_embedder.time_embedder.linear_1.weight"),
)


def detect_layout(keys) -> tuple[Layout, str, str] | None:
    """(layout, prefix, the key that matched) of the first layout whose marker is present."""
    keys = list(keys)
    for layout in LAYOUTS:
        for key in keys:
            if key == layout.marker or key.endswith("." + layout.marker):
                return layout, key[: len(key) - len(layout.marker)], key
    return None


def find_component(keys, component: str, source: str | os.PathLike) -> tuple[Layout, str]:
    """The layout of a state dict that must hold ``component``, and the prefix of its keys.

    Raises CheckpointError naming what the file looks like when it is another model.
    """
    wanted = COMPONENTS[component][0]
    found = detect_layout(keys)
    if found is None:
        sample = ", ".join(list(keys)[:4])
        markers = " or ".join(repr(lay.marker) for lay in LAYOUTS if lay.component == component)
        raise CheckpointError(
            f"{source} is not {wanted} wanstudio recognises: no key like {markers}. "
            f"Its first keys are: {sample}."
        )
    layout, prefix, key = found
    if layout.component != component:
        loader = COMPONENTS[layout.component][1]
        raise CheckpointError(
            f"{source} looks like {layout.description} (key {key!r}), not {wanted}. "
            f"Load it with {loader} instead."
        )
    return layout, prefix


def to_hf_layout(state: Mapping[str, torch.Tensor], layout: Layout, prefix: str) -> StateDict:
    """Keys below ``prefix`` renamed for transformers / diffusers; keys outside it (``wav2vec2.``
    pre-training heads, the open-clip text tower, ...) are left out."""
    return layout.convert({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
