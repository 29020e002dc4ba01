"""WanModel: the Wan2.1 DiT (t2v / i2v) with optional InfiniteTalk audio modules.

Parameter names are the official checkpoint keys (``docs/WAN_SPEC.md`` §2); ``state_dict()`` holds
nothing else (RoPE tables are computed, never stored).

The seam. ``forward`` is three stages, each usable on its own::

    tokens, state = model.embed(inputs)      # ModelInputs -> tokens [B, L, D], StepState
    tokens = model.run_blocks(tokens, state)  # the blocks; optionally only blocks [start, stop)
    video = model.run_head(tokens, state)     # -> [B, out_dim, F, H, W] fp32

``state`` (:class:`StepState`) holds what every block reads besides the tokens: the time
embeddings, RoPE tables, the token grid, text / image / audio tokens, speaker masks.
Step caches and sequence parallelism attach here, never inside the blocks. ``forward`` stays
the entry point (block swap and strict layout hook the model's forward: one call = one step),
so they wrap ``run_blocks`` on the instance, and ``forward`` calls the wrapper::

    inner = model.run_blocks
    def cached(tokens, state, start=0, stop=None):
        first = inner(tokens, state, 0, 1)           # block 0 alone
        if close_to_last_step(first, state.e0):      # the cache's own rule
            return tokens + residual                 # skip blocks 0..n-1: reuse the residual
        out = inner(first, state, 1, None)           # the other blocks
        residual = out - tokens                      # kept for the next step
        return out
    model.run_blocks = cached

* A step cache (TeaCache / MagCache) decides from block 0 (its modulated input or its output)
  or from the time embedding, compared with the previous step; it keeps one residual per
  guidance condition (the conditional and unconditional calls of a step differ).
* Sequence parallelism (``wanstudio.parallel``) shards ``tokens`` and ``state.rope`` along L
  (rank r holds tokens r*L/n .. (r+1)*L/n - 1, padded to a multiple of n, frames may straddle
  ranks), calls the wrapped ``run_blocks`` per rank and gathers the tokens. Self-attention
  exchanges tokens for heads through the hook in ``SelfAttention.sequence_parallel`` (which
  also computes the two-speaker map over every token); the audio attention reads the rank's
  token range from ``AudioCrossAttention.sequence_parallel`` and groups its tokens by frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import KEEP_IN_BASE_PRECISION, WanConfig
from ..errors import ShapeError
from ..layout import assign_layout_names
from .audio import AudioProjection
from .blocks import WanBlock
from .inputs import ModelInputs
from .layers import FP32LayerNorm, fp32_linear, time_sinusoid
from .rope import rope_3d_cos_sin


@dataclass(frozen=True)
class StepState:
    """What :meth:`WanModel.embed` computes once per forward for the blocks and the head.

    Attributes (B batch, L = f*h*w tokens, D model dim, d head dim):
        e: time embedding [B, D] fp32 (the head's modulation).
        e0: block modulation [B, 6, D] fp32 (shift, scale, gate of attention and FFN).
        rope: 3-D RoPE (cos, sin), each [L, d / 2] fp32, rows in token order.
        grid: (f, h, w) token grid; tokens are in (f, h, w) row-major order.
        text: text tokens [B, text_len, D] (context padded to text_len, projected).
        image: CLIP image tokens [B, N_img, D] (i2v), else None.
        audio_tokens: [B, f, P * context_tokens, output_dim] (InfiniteTalk; speaker 1's
            tokens first), else None.
        ref_masks: speaker masks on the token grid [B, 3, h*w] (two speakers), else None.
        speakers: P, the number of audio speakers (1 without audio).
    """

    e: torch.Tensor
    e0: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor]
    grid: tuple[int, int, int]
    text: torch.Tensor
    image: torch.Tensor | None = None
    audio_tokens: torch.Tensor | None = None
    ref_masks: torch.Tensor | None = None
    speakers: int = 1


class Head(nn.Module):
    """The output head: adaLN-modulated LayerNorm, then Linear to each token's patch (fp32)."""

    def __init__(self, cfg: WanConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        D = cfg.dim
        self.norm = FP32LayerNorm(D, cfg.eps, elementwise_affine=False, **kw)
        self.head = nn.Linear(D, math.prod(cfg.patch_size) * cfg.out_dim, **kw)
        self.modulation = nn.Parameter(torch.randn(1, 2, D, **kw) / D**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [B, L, D], e [B, D] fp32 -> [B, L, prod(patch) * out_dim] fp32 (an fp32 island)."""
        shift, scale = (self.modulation.float() + e[:, None, :]).unsqueeze(2).unbind(1)  # (B, 1, D)
        return fp32_linear(self.head, torch.addcmul(shift, self.norm.fp32(x), 1 + scale))


class ImageProjection(nn.Module):
    """CLIP penultimate tokens -> D (``img_emb.proj``: LN, Linear, GELU, Linear, LN)."""

    def __init__(self, cfg: WanConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        c = cfg.clip_dim
        self.proj = nn.Sequential(
            nn.LayerNorm(c, **kw),
            nn.Linear(c, c, **kw),
            nn.GELU(),
            nn.Linear(c, cfg.dim, **kw),
            nn.LayerNorm(cfg.dim, **kw),
        )

    def forward(self, clip_fea: torch.Tensor) -> torch.Tensor:
        """clip_fea [B, 257, clip_dim] -> [B, 257, D]."""
        return self.proj(clip_fea)


class WanModel(nn.Module):
    """The Wan2.1 diffusion transformer.

    Args:
        cfg: hyper-parameters; see :class:`WanConfig` and its presets.
        device: where to create parameters. ``"meta"`` allocates nothing (use it for 14B
            configs, then load a checkpoint).
        dtype: parameter dtype (the compute dtype; fp32 islands upcast on their own).
    """

    _no_split_modules = ("WanBlock",)
    _keep_in_base_precision = KEEP_IN_BASE_PRECISION

    def __init__(self, cfg: WanConfig, *, device: torch.device | str | None = None, dtype=None):
        super().__init__()
        self.config = cfg
        kw = dict(device=device, dtype=dtype)
        D = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, D, cfg.patch_size, stride=cfg.patch_size, **kw)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, D, **kw), nn.GELU(approximate="tanh"), nn.Linear(D, D, **kw)
        )
        self.time_embedding = nn.Sequential(
            nn.Linear(cfg.freq_dim, D, **kw), nn.SiLU(), nn.Linear(D, D, **kw)
        )
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D, **kw))
        self.blocks = nn.ModuleList(WanBlock(cfg, **kw) for _ in range(cfg.num_layers))
        self.head = Head(cfg, **kw)
        if cfg.is_i2v:
            self.img_emb = ImageProjection(cfg, **kw)
        if cfg.audio:
            self.audio_proj = AudioProjection(cfg, **kw)
        self._rope_cache: dict = {}
        assign_layout_names(self)

    # --- helpers ----------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def _rope(self, grid: tuple[int, int, int], device: torch.device):
        key = (grid, device)
        if key not in self._rope_cache:
            # plain tensors even under inference_mode, so a later autograd forward can use them
            with torch.inference_mode(False):
                self._rope_cache = {key: rope_3d_cos_sin(grid, self.config.head_dim, device)}
        return self._rope_cache[key]

    def _check_inputs(self, inputs: ModelInputs) -> None:
        """Raise ShapeError unless ``inputs`` fit this model (shapes, fields the config needs)."""
        cfg = self.config
        x, t, context, clip_fea, y = inputs.x, inputs.t, inputs.context, inputs.clip_fea, inputs.y
        audio, ref_target_masks = inputs.audio, inputs.ref_target_masks
        pt, ph, pw = cfg.patch_size

        def fail(msg: str):
            raise ShapeError(msg)

        if x.dim() != 5:
            fail(f"x must be latents [B, C, F, H, W], got shape {tuple(x.shape)}")
        B, C, Fl, Hl, Wl = x.shape
        if cfg.out_dim != C:
            fail(f"x has {C} channels, the model expects {cfg.out_dim} latent channels")
        if Fl % pt or Hl % ph or Wl % pw:
            fail(
                f"latent frames/height/width {(Fl, Hl, Wl)} must be multiples of the patch size "
                f"{cfg.patch_size}; odd latent sizes come from pixel sizes that are not multiples "
                f"of 16 — resize the image to a multiple of 16"
            )
        if t.shape != (B,):
            fail(f"t must be [B] = [{B}] timesteps, got shape {tuple(t.shape)}")
        if context.dim() != 3 or context.shape[0] != B or context.shape[2] != cfg.text_dim:
            fail(f"context must be [{B}, L, {cfg.text_dim}], got {tuple(context.shape)}")
        if context.shape[1] > cfg.text_len:
            fail(f"context has {context.shape[1]} tokens, more than text_len {cfg.text_len}")
        if cfg.is_i2v:
            if y is None or clip_fea is None:
                fail("an i2v model needs y (mask + image latents) and clip_fea (CLIP features)")
            if y.shape != (B, cfg.cond_dim, Fl, Hl, Wl):
                fail(f"y must be [{B}, {cfg.cond_dim}, {Fl}, {Hl}, {Wl}], got {tuple(y.shape)}")
            if clip_fea.dim() != 3 or clip_fea.shape[0] != B or clip_fea.shape[2] != cfg.clip_dim:
                fail(f"clip_fea must be [{B}, tokens, {cfg.clip_dim}], got {tuple(clip_fea.shape)}")
        if cfg.audio:
            want = cfg.vae_scale * (Fl - 1) + 1
            shape = (cfg.audio_window, cfg.audio_layers, cfg.audio_dim)
            if audio is None:
                fail(
                    "an InfiniteTalk model needs audio [B, P, F_video, window, layers, dim] "
                    "(all zeros for the no-audio condition)"
                )
            if (
                audio.dim() != 6
                or audio.shape[0] != B
                or audio.shape[2] != want
                or tuple(audio.shape[3:]) != shape
            ):
                fail(
                    f"audio must be [{B}, P, {want}, {shape[0]}, {shape[1]}, {shape[2]}] for {Fl} "
                    f"latent frames, got {tuple(audio.shape)}"
                )
            if audio.shape[1] not in (1, 2):
                fail(f"audio must have 1 or 2 speakers, got {audio.shape[1]}")
            if audio.shape[1] == 2 and ref_target_masks is None:
                fail("two speakers need ref_target_masks [3, H_px, W_px] (person 1, person 2, background)")
        if ref_target_masks is not None and (
            ref_target_masks.dim() not in (3, 4) or ref_target_masks.shape[-3] != 3
        ):
            fail(f"ref_target_masks must be [3, H, W] or [B, 3, H, W], got {tuple(ref_target_masks.shape)}")

    # --- forward: embed -> run_blocks -> run_head (the seam, see the module docstring) -------------
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        *,
        clip_fea: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        audio: torch.Tensor | None = None,
        ref_target_masks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity.

        x [B, out_dim, F, H, W] latents; t [B] in [0, 1000]; context [B, L <= text_len, text_dim];
        clip_fea [B, 257, clip_dim] and y [B, in_dim - out_dim, F, H, W] (i2v);
        audio [B, P, 4 (F - 1) + 1, window, layers, dim] (InfiniteTalk, P speakers);
        ref_target_masks [3, H_px, W_px] (two speakers). Returns [B, out_dim, F, H, W] fp32.
        With a :class:`ModelInputs` ``inputs``: ``model(**inputs.as_kwargs())``.
        """
        inputs = ModelInputs(x, t, context, clip_fea, y, audio, ref_target_masks)
        tokens, state = self.embed(inputs)
        return self.run_head(self.run_blocks(tokens, state), state)

    def embed(self, inputs: ModelInputs) -> tuple[torch.Tensor, StepState]:
        """Check ``inputs`` and embed them: -> tokens [B, L, D] in the compute dtype, StepState.

        L = f*h*w with (f, h, w) = (F, H, W) / patch_size, tokens in (f, h, w) row-major order.
        Raises ShapeError when the inputs do not fit the model.
        """
        cfg = self.config
        self._check_inputs(inputs)
        dtype, device = self.dtype, self.device
        x, t = inputs.x, inputs.t
        B = x.shape[0]
        if cfg.is_i2v:
            x = torch.cat([x, inputs.y], dim=1)  # (B, in_dim, F, H, W)
        x = self.patch_embedding(x.to(device=device, dtype=dtype))  # (B, D, f, h, w)
        grid = tuple(x.shape[2:])
        # (B, L, D) tokens in (f, h, w) order, stored row-major: the transpose alone would leave
        # every token strided by L, and elementwise ops keep that layout through all the blocks
        x = x.flatten(2).transpose(1, 2).contiguous()
        rope = self._rope(grid, device)

        e = fp32_linear(
            self.time_embedding[2],
            F.silu(fp32_linear(self.time_embedding[0], time_sinusoid(t.to(device), cfg.freq_dim))),
        )
        e0 = fp32_linear(self.time_projection[1], F.silu(e)).unflatten(1, (6, cfg.dim))  # (B, 6, D)

        context = inputs.context
        context = F.pad(context.to(device=device, dtype=dtype), (0, 0, 0, cfg.text_len - context.shape[1]))
        text = self.text_embedding(context)  # (B, text_len, D)
        image = self.img_emb(inputs.clip_fea.to(device=device, dtype=dtype)) if cfg.is_i2v else None

        audio_tokens, ref_masks, speakers = None, None, 1
        if cfg.audio:
            speakers = inputs.audio.shape[1]
            per_speaker = self.audio_proj(inputs.audio.to(device).flatten(0, 1))  # (B*P, f, ctx, C)
            per_speaker = per_speaker.unflatten(0, (B, speakers))  # (B, P, f, ctx, C)
            audio_tokens = per_speaker.permute(0, 2, 1, 3, 4).flatten(
                2, 3
            )  # (B, f, P*ctx, C), speaker 1 first
            if speakers > 1:
                ref_masks = self._token_masks(inputs.ref_target_masks, grid, B)
        state = StepState(e, e0, rope, grid, text, image, audio_tokens, ref_masks, speakers)
        return x, state

    def run_blocks(
        self, tokens: torch.Tensor, state: StepState, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        """Run blocks ``start .. stop - 1`` (all by default): tokens [B, L, D] -> [B, L, D].

        ``run_blocks(x, s, 0, k)`` then ``run_blocks(_, s, k)`` equals ``run_blocks(x, s)``;
        an empty range returns ``tokens`` unchanged.
        """
        n = len(self.blocks)
        stop = n if stop is None else stop
        if not 0 <= start <= stop <= n:
            raise ShapeError(
                f"block range [{start}, {stop}) must lie within [0, {n}]; pass 0 <= start <= stop"
            )
        s = state
        for i in range(start, stop):
            tokens = self.blocks[i](
                tokens, s.e0, s.rope, s.grid, s.text, s.image, s.audio_tokens, s.ref_masks, s.speakers
            )
        return tokens

    def run_head(self, tokens: torch.Tensor, state: StepState) -> torch.Tensor:
        """tokens [B, L, D] -> velocity [B, out_dim, F, H, W] fp32 (head, then unpatchify).

        Named ``run_head`` because ``model.head`` is the checkpoint's head module.
        """
        out = self.head(tokens, state.e)  # (B, L, pt*ph*pw*C) fp32
        return self._unpatchify(out, state.grid)

    def _token_masks(self, masks: torch.Tensor, grid, batch: int) -> torch.Tensor:
        """[3, H_px, W_px] (or [B, 3, ...]) -> [B, 3, h*w] 0/1 masks on the token grid (nearest)."""
        masks = masks.to(self.device, torch.float32)
        if masks.dim() == 3:
            masks = masks[None].expand(batch, -1, -1, -1)
        small = F.interpolate(masks, size=grid[1:], mode="nearest")  # (B, 3, h, w)
        return (small > 0).flatten(2).to(self.dtype)

    def _unpatchify(self, out: torch.Tensor, grid) -> torch.Tensor:
        f, h, w = grid
        pt, ph, pw = self.config.patch_size
        B = out.shape[0]
        out = out.view(B, f, h, w, pt, ph, pw, self.config.out_dim)  # token values: (pt, ph, pw, c)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, f, pt, h, ph, w, pw)
        return out.reshape(B, self.config.out_dim, f * pt, h * ph, w * pw)
