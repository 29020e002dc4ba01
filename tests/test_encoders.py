"""Encoders and VAE: official-layout converters, the wav2vec2 front end, safety, errors.

Official-layout files are built from a tiny HF / diffusers reference model: its weights are
renamed to the official key names (as the Wan2.1 code names them), saved, loaded back through
wanstudio's converters, and the outputs must equal the reference's exactly. fp64 re-readings of
the official T5 and ViT forwards check the renaming's meaning, not only its round trip.
"""

from __future__ import annotations

import math
import pathlib
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import Wav2Vec2Model

from wanstudio.encoders import VAE, AudioEncoder, ImageEncoder, TextEncoder, VAETiling, audio_windows
from wanstudio.encoders.clip import CLIP_MEAN, CLIP_STD
from wanstudio.encoders.weights import to_compute_dtype
from wanstudio.errors import CheckpointError, ConfigError, MediaError, ShapeError

PROMPTS = ["A portrait of a woman, talking.", "a cat", ""]


@pytest.fixture(scope="module")
def text() -> TextEncoder:
    return TextEncoder.tiny()


@pytest.fixture(scope="module")
def image() -> ImageEncoder:
    return ImageEncoder.tiny()


@pytest.fixture(scope="module")
def audio() -> AudioEncoder:
    return AudioEncoder.tiny()


@pytest.fixture(scope="module")
def vae() -> VAE:
    return VAE.tiny()


def _wave(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(round(seconds * 16000))
    t = np.arange(n) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)


def _save(state: dict[str, torch.Tensor], path: pathlib.Path) -> pathlib.Path:
    state = {k: v.contiguous() for k, v in state.items()}
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    return path


# --- official key names, written from wan/modules/{t5,clip,vae}.py ----------------------------

_T5_BLOCK = {
    "layer.0.layer_norm.weight": "norm1.weight",
    "layer.0.SelfAttention.q.weight": "attn.q.weight",
    "layer.0.SelfAttention.k.weight": "attn.k.weight",
    "layer.0.SelfAttention.v.weight": "attn.v.weight",
    "layer.0.SelfAttention.o.weight": "attn.o.weight",
    "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
    "layer.1.layer_norm.weight": "norm2.weight",
    "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
    "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
    "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
}


def official_t5_key(hf_key: str) -> str | None:
    """HF UMT5EncoderModel key -> models_t5_umt5-xxl-enc-bf16.pth key (None: tied duplicate)."""
    if hf_key == "shared.weight":
        return "token_embedding.weight"
    if hf_key == "encoder.final_layer_norm.weight":
        return "norm.weight"
    match = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", hf_key)
    return f"blocks.{match[1]}.{_T5_BLOCK[match[2]]}" if match else None


