"""The DiT block: self-attention with 3-D RoPE, text (+ image) cross-attention, optional
InfiniteTalk audio cross-attention, and the FFN, with Wan's fp32 modulation islands."""

from __future__ import annotations

import torch
from torch import nn

from ..attention import attention
from ..config import WanConfig
from ..options import AttentionMode
from ..quant.linear import SharedRows
from ..quant.shared_rows import modulated_rows, quantize_once
from .audio import AudioCrossAttention, reference_attention_map
from .layers import FP32LayerNorm, RMSNorm
from .rope import apply_rope


class SelfAttention(nn.Module):
    """Self-attention over all tokens, with 3-D RoPE; also the two-speaker reference map.

    ``sequence_parallel`` is None, or the Ulysses hook of :mod:`wanstudio.parallel`: x then
    holds this rank's run of tokens (and ``rope`` their rows), and the hook's
    ``self_attention(q, k, v, ref_masks, mode=, where=) -> (out, ref_map)`` exchanges tokens
    for heads around the attention call (ref_map then covers every token: [B, 3, L_total]).
    """

    def __init__(self, cfg: WanConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        D = cfg.dim
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(D, D, **kw) for _ in range(4))
        # RMSNorm over all of D, before the head split (as the checkpoints were trained)
        self.norm_q = RMSNorm(D, cfg.eps, **kw) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(D, cfg.eps, **kw) if cfg.qk_norm else nn.Identity()
        self.attention_mode = AttentionMode.SDPA
        self.sequence_parallel = None

    @property
    def q_k_v(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        """The three layers that read the block's modulated tokens."""
        return self.q, self.k, self.v

    def forward(
        self,
        x: torch.Tensor | SharedRows,
        rope: tuple[torch.Tensor, torch.Tensor],
        ref_masks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, L, D] (or its rows already quantized for q, k and v) -> (out [B, L, D],
        reference map [B, 3, L] if ref_masks else None)."""
        B, L, D = x.shape
        shape = (B, L, self.num_heads, self.head_dim)
        rows = quantize_once(x, self.q_k_v)  # x itself unless all three run fp8 _fast
        q = apply_rope(self.norm_q(self.q(rows)).view(shape), *rope)  # (B, L, H, d)
        k = apply_rope(self.norm_k(self.k(rows)).view(shape), *rope)
        v = self.v(rows).view(shape)
        if self.sequence_parallel is not None:
            out, ref_map = self.sequence_parallel.self_attention(
                q, k, v, ref_masks, mode=self.attention_mode, where=self
            )
            return self.o(out.reshape(B, L, D)), ref_map
        ref_map = None
        if ref_masks is not None:
            with torch.no_grad():
                ref_map = reference_attention_map(q, k, ref_masks, ref_masks.shape[-1])
        out = attention(q, k, v, mode=self.attention_mode, where=self)
        return self.o(out.reshape(B, L, D)), ref_map


class CrossAttention(nn.Module):
    """Text cross-attention; i2v adds a second key/value set for the CLIP image tokens."""

    def __init__(self, cfg: WanConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        D = cfg.dim
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(D, D, **kw) for _ in range(4))
        self.norm_q = RMSNorm(D, cfg.eps, **kw) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(D, cfg.eps, **kw) if cfg.qk_norm else nn.Identity()
        self.has_image = cfg.is_i2v
        if self.has_image:
            self.k_img = nn.Linear(D, D, **kw)
            self.v_img = nn.Linear(D, D, **kw)
            self.norm_k_img = RMSNorm(D, cfg.eps, **kw) if cfg.qk_norm else nn.Identity()
        self.attention_mode = AttentionMode.SDPA

    def forward(self, x: torch.Tensor, text: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
        """x [B, L, D]; text [B, text_len, D]; image [B, 257, D] or None."""
        B, L, D = x.shape
        H, d = self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(B, L, H, d)
        k = self.norm_k(self.k(text)).view(B, -1, H, d)
        v = self.v(text).view(B, -1, H, d)
        out = attention(q, k, v, mode=self.attention_mode, where=self)
        if self.has_image:
            k_img = self.norm_k_img(self.k_img(image)).view(B, -1, H, d)
            v_img = self.v_img(image).view(B, -1, H, d)
            out = out + attention(q, k_img, v_img, mode=self.attention_mode, where=self)
        return self.o(out.reshape(B, L, D))


class FeedForward(nn.Sequential):
    """The block MLP: [B, L, D] -> Linear(D, ffn_dim), tanh GELU, Linear(ffn_dim, D) -> [B, L, D]."""

    def __init__(self, cfg: WanConfig, device=None, dtype=None):
        kw = dict(device=device, dtype=dtype)
        super().__init__(
            nn.Linear(cfg.dim, cfg.ffn_dim, **kw),
            nn.GELU(approximate="tanh"),
            nn.Linear(cfg.ffn_dim, cfg.dim, **kw),
        )


class WanBlock(nn.Module):
    """One DiT block: adaLN-modulated self-attention, text (+ image) cross-attention, audio
    cross-attention when the config has audio, and a modulated FFN, with gated fp32 residuals."""

    def __init__(self, cfg: WanConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        D = cfg.dim
        self.norm1 = FP32LayerNorm(D, cfg.eps, elementwise_affine=False, **kw)
        self.self_attn = SelfAttention(cfg, **kw)
        self.norm3 = (
            FP32LayerNorm(D, cfg.eps, elementwise_affine=True, **kw) if cfg.cross_attn_norm else nn.Identity()
        )
        self.cross_attn = CrossAttention(cfg, **kw)
        self.norm2 = FP32LayerNorm(D, cfg.eps, elementwise_affine=False, **kw)
        self.ffn = FeedForward(cfg, **kw)
        self.modulation = nn.Parameter(torch.randn(1, 6, D, **kw) / D**0.5)
        self.has_audio = cfg.audio
        if cfg.audio:
            self.norm_x = FP32LayerNorm(D, cfg.eps, elementwise_affine=cfg.norm_input_visual, **kw)
            self.audio_cross_attn = AudioCrossAttention(cfg, **kw)

    def forward(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        grid: tuple[int, int, int],
        text: torch.Tensor,
        image: torch.Tensor | None = None,
        audio_tokens: torch.Tensor | None = None,
        ref_masks: torch.Tensor | None = None,
        speakers: int = 1,
    ) -> torch.Tensor:
        """x [B, L, D] in the compute dtype; e0 [B, 6, D] fp32. Returns x in the same dtype."""
        dtype = x.dtype
        sh1, sc1, g1, sh2, sc2, g2 = (self.modulation.float() + e0).unsqueeze(2).unbind(1)  # (B, 1, D)
        # the modulated tokens, or (fp8 _fast layers on CUDA) their e4m3 rows straight from x
        y, ref_map = self.self_attn(
            modulated_rows(self.norm1, x, sh1, sc1, self.self_attn.q_k_v),
            rope,
            ref_masks if speakers > 1 else None,
        )
        x = torch.addcmul(x.float(), y, g1).to(dtype)  # gated residual in fp32
        x = x + self.cross_attn(self.norm3(x), text, image)
        if self.has_audio:
            x = x + self.audio_cross_attn(self.norm_x(x), audio_tokens, grid, ref_map, speakers)
        y = self.ffn(modulated_rows(self.norm2, x, sh2, sc2, (self.ffn[0],)))
        return torch.addcmul(x.float(), y, g2).to(dtype)
