"""WanConfig: the DiT's hyper-parameters, with the official field names, and the presets."""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from .errors import ConfigError

MODEL_TYPES = ("t2v", "i2v")
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)", re.DOTALL)


# Modules whose Linear layers quantization leaves at base precision by default: the embeddings
# of the conditions and the timestep (docs/MODES.md keep-list). A model fact, read by
# ``WanModel._keep_in_base_precision`` and ``quant.DEFAULT_KEEP``. Every entry names Linear
# layers of some preset (tests/test_quant.py checks it).
KEEP_IN_BASE_PRECISION: tuple[str, ...] = (
    "text_embedding",
    "time_embedding",
    "time_projection",
    "img_emb",
    "audio_proj",
)


@dataclass(frozen=True)
class WanConfig:
    """Hyper-parameters of a Wan2.1 DiT (+ InfiniteTalk audio modules).

    Field names follow the official ``WanModel`` constructor; the audio fields follow
    InfiniteTalk's. Values are those of the real models unless a preset says otherwise.
    """

    model_type: str = "t2v"  # 't2v' (16 input channels) or 'i2v' (36: noise + mask + image latents)
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (t, h, w) of the Conv3d patch embedding
    text_len: int = 512  # umT5 tokens the context is zero-padded to
    in_dim: int = 16
    dim: int = 1536  # D, the residual stream width
    ffn_dim: int = 8960
    freq_dim: int = 256  # sinusoidal time-embedding width
    text_dim: int = 4096  # umT5-XXL hidden size
    out_dim: int = 16  # latent channels predicted
    num_heads: int = 12
    num_layers: int = 30
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    clip_dim: int = 1280  # CLIP ViT-H/14 width feeding img_emb (i2v); tiny presets shrink it
    # --- InfiniteTalk ------------------------------------------------------------------------
    audio: bool = False  # whether audio_proj and the per-block audio cross-attention exist
    audio_window: int = 5  # audio frames per video frame (offsets -2..2)
    intermediate_dim: int = 512
    output_dim: int = 768  # width of an audio context token
    context_tokens: int = 32  # audio tokens per latent frame per speaker
    vae_scale: int = 4  # video frames per latent frame (after the first)
    norm_input_visual: bool = True  # norm_x before the audio cross-attention has weights
    norm_output_audio: bool = True  # audio_proj ends with a LayerNorm
    class_range: int = 24  # 1-D RoPE positions for two-speaker routing span [0, class_range]
    class_interval: int = 4
    audio_layers: int = 12  # wav2vec2 hidden states stacked per frame
    audio_dim: int = 768  # wav2vec2 hidden size

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        problems = []
        if self.model_type not in MODEL_TYPES:
            problems.append(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            problems.append(f"patch_size must be 3 positive ints, got {self.patch_size}")
        if self.num_heads < 1 or self.dim % self.num_heads:
            problems.append(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        elif self.head_dim % 2 or self.head_dim < 6:
            problems.append(f"head_dim {self.head_dim} must be even and >= 6 for the 3-D RoPE")
        if self.model_type == "i2v" and self.in_dim <= self.out_dim:
            problems.append(
                f"i2v models take noise + condition channels: in_dim {self.in_dim} must exceed "
                f"out_dim {self.out_dim} (36 = 16 + 4 + 16 for Wan2.1)"
            )
        if self.audio and self.model_type != "i2v":
            problems.append("audio (InfiniteTalk) modules need model_type 'i2v'")
        if self.audio and self.audio_window % 2 == 0:
            problems.append(f"audio_window must be odd (centred), got {self.audio_window}")
        positive = ["text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "text_dim", "out_dim", "num_layers"]
        if self.model_type == "i2v":
            positive.append("clip_dim")
        if self.audio:
            positive += ["intermediate_dim", "output_dim", "context_tokens", "audio_layers", "audio_dim"]
        for name in positive:
            if getattr(self, name) < 1:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.freq_dim % 2:
            problems.append(f"freq_dim must be even, got {self.freq_dim}")
        if problems:
            raise ConfigError("invalid WanConfig: " + "; ".join(problems))

    # --- derived --------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def is_i2v(self) -> bool:
        return self.model_type == "i2v"

    @property
    def cond_dim(self) -> int:
        """Channels of the i2v condition ``y`` (mask + image latents): 20 for Wan2.1."""
        return self.in_dim - self.out_dim if self.is_i2v else 0

    @property
    def audio_frame_dim(self) -> int:
        return self.audio_layers * self.audio_dim

    def replace(self, **changes) -> WanConfig:
        """A copy with ``changes`` applied (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    # --- presets --------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> WanConfig:
        """The preset config called ``name``; ConfigError listing the presets if unknown."""
        try:
            return PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}") from None

    # --- inference from a checkpoint --------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, shapes: Mapping[str, Sequence[int]], **overrides) -> WanConfig:
        """Infer the config from official-named tensor shapes (a state dict or a name->shape map).

        Head count is not visible in shapes: every real model uses head_dim 128, so
        ``num_heads = dim // 128`` unless ``num_heads=`` is given. ``text_len`` likewise
        defaults to 512.
        """
        shapes = {k: tuple(getattr(v, "shape", v)) for k, v in shapes.items()}
        need = _shape_getter(shapes)
        num_layers = _num_layers(shapes)  # first: a stray block id explains the other errors
        pe = need("patch_embedding.weight", 5)  # [D, in_dim, pt, ph, pw]
        dim, in_dim, patch = pe[0], pe[1], tuple(pe[2:])
        head = need("head.head.weight", 2)  # [out_dim * pt * ph * pw, D]
        if head[0] % math.prod(patch):
            raise ConfigError(
                f"cannot infer the config: head.head.weight has {head[0]} rows, not a multiple "
                f"of the patch volume {math.prod(patch)} (patch_embedding.weight {list(pe)})"
            )
        i2v = "blocks.0.cross_attn.k_img.weight" in shapes or "img_emb.proj.1.weight" in shapes
        fields: dict = dict(
            model_type="i2v" if i2v else "t2v",
            patch_size=patch,
            in_dim=in_dim,
            dim=dim,
            ffn_dim=need("blocks.0.ffn.0.weight", 2)[0],
            freq_dim=need("time_embedding.0.weight", 2)[1],
            text_dim=need("text_embedding.0.weight", 2)[1],
            out_dim=head[0] // math.prod(patch),
            num_heads=max(1, dim // 128),
            num_layers=num_layers,
            qk_norm="blocks.0.self_attn.norm_q.weight" in shapes,
            cross_attn_norm="blocks.0.norm3.weight" in shapes,
        )
        if i2v:
            fields["clip_dim"] = need("img_emb.proj.1.weight", 2)[1]
        if "audio_proj.proj1.weight" in shapes:
            fields.update(_infer_audio_fields(shapes, need))
            fields["norm_input_visual"] = "blocks.0.norm_x.weight" in shapes
        fields.update(overrides)
        try:
            return cls(**fields)
        except ConfigError as e:  # name the tensors the bad values were read from
            keys = {k for f, k in _FIELD_SOURCES if re.search(rf"\b{f}\b", str(e)) and k in shapes}
            read = ", ".join(f"{k} {list(shapes[k])}" for k in sorted(keys)) or "the tensors' shapes"
            raise ConfigError(f"cannot infer the config: {e} (read from {read})") from None


def _shape_getter(shapes: Mapping[str, tuple[int, ...]]) -> Callable[..., tuple[int, ...]]:
    """``need(key, ndim)``: the shape of a tensor the inference reads, with every dim >= 1."""

    def need(key: str, ndim: int, optional: bool = False) -> tuple[int, ...] | None:
        if key not in shapes:
            if optional:
                return None
            raise ConfigError(f"cannot infer the config: tensor {key!r} is missing")
        shape = shapes[key]
        if len(shape) != ndim or min(shape, default=0) < 1:
            raise ConfigError(
                f"cannot infer the config: {key} has shape {list(shape)}, expected {ndim} "
                f"dimensions of size >= 1 (a corrupt or foreign tensor?)"
            )
        return shape

    return need


# (config field, the tensor from_state_dict reads it from)
_FIELD_SOURCES = (
    *((f, "patch_embedding.weight") for f in ("dim", "in_dim", "patch_size", "num_heads", "head_dim")),
    *(("out_dim", "head.head.weight"), ("ffn_dim", "blocks.0.ffn.0.weight")),
    *(("freq_dim", "time_embedding.0.weight"), ("text_dim", "text_embedding.0.weight")),
    *(("clip_dim", "img_emb.proj.1.weight"), ("audio_window", "audio_proj.proj1.weight")),
    *(("intermediate_dim", "audio_proj.proj1.weight"), ("context_tokens", "audio_proj.proj3.weight")),
    *(("output_dim", "audio_proj.norm.weight"), ("output_dim", "blocks.0.audio_cross_attn.kv_linear.weight")),
)
# Quantization side tensors (scales, markers): a block may carry them for some layers only.
_QUANT_SIDE_LEAVES = ("scale_weight", "weight_scale", "scale_input", "input_scale", "comfy_quant")
_MAX_BLOCK_ID_DIGITS = 6


def _num_layers(names: Iterable[str]) -> int:
    """How many blocks the keys describe: ids must run 0..N-1, each block holding the same
    tensors. A stray id (one renamed key, a foreign file's key) would otherwise make the
    model as deep as that id."""
    blocks: dict[int, dict[str, str]] = {}  # block id -> tensor name after 'blocks.N.' -> key
    for key in names:
        m = _BLOCK_KEY.match(key)
        if m is None:
            continue
        digits, suffix = m.groups()
        if len(digits) > _MAX_BLOCK_ID_DIGITS or digits != str(int(digits)):
            raise ConfigError(
                f"{key[:80]}: block id {digits[:12]!r} is out of range or has a leading zero; a "
                f"renamed or foreign key?"
            )
        blocks.setdefault(int(digits), {})[suffix] = key
    if not blocks:
        raise ConfigError("cannot infer the config: no 'blocks.N.' tensors found")
    ids = sorted(blocks)
    for i, n in enumerate(ids):
        if n != i:
            run = f"run 0..{i - 1} then jump to {n}" if i else f"start at {n}, not 0"
            raise ConfigError(f"{min(blocks[n].values())}: block ids {run}; a renamed or foreign key?")

    def core(n: int) -> frozenset[str]:
        return frozenset(s for s in blocks[n] if s.rsplit(".", 1)[-1] not in _QUANT_SIDE_LEAVES)

    usual = Counter(core(n) for n in ids).most_common(1)[0][0]  # ties: block 0's set
    for n in ids:
        if extra := sorted(core(n) - usual):
            raise ConfigError(
                f"{blocks[n][extra[0]]}: block {n} holds {len(extra)} tensor(s) the other blocks "
                f"lack; a renamed or foreign key?"
            )
        if missing := sorted(usual - core(n)):
            raise ConfigError(
                f"blocks.{n}.{missing[0]} is missing ({len(missing)} tensor(s) of the other "
                f"blocks are absent from block {n}); a renamed key or a partial file?"
            )
    return len(ids)


def _infer_audio_fields(shapes: Mapping[str, tuple[int, ...]], need: Callable[..., tuple[int, ...]]) -> dict:
    p1 = need("audio_proj.proj1.weight", 2)  # [intermediate, window * layers * dim]
    p1_vf = need("audio_proj.proj1_vf.weight", 2)  # [intermediate, (window + vae - 1) * layers * dim]
    norm = need("audio_proj.norm.weight", 1, optional=True)
    output_dim = norm[0] if norm else need("blocks.0.audio_cross_attn.kv_linear.weight", 2)[1]
    vae_scale = 4
    frame_dim = (p1_vf[1] - p1[1]) // (vae_scale - 1)  # layers * dim
    if frame_dim <= 0 or p1[1] % frame_dim:
        raise ConfigError(f"cannot infer the audio window from audio_proj shapes {p1} / {p1_vf}")
    # layers x dim is not separable from shapes alone: real files use wav2vec2-base (x 768).
    known = [(12, 768), (PRESETS["tiny-infinitetalk"].audio_layers, PRESETS["tiny-infinitetalk"].audio_dim)]
    layers, adim = next(((n, d) for n, d in known if n * d == frame_dim), (1, frame_dim))
    return dict(
        audio=True,
        audio_window=p1[1] // frame_dim,
        intermediate_dim=p1[0],
        output_dim=output_dim,
        context_tokens=need("audio_proj.proj3.weight", 2)[0] // output_dim,
        vae_scale=vae_scale,
        norm_output_audio="audio_proj.norm.weight" in shapes,
        audio_layers=layers,
        audio_dim=adim,
    )


_T2V_1_3B = WanConfig()
_T2V_14B = WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
_I2V_14B = _T2V_14B.replace(model_type="i2v", in_dim=36)
_TINY = dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=64, freq_dim=256)

PRESETS: dict[str, WanConfig] = {
    # head_dim 128 in the tiny presets so the RoPE axis split (44/42/42) matches the real models
    "tiny-t2v": WanConfig(**_TINY),
    "tiny-i2v": WanConfig(**_TINY, model_type="i2v", in_dim=36, clip_dim=64),
    "tiny-infinitetalk": WanConfig(
        **_TINY,
        model_type="i2v",
        in_dim=36,
        clip_dim=64,
        audio=True,
        intermediate_dim=64,
        output_dim=64,
        context_tokens=4,
        audio_layers=3,
        audio_dim=32,
    ),
    "t2v-1.3b": _T2V_1_3B,
    "t2v-14b": _T2V_14B,
    "i2v-14b": _I2V_14B,
    "infinitetalk-14b": _I2V_14B.replace(audio=True),
}