def official_t5(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {official_t5_key(k): v for k, v in hf.items() if official_t5_key(k)}


def official_clip(hf: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """CLIPVisionModel weights -> the open-clip file layout, text tower and head included."""
    dim = hf["embeddings.class_embedding"].shape[0]
    out = {
        "visual.cls_embedding": hf["embeddings.class_embedding"][None, None],
        "visual.pos_embedding": hf["embeddings.position_embedding.weight"][None],
        "visual.patch_embedding.weight": hf["embeddings.patch_embedding.weight"],
        "visual.pre_norm.weight": hf["pre_layrnorm.weight"],
        "visual.pre_norm.bias": hf["pre_layrnorm.bias"],
        "visual.post_norm.weight": hf["post_layernorm.weight"],
        "visual.post_norm.bias": hf["post_layernorm.bias"],
        "visual.head": torch.randn(dim, 8),
        "textual.blocks.0.attn.q.weight": torch.randn(8, 8),  # XLM-RoBERTa tower, ignored
        "log_scale": torch.tensor(4.6),
    }
    names = {
        "layer_norm1": "norm1",
        "layer_norm2": "norm2",
        "self_attn.out_proj": "attn.proj",
        "mlp.fc1": "mlp.0",
        "mlp.fc2": "mlp.2",
    }
    for i in range(layers):
        src, dst = f"encoder.layers.{i}", f"visual.transformer.{i}"
        for leaf in ("weight", "bias"):
            out[f"{dst}.attn.to_qkv.{leaf}"] = torch.cat(
                [hf[f"{src}.self_attn.{p}_proj.{leaf}"] for p in "qkv"]
            )
            for hf_name, name in names.items():
                out[f"{dst}.{name}.{leaf}"] = hf[f"{src}.{hf_name}.{leaf}"]
    return out


_VAE_RESIDUAL = {
    "norm1.gamma": "residual.0.gamma",
    "conv1.weight": "residual.2.weight",
    "conv1.bias": "residual.2.bias",
    "norm2.gamma": "residual.3.gamma",
    "conv2.weight": "residual.6.weight",
    "conv2.bias": "residual.6.bias",
    "conv_shortcut.weight": "shortcut.weight",
    "conv_shortcut.bias": "shortcut.bias",
}


def official_vae_key(key: str) -> str:
    """diffusers AutoencoderKLWan key -> Wan2.1_VAE.pth key."""
    for hf, official in (("quant_conv.", "conv1."), ("post_quant_conv.", "conv2.")):
        if key.startswith(hf):
            return official + key[len(hf) :]
    side, rest = key.split(".", 1)
    for hf, official in (("conv_in.", "conv1."), ("norm_out.", "head.0."), ("conv_out.", "head.2.")):
        if rest.startswith(hf):
            return f"{side}.{official}{rest[len(hf) :]}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d)\.(.+)", rest):
        index = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[m[1], m[2]]
        return f"{side}.middle.{index}.{_VAE_RESIDUAL.get(m[3], m[3])}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(.+)", rest):
        return f"{side}.downsamples.{m[1]}.{_VAE_RESIDUAL.get(m[2], m[2])}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        return f"{side}.upsamples.{4 * int(m[1]) + int(m[2])}.{_VAE_RESIDUAL[m[3]]}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", rest)
    return f"{side}.upsamples.{4 * int(m[1]) + 3}.{m[2]}"


