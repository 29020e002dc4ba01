"""InfiniteTalk's audio path: audio projection, per-frame audio cross-attention and the
two-speaker routing (docs/WAN_SPEC.md §4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import attention
from ..config import WanConfig
from ..options import AttentionMode
from .rope import apply_rope, rope_1d_cos_sin


def gather_latent_audio(audio: torch.Tensor, vae_scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split per-video-frame audio windows into the two inputs of :class:`AudioProjection`.

    audio [N, F_video, W, layers, dim] with F_video = vae_scale * (F_lat - 1) + 1.
    Returns first [N, W, layers, dim] (frame 0's whole window) and
    groups [N, F_lat - 1, W + vae_scale - 1, layers, dim]: per latent frame, entries 0..mid
    of its first video frame, the centre entry of each middle frame, entries mid..W-1 of its
    last frame.
    """
    N, F_video, W, S, C = audio.shape
    mid = W // 2
    first = audio[:, 0]  # (N, W, S, C)
    rest = audio[:, 1:].reshape(N, (F_video - 1) // vae_scale, vae_scale, W, S, C)
    groups = torch.cat(
        [
            rest[:, :, 0, : mid + 1],  # (N, F_lat-1, mid+1, S, C)
            rest[:, :, 1:-1, mid],  # (N, F_lat-1, vae_scale-2, S, C)
            rest[:, :, -1, mid:],  # (N, F_lat-1, W-mid, S, C)
        ],
        dim=2,
    )
    return first, groups


class AudioProjection(nn.Module):
    """wav2vec2 windows -> ``context_tokens`` audio tokens per latent frame (``audio_proj``)."""

    def __init__(self, cfg: WanConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        frame = cfg.audio_frame_dim
        self.context_tokens, self.output_dim = cfg.context_tokens, cfg.output_dim
        self.vae_scale = cfg.vae_scale
        self.proj1 = nn.Linear(cfg.audio_window * frame, cfg.intermediate_dim, **kw)
        self.proj1_vf = nn.Linear((cfg.audio_window + cfg.vae_scale - 1) * frame, cfg.intermediate_dim, **kw)
        self.proj2 = nn.Linear(cfg.intermediate_dim, cfg.intermediate_dim, **kw)
        self.proj3 = nn.Linear(cfg.intermediate_dim, cfg.context_tokens * cfg.output_dim, **kw)
        self.norm = nn.LayerNorm(cfg.output_dim, eps=1e-5, **kw) if cfg.norm_output_audio else nn.Identity()

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """audio [N, F_video, W, layers, dim] -> [N, F_lat, context_tokens, output_dim]."""
        N = audio.shape[0]
        first, groups = gather_latent_audio(audio.to(self.proj1.weight.dtype), self.vae_scale)
        first = F.relu(self.proj1(first.reshape(N, 1, -1)))  # (N, 1, inter)
        groups = F.relu(self.proj1_vf(groups.flatten(2)))  # (N, F_lat-1, inter)
        h = F.relu(self.proj2(torch.cat([first, groups], dim=1)))  # (N, F_lat, inter)
        tokens = self.proj3(h).unflatten(-1, (self.context_tokens, self.output_dim))
        if isinstance(self.norm, nn.LayerNorm):  # fp32 island
            w, b = self.norm.weight.float(), self.norm.bias.float()
            tokens = F.layer_norm(tokens.float(), (self.output_dim,), w, b, self.norm.eps).type_as(tokens)
        return tokens  # (N, F_lat, ctx, C_out)


class AudioCrossAttention(nn.Module):
    """Each latent frame's tokens attend to that frame's audio tokens (``audio_cross_attn``).

    With two speakers, queries and audio keys get 1-D RoPE positions that route each visual
    token to the speaker whose reference region it attends to most.

    ``sequence_parallel`` is None, or the Ulysses hook of :mod:`wanstudio.parallel` whose
    ``token_range`` (start, stop, total) says which global tokens x holds: a run that may begin
    and end inside a latent frame, and rows >= total that are padding.
    """

    def __init__(self, cfg: WanConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q_linear = nn.Linear(cfg.dim, cfg.dim, **kw)
        self.kv_linear = nn.Linear(cfg.output_dim, 2 * cfg.dim, **kw)
        self.proj = nn.Linear(cfg.dim, cfg.dim, **kw)
        iv = cfg.class_interval
        self.speaker_ranges = ((0.0, float(iv)), (float(cfg.class_range - iv), float(cfg.class_range)))
        self.background_pos = float(cfg.class_range // 2)
        self.attention_mode = AttentionMode.SDPA
        self.sequence_parallel = None

    def forward(
        self,
        x: torch.Tensor,
        audio_tokens: torch.Tensor,
        grid: tuple[int, int, int],
        ref_map: torch.Tensor | None = None,
        speakers: int = 1,
    ) -> torch.Tensor:
        """x [B, L, D]; audio_tokens [B, f, N_a, C_out]; ref_map [B, 3, L_total] (two speakers).

        x holds tokens start .. start + L - 1 of the f*h*w (all of them without sequence
        parallelism); rows at or past L_total (padding) get zeros.
        """
        B, L, D = x.shape
        hw = grid[1] * grid[2]
        H, d = self.num_heads, self.head_dim
        N_a = audio_tokens.shape[2]
        sp = self.sequence_parallel
        start, stop, total = (0, L, L) if sp is None else sp.token_range
        n = min(stop, total) - start  # real tokens held here
        if n <= 0:
            return x.new_zeros(B, L, D)
        # the frames these tokens lie in: f0 .. f1 - 1; the run starts `front` tokens into f0
        f0, f1 = start // hw, (start + n - 1) // hw + 1
        nf, front = f1 - f0, start % hw
        q = self.q_linear(x[:, :n]).view(B, n, H, d)
        kv = self.kv_linear(audio_tokens[:, f0:f1]).view(B, nf, N_a, 2, H, d)
        k, v = kv[:, :, :, 0], kv[:, :, :, 1]  # (B, nf, N_a, H, d) each
        if speakers > 1:
            q_pos = self.token_positions(ref_map)[:, start : start + n]  # (B, n): min/max over all
            cos, sin = rope_1d_cos_sin(q_pos.reshape(-1), d)
            q = apply_rope(q, cos.view(B, n, -1), sin.view(B, n, -1))
            k_pos = self.audio_key_positions(N_a, speakers, x.device)  # (N_a,)
            cos, sin = rope_1d_cos_sin(k_pos, d)
            k = apply_rope(k.reshape(B * nf, N_a, H, d), cos, sin).view(B, nf, N_a, H, d)
        back = nf * hw - front - n
        if front or back:  # a run that starts or ends inside a frame: zero queries fill the frames
            q = F.pad(q, (0, 0, 0, 0, front, back))  # (B, nf*hw, H, d)
        q = q.reshape(B * nf, hw, H, d)  # (B*nf, h*w, H, d): a whole latent frame per row
        out = attention(
            q,
            k.reshape(B * nf, N_a, H, d),
            v.reshape(B * nf, N_a, H, d),
            mode=self.attention_mode,
            where=self,
        )
        out = self.proj(out.reshape(B, nf * hw, D)[:, front : front + n])  # (B, n, D)
        return out if n == L else F.pad(out, (0, 0, 0, L - n))

    def token_positions(self, ref_map: torch.Tensor) -> torch.Tensor:
        """ref_map [B, 3, L] (speaker 1, speaker 2, background) -> RoPE position per token [B, L]."""
        ref_map = ref_map.float()
        scaled = []
        for c, (lo, hi) in enumerate(self.speaker_ranges):
            row = ref_map[:, c]  # (B, L)
            mn, mx = row.amin(dim=1, keepdim=True), row.amax(dim=1, keepdim=True)
            scaled.append((row - mn) / (mx - mn + 1e-8) * (hi - lo) + lo)
        scaled.append(torch.full_like(scaled[0], self.background_pos))
        choice = ref_map.argmax(dim=1, keepdim=True)  # (B, 1, L)
        return torch.stack(scaled, dim=1).gather(1, choice).squeeze(1)

    def audio_key_positions(self, n_tokens: int, speakers: int, device) -> torch.Tensor:
        """Audio keys of speaker 1 sit at the middle of its range (2), speaker 2 at 22."""
        per = n_tokens // speakers
        centres = [(lo + hi) / 2 for lo, hi in self.speaker_ranges[:speakers]]
        return torch.tensor(centres, device=device).repeat_interleave(per)


def reference_attention_map(
    q: torch.Tensor, k: torch.Tensor, masks: torch.Tensor, ref_tokens: int, head_chunk: int = 4
) -> torch.Tensor:
    """How much each token attends to each reference region.

    q, k [B, L, H, d] post-RoPE; masks [B, C, ref_tokens] (0/1, over latent frame 0's tokens).
    Returns [B, C, L]: softmax(q k_ref^T / sqrt(d)) averaged over each mask, then over heads.
    Heads are processed ``head_chunk`` at a time to bound memory (L x ref_tokens per head).
    """
    B, L, H, d = q.shape
    k_ref = k[:, :ref_tokens]  # latent frame 0's keys (sequence parallelism: heads split, not tokens)
    masks = masks.to(q.dtype)
    area = masks.sum(-1).clamp_min(1)  # (B, C)
    total = torch.zeros(B, masks.shape[1], L, device=q.device, dtype=torch.float32)
    for h0 in range(0, H, head_chunk):
        qh = q[:, :, h0 : h0 + head_chunk].transpose(1, 2)  # (B, h, L, d)
        kh = k_ref[:, :, h0 : h0 + head_chunk].transpose(1, 2)  # (B, h, R, d)
        probs = torch.softmax((qh * d**-0.5) @ kh.transpose(-1, -2), dim=-1)  # (B, h, L, R)
        per_class = torch.einsum("bhlr,bcr->bcl", probs, masks) / area[:, :, None]
        total += per_class.float()
    return total / H