def official_vae(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {official_vae_key(k): v for k, v in hf.items()}


# --- fp64 readings of the official forwards -----------------------------------------------------


def _t5_bucket(rel: torch.Tensor, num_buckets: int = 32, max_dist: int = 128) -> torch.Tensor:
    half = num_buckets // 2  # bidirectional: one half per direction
    buckets = (rel > 0).long() * half
    rel = rel.abs()
    exact = half // 2
    large = exact + (torch.log(rel.double() / exact) / math.log(max_dist / exact) * (half - exact)).long()
    return buckets + torch.where(rel < exact, rel, large.clamp(max=half - 1))


def official_t5_forward(sd: dict[str, torch.Tensor], ids: torch.Tensor, heads: int) -> torch.Tensor:
    """wan/modules/t5.py T5Encoder on one unpadded sequence [L] -> [L, D], float64."""
    w = {k: v.double() for k, v in sd.items()}

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

    def gelu_tanh(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    x = w["token_embedding.weight"][ids]
    length = ids.numel()
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]  # key - query
    layers = len({k.split(".")[1] for k in w if k.startswith("blocks.")})
    for i in range(layers):
        p = f"blocks.{i}."
        h = rms(x, w[p + "norm1.weight"])
        q, k, v = (
            (h @ w[p + f"attn.{n}.weight"].T).view(length, heads, -1).transpose(0, 1) for n in "qkv"
        )  # (heads, L, d)
        bias = w[p + "pos_embedding.embedding.weight"][_t5_bucket(rel)].permute(2, 0, 1)
        attn = torch.softmax(q @ k.transpose(1, 2) + bias, dim=-1)  # T5: no 1/sqrt(d)
        x = x + (attn @ v).transpose(0, 1).reshape(length, -1) @ w[p + "attn.o.weight"].T
        h = rms(x, w[p + "norm2.weight"])
        gated = gelu_tanh(h @ w[p + "ffn.gate.0.weight"].T) * (h @ w[p + "ffn.fc1.weight"].T)
        x = x + gated @ w[p + "ffn.fc2.weight"].T
    return rms(x, w["norm.weight"])


def official_vit_penultimate(sd: dict[str, torch.Tensor], pixels: torch.Tensor, heads: int):
    """wan/modules/clip.py VisionTransformer(use_31_block=True) on normalised pixels, float64."""
    w = {k[len("visual.") :]: v.double() for k, v in sd.items() if k.startswith("visual.")}
    x = F.conv2d(pixels.double(), w["patch_embedding.weight"], stride=14)
    x = x.flatten(2).transpose(1, 2)  # (B, patches, D)
    x = torch.cat([w["cls_embedding"].expand(x.shape[0], -1, -1), x], dim=1) + w["pos_embedding"]
    dim = x.shape[-1]

    def norm(x, name):
        return F.layer_norm(x, (dim,), w[name + ".weight"], w[name + ".bias"], 1e-5)

    x = norm(x, "pre_norm")
    layers = len({k.split(".")[1] for k in w if k.startswith("transformer.")})
    for i in range(layers - 1):
        p = f"transformer.{i}."
        b, s, _ = x.shape
        qkv = F.linear(norm(x, p + "norm1"), w[p + "attn.to_qkv.weight"], w[p + "attn.to_qkv.bias"])
        q, k, v = qkv.view(b, s, 3, heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, heads, S, d)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, dim)
        x = x + F.linear(attn, w[p + "attn.proj.weight"], w[p + "attn.proj.bias"])
        h = F.gelu(F.linear(norm(x, p + "norm2"), w[p + "mlp.0.weight"], w[p + "mlp.0.bias"]))
        x = x + F.linear(h, w[p + "mlp.2.weight"], w[p + "mlp.2.bias"])
    return x


# --- text ----------------------------------------------------------------------------------


def test_text_embeddings_are_trimmed_to_the_token_count(text):
    counts = [len(ids) for ids in text.tokenizer(PROMPTS).input_ids]
    out = text.encode(PROMPTS)
    assert [tuple(e.shape) for e in out] == [(n, text.text_dim) for n in counts]
    assert counts[-1] == 1  # the empty prompt is just </s>
    torch.testing.assert_close(text.encode(["a cat"])[0], out[1])  # batch-independent


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_official_umt5_file_matches_the_hf_model(text, tmp_path, suffix):
    path = _save(official_t5(text.model.state_dict()), tmp_path / f"umt5{suffix}")
    loaded = TextEncoder.from_files(path, text.tokenizer, dtype=torch.float32, config=text.model.config)
    for got, want in zip(loaded.encode(PROMPTS), text.encode(PROMPTS)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_official_umt5_names_mean_what_the_official_code_computes(text):
    official = official_t5(text.model.state_dict())
    ids = torch.tensor(text.tokenizer(PROMPTS[0]).input_ids)  # 33 tokens: log-spaced buckets too
    want = official_t5_forward(official, ids, text.model.config.num_heads)
    torch.testing.assert_close(text.encode(PROMPTS[:1])[0].double(), want, rtol=1e-4, atol=1e-4)


def test_hf_umt5_folder_loads_with_its_tokenizer(text, tmp_path):
    text.model.save_pretrained(tmp_path)
    text.tokenizer.save_pretrained(tmp_path)
    loaded = TextEncoder.from_files(tmp_path, dtype=torch.float32)
    torch.testing.assert_close(loaded.encode(PROMPTS[:1])[0], text.encode(PROMPTS[:1])[0])


@pytest.mark.parametrize(
    "scale_kind", [None, "row", "tensor"], ids=["fp8", "scaled-fp8-per-row", "scaled-fp8-per-tensor"]
)
def test_fp8_text_encoder_is_dequantized_to_the_compute_dtype(text, tmp_path, scale_kind):
    file, dequantized = {}, dict(text.model.state_dict())
    for hf_key, weight in text.model.state_dict().items():
        key = official_t5_key(hf_key)
        if key is None:
            continue  # the tied copy of the token embedding
        if ".attn." not in key and ".ffn." not in key:  # embeddings and norms stay unquantized
            file[key] = weight
            continue
        scale = {
            None: torch.ones(1, 1),
            "tensor": weight.abs().max().view(1, 1) / 448,
            "row": weight.abs().amax(dim=1, keepdim=True) / 448,
        }[scale_kind]  # (out | 1, 1)
        file[key] = fp8 = (weight / scale).to(torch.float8_e4m3fn)
        if scale_kind is not None:
            file[key.removesuffix("weight") + "scale_weight"] = scale.flatten()
        dequantized[hf_key] = fp8.float() * scale
    if scale_kind is not None:
        file["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)  # ComfyUI's marker
    loaded = TextEncoder.from_files(
        _save(file, tmp_path / "umt5_fp8.safetensors"),
        text.tokenizer,
        dtype=torch.float32,
        config=text.model.config,
    )
    reference = TextEncoder.tiny()
    reference.model.load_state_dict(dequantized)
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    torch.testing.assert_close(
        loaded.encode(PROMPTS[:1])[0], reference.encode(PROMPTS[:1])[0], rtol=0, atol=0
    )


def test_fp8_scale_of_the_wrong_shape_is_refused():
    state = {"a.weight": torch.ones(4, 4).to(torch.float8_e4m3fn), "a.scale_weight": torch.ones(3)}
    with pytest.raises(CheckpointError, match="fits neither a per-tensor nor a per-row"):
        to_compute_dtype(state, torch.float32)


def test_text_encoder_without_tokenizer_says_where_to_get_one(text, tmp_path):
    path = _save(official_t5(text.model.state_dict()), tmp_path / "umt5.pth")
    with pytest.raises(CheckpointError, match="tokenizer="):
        TextEncoder.from_files(path, config=text.model.config)


def test_a_tokenizer_that_needs_custom_code_is_refused_before_transformers_sees_it(text, tmp_path):
    import json

    folder = tmp_path / "tokenizer"
    text.tokenizer.save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    marker = tmp_path / "code-ran"
    (folder / "tokenization_custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(CheckpointError) as caught:
        TextEncoder.from_files(tmp_path / "never-read.pth", folder)
    message = str(caught.value)
    assert "auto_map" in message and "tokenization_custom.CustomTokenizer" in message
    assert "never runs code" in message and "google/umt5-xxl" in message
    assert "trust_remote_code" not in message and not marker.exists()


def test_another_model_size_lists_what_differs(text, tmp_path):
    path = _save(official_t5(text.model.state_dict()), tmp_path / "umt5.pth")
    with pytest.raises(CheckpointError, match=r"with other shapes .*config="):
        TextEncoder.from_files(path, text.tokenizer)  # shipped config: umT5-XXL


# --- image ---------------------------------------------------------------------------------


def test_official_open_clip_file_matches_the_hf_model(image, tmp_path):
    layers = image.model.config.num_hidden_layers
    path = _save(official_clip(image.model.state_dict(), layers), tmp_path / "clip.pth")
    loaded = ImageEncoder.from_files(path, dtype=torch.float32, config=image.model.config)
    images = torch.rand(2, 3, 96, 80) * 2 - 1
    torch.testing.assert_close(loaded.encode(images), image.encode(images), rtol=0, atol=0)


def test_image_features_are_the_official_penultimate_block(image):
    config = image.model.config
    images = torch.rand(1, 3, 120, 100) * 2 - 1
    pixels = F.interpolate(images, size=(224, 224), mode="bicubic", align_corners=False)
    pixels = (pixels * 0.5 + 0.5 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(
        1, 3, 1, 1
    )
    official = official_clip(image.model.state_dict(), config.num_hidden_layers)
    want = official_vit_penultimate(official, pixels, config.num_attention_heads)
    got = image.encode(images)
    assert got.shape == (1, 257, image.clip_dim)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_hf_clip_folder_loads(image, tmp_path):
    image.model.save_pretrained(tmp_path)
    loaded = ImageEncoder.from_files(tmp_path, dtype=torch.float32)
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    torch.testing.assert_close(loaded.encode(images), image.encode(images))


def test_image_encoder_rejects_unbatched_images(image):
    with pytest.raises(ShapeError, match=r"\[B, 3, H, W\]"):
        image.encode(torch.zeros(3, 64, 64))


# --- audio ---------------------------------------------------------------------------------


@pytest.mark.parametrize("samples", [640, 16000, 16000 * 2 + 123, 12345])
def test_audio_frame_count_is_int_duration_times_25(audio, samples):
    features = audio.encode(_wave(samples / 16000))
    assert features.shape == (int(samples / 16000 * 25), audio.layers, audio.dim)
    assert features.dtype == torch.float32


def test_audio_features_are_interpolated_before_the_transformer(audio):
    wave = _wave(1.3)
    frames = int(1.3 * 25)
    model = audio.model
    x = torch.from_numpy(wave)
    x = ((x - x.mean()) / torch.sqrt(x.var(correction=0) + 1e-7))[None]
    outputs: list[torch.Tensor] = []

    def record(module, inputs, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)

    hooks = [layer.register_forward_hook(record) for layer in model.encoder.layers]
    with torch.no_grad():
        cnn = model.feature_extractor(x)  # (1, C, ~50 Hz)
        resampled = F.interpolate(cnn, size=frames, mode="linear", align_corners=True)
        hidden, _ = model.feature_projection(resampled.transpose(1, 2))
        model.encoder(hidden)
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        late = model(x).last_hidden_state  # the transformer at ~50 Hz, resampled afterwards
    want = torch.stack(outputs, dim=2)[0]  # (T, layers, dim)
    got = audio.encode(wave)
    torch.testing.assert_close(got, want)
    late = F.interpolate(late.transpose(1, 2), size=frames, mode="linear", align_corners=True)
    assert not torch.allclose(got[:, -1], late[0].transpose(0, 1), atol=1e-3)


def test_num_frames_overrides_the_frame_count(audio):
    assert audio.encode(_wave(1.0), num_frames=81).shape[0] == 81


def test_audio_windows_clamp_at_both_ends():
    frames = 7
    features = torch.arange(frames, dtype=torch.float32).view(frames, 1, 1).expand(frames, 2, 3)
    windows = audio_windows(features, window=5)
    assert windows.shape == (frames, 5, 2, 3)
    got = windows[:, :, 0, 0].long().tolist()
    assert got[0] == [0, 0, 0, 1, 2]
    assert got[1] == [0, 0, 1, 2, 3]
    assert got[3] == [1, 2, 3, 4, 5]
    assert got[-1] == [4, 5, 6, 6, 6]


def test_audio_windows_need_an_odd_window():
    with pytest.raises(ConfigError, match="odd"):
        audio_windows(torch.zeros(4, 2, 3), window=4)


def test_single_wav2vec2_file_with_pretraining_keys_loads(audio, tmp_path):
    state = {}
    for key, value in audio.model.state_dict().items():
        key = key.replace("parametrizations.weight.original0", "weight_g")
        key = key.replace("parametrizations.weight.original1", "weight_v")
        state[f"wav2vec2.{key}"] = value  # Wav2Vec2ForPreTraining layout, old weight-norm names
    state.update(
        {
            "wav2vec2.masked_spec_embed": torch.rand(audio.dim),
            "project_q.weight": torch.rand(4, 4),
            "quantizer.codevectors": torch.rand(1, 4, 2),
        }
    )
    path = _save(state, tmp_path / "wav2vec2.safetensors")
    loaded = AudioEncoder.from_files(path, config=audio.model.config)
    wave = _wave(0.7)
    torch.testing.assert_close(loaded.encode(wave), audio.encode(wave), rtol=0, atol=0)


def test_wav2vec2_folder_follows_its_preprocessor_config(audio, tmp_path):
    audio.model.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text('{"do_normalize": false}')
    loaded = AudioEncoder.from_files(tmp_path)
    assert isinstance(loaded.model, Wav2Vec2Model) and not loaded.normalize
    wave = _wave(0.5)
    want = AudioEncoder(audio.model, normalize=False).encode(wave)
    torch.testing.assert_close(loaded.encode(wave), want)


def test_audio_shorter_than_one_video_frame_is_refused(audio):
    with pytest.raises(MediaError, match="shorter than one video frame"):
        audio.encode(_wave(0.039))


def test_audio_encoder_refuses_other_sample_rates_and_stereo(audio):
    with pytest.raises(MediaError, match="16000 Hz"):
        audio.encode(_wave(1.0), sample_rate=44100)
    with pytest.raises(ShapeError, match="mono"):
        audio.encode(np.stack([_wave(1.0)] * 2))


# --- VAE -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_official_wan_vae_file_matches_the_diffusers_model(vae, tmp_path):
    path = _save(official_vae(vae.model.state_dict()), tmp_path / "Wan2.1_VAE.pth")
    loaded = VAE.from_files(path, dtype=torch.float32, config=vae.model.config)
    video = torch.rand(1, 3, 5, 16, 24) * 2 - 1
    latents = vae.encode(video)
    torch.testing.assert_close(loaded.encode(video), latents, rtol=0, atol=0)
    torch.testing.assert_close(loaded.decode(latents), vae.decode(latents), rtol=0, atol=0)


def test_diffusers_vae_folder_loads_with_its_config(vae, tmp_path):
    vae.model.save_pretrained(tmp_path)
    loaded = VAE.from_files(tmp_path, dtype=torch.float32)
    latents = torch.randn(1, 16, 2, 4, 4)
    torch.testing.assert_close(loaded.decode(latents), vae.decode(latents))


def test_vae_latents_are_normalised_posterior_means(vae):
    video = torch.rand(2, 3, 5, 16, 8) * 2 - 1
    latents = vae.encode(video)
    assert latents.shape == (2, 16, 2, 2, 1) and latents.dtype == torch.float32
    config = vae.model.config
    with torch.no_grad():
        mu = vae.model.encode(video).latent_dist.mean
    mean = torch.tensor(config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(config.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(latents, (mu - mean) / std)
    decoded = vae.decode(latents)
    assert decoded.shape == video.shape
    assert decoded.min() >= -1 and decoded.max() <= 1


@pytest.mark.slow
def test_tiled_decode(vae):
    latents = torch.randn(1, 16, 1, 4, 6)  # 32 x 48 px: 1 x 2 tiles of 32 px every 16 px
    whole = vae.decode(latents)
    assert torch.equal(vae.decode(latents, tiled=True, tiling=VAETiling.from_pixels(512, 64)), whole)
    tiled = vae.decode(latents, tiled=True, tiling=VAETiling.from_pixels(32, 8))
    assert tiled.shape == whole.shape and torch.isfinite(tiled).all()
    # tests/test_vae_tiling.py checks geometry, blending and exactness


@pytest.mark.parametrize("shape", [(1, 3, 4, 16, 16), (1, 4, 5, 16, 16), (1, 3, 5, 12, 16)])
def test_vae_rejects_bad_video_shapes(vae, shape):
    with pytest.raises(ShapeError):
        vae.encode(torch.zeros(shape))


# --- files: safety, identification ------------------------------------------------------------


class _CodeCarrier:
    """Unpickling this would create a file: stands in for any code hidden in a pickle."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_a_pickle_carrying_code_is_refused(text, tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "umt5.pth"
    torch.save({"token_embedding.weight": torch.zeros(2, 2), "payload": _CodeCarrier(marker)}, path)
    with pytest.raises(CheckpointError, match=r"refused: .*pickled objects"):
        TextEncoder.from_files(path, text.tokenizer)
    assert not marker.exists()


def test_a_legacy_pth_is_named_as_such_not_truncated(text, tmp_path):
    legacy = tmp_path / "umt5_legacy.pth"
    torch.save(official_t5(text.model.state_dict()), legacy, _use_new_zipfile_serialization=False)
    assert legacy.read_bytes()[:2] == b"\x80\x02"
    with pytest.raises(CheckpointError, match=r"legacy \(non-zip\) torch.save format") as caught:
        TextEncoder.from_files(legacy, text.tokenizer)
    assert "truncated" not in str(caught.value) and "safetensors" in str(caught.value)
    cut = tmp_path / "umt5_cut.pth"
    cut.write_bytes(_save(official_t5(text.model.state_dict()), tmp_path / "umt5.pth").read_bytes()[:300])
    with pytest.raises(CheckpointError, match="may be truncated"):
        TextEncoder.from_files(cut, text.tokenizer)
    other = tmp_path / "notes.pth"
    other.write_text("hello, not weights")
    with pytest.raises(CheckpointError, match=r"not a PyTorch checkpoint: it starts with bytes b'hell'"):
        TextEncoder.from_files(other, text.tokenizer)


@pytest.fixture(scope="module")
def component_files(text, image, audio, vae, tmp_path_factory):
    folder = tmp_path_factory.mktemp("components")
    layers = image.model.config.num_hidden_layers
    return {
        "text": _save(official_t5(text.model.state_dict()), folder / "umt5.pth"),
        "image": _save(official_clip(image.model.state_dict(), layers), folder / "clip.pth"),
        "audio": _save(audio.model.state_dict(), folder / "wav2vec2.safetensors"),
        "vae": _save(official_vae(vae.model.state_dict()), folder / "vae.safetensors"),
        "dit": _save(
            {"model.diffusion_model.head.modulation": torch.zeros(1, 2, 4)}, folder / "dit.safetensors"
        ),
    }


@pytest.mark.parametrize(
    ("given", "loader", "message"),
    [
        (
            "vae",
            lambda p: TextEncoder.from_files(p, TextEncoder.tiny().tokenizer),
            r"Wan2.1 VAE.*not a umT5 text encoder.*VAE\.from_files",
        ),
        ("text", VAE.from_files, r"umT5-XXL encoder.*not a Wan VAE.*TextEncoder\.from_files"),
        ("audio", ImageEncoder.from_files, r"wav2vec2.*AudioEncoder\.from_files"),
        ("image", AudioEncoder.from_files, r"open-clip.*ImageEncoder\.from_files"),
        ("dit", VAE.from_files, r"Wan2.1 DiT.*wanstudio\.load_model"),
    ],
)
def test_a_file_of_another_component_says_what_it_looks_like(component_files, given, loader, message):
    with pytest.raises(CheckpointError, match=message):
        loader(component_files[given])


def test_unrecognised_missing_and_corrupt_files(tmp_path):
    unknown = _save({"foo.weight": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="not a Wan VAE wanstudio recognises.*foo.weight"):
        VAE.from_files(unknown)
    with pytest.raises(CheckpointError, match="not found"):
        VAE.from_files(tmp_path / "nope.safetensors")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(unknown.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        VAE.from_files(truncated)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no weight files"):
        VAE.from_files(empty)


def test_tiny_constructors_leave_the_callers_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    TextEncoder.tiny(), ImageEncoder.tiny(), AudioEncoder.tiny(), VAE.tiny()
    assert torch.equal(torch.rand(3), expected)
