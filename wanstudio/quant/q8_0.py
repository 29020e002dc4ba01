"""GGUF's Q8_0 block format: int8 weights and one fp16 scale per 32 along K.

In a GGUF file a Q8_0 block is 34 bytes: the scale ``d`` (fp16, little-endian) then 32 int8
codes ``q``; the weight is ``q * d``. wanstudio keeps the same numbers in two tensors, the
layout the dequantize kernel reads: ``q`` int8 [N, K_pad] (row-major, K zero-padded to a whole
number of blocks) and ``d`` fp16 [N, K_pad / 32].

Quantization is GGML's (``ggml-quants.c`` ``quantize_row_q8_0_ref``, which the ``gguf``
package's numpy ``quantize`` reproduces bit for bit): ``d = amax / 127`` in fp32,
``q = round-half-away(x * (1 / d))``, ``d`` stored as fp16. Dequantization ``q * d`` is exact in
fp32 (8 x 11 significant bits), so eager, Triton and ``gguf.quants.dequantize`` agree bitwise
before the final cast to the compute dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK = 32  # weights per block
BLOCK_BYTES = 2 + BLOCK  # fp16 scale + 32 int8 codes, as GGUF stores one block
QMAX = 127.0

_CHUNK_ELEMENTS = 1 << 24  # rows are quantized in chunks of about this many weights


def padded_k(k: int) -> int:
    """K rounded up to a whole number of blocks."""
    return -(-k // BLOCK) * BLOCK


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf in fp32, computed as GGML's numpy port does (floor(a) + floor(2 (a - floor(a))));
    ``floor(a + 0.5)`` would round 0.49999997 up."""
    a = x.abs()
    floored = a.floor()
    return torch.copysign(floored + (2 * (a - floored)).floor(), x)


def quantize_q8_0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] (any float dtype) -> (q int8 [N, K_pad], d fp16 [N, K_pad / 32]), GGML's rounding."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"Q8_0 quantization takes a float [N, K] weight, got {w.dtype} {tuple(w.shape)}")
    n, k = w.shape
    kp = padded_k(k)
    q = torch.empty(n, kp, dtype=torch.int8, device=w.device)
    d = torch.empty(n, kp // BLOCK, dtype=torch.float16, device=w.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, kp))
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        x = w[rows].float()
        if kp != k:
            x = F.pad(x, (0, kp - k))
        blocks = x.view(x.shape[0], -1, BLOCK)  # (r, K_pad / 32, 32)
        amax = blocks.abs().amax(dim=-1, keepdim=True)  # (r, blocks, 1) fp32
        # a tensor divisor: CUDA torch divides by a Python scalar through its rounded reciprocal
        scale = amax / amax.new_tensor(QMAX)
        inv = torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)
        codes = _round_half_away(blocks * inv).clamp(-QMAX, QMAX)
        q[rows] = codes.to(torch.int8).view(x.shape[0], kp)
        d[rows] = scale.squeeze(-1).to(torch.float16)
    return q, d


def dequantize_q8_0(
    q: torch.Tensor, d: torch.Tensor, k: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(q int8 [N, K_pad], d fp16 [N, K_pad / 32]) -> [N, K] in ``dtype`` (the eager reference)."""
    n = q.shape[0]
    w = q.view(n, -1, BLOCK).float() * d.float().unsqueeze(-1)  # (N, blocks, 32), exact in fp32
    return w.view(n, -1)[:, :k].to(dtype)


def from_gguf_blocks(raw: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A GGUF Q8_0 tensor's bytes (uint8, N * K / 32 blocks of 34) -> (q int8 [N, K], d fp16
    [N, K / 32]): the same numbers, split into the kernel's layout. ``k`` must be a multiple of 32."""
    if k % BLOCK or raw.numel() != n * (k // BLOCK) * BLOCK_BYTES:
        raise ValueError(f"{raw.numel()} bytes are not the Q8_0 blocks of an [{n}, {k}] weight")
    blocks = raw.reshape(n, k // BLOCK, BLOCK_BYTES)  # (N, blocks, 34)
    d = blocks[..., :2].contiguous().view(torch.float16).view(n, k // BLOCK)
    q = blocks[..., 2:].contiguous().view(torch.int8).view(n, k)
    return q, d


def blocks_to_float(raw: torch.Tensor) -> torch.Tensor:
    """Any whole number of GGUF Q8_0 blocks (uint8, 34 bytes each) -> their weights, fp32, flat
    (the bits of ``gguf.quants.dequantize``, at torch speed, on the bytes' device)."""
    blocks = raw.reshape(-1, BLOCK_BYTES)  # (blocks, 34)
    d = blocks[:, :2].contiguous().view(torch.float16).float()  # (blocks, 1)
    q = blocks[:, 2:].contiguous().view(torch.int8).float()  # (blocks, 32)
    return (q * d).view(-1)


def from_rowwise_int8(q: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """int8 weights with one scale per output row (quanto's qint8: weight = q * scale) as Q8_0
    tensors holding exactly the same numbers: every block of a row gets the row's scale. None
    when a scale is not exactly an fp16 number (then the weight must be re-quantized)."""
    n, k = q.shape
    s = scale.reshape(-1).float()
    if s.numel() == 1:
        s = s.expand(n)
    d = s.to(torch.float16)
    if s.numel() != n or not torch.equal(d.float(), s):
        return None
    kp = padded_k(k)
    codes = F.pad(q, (0, kp - k)) if kp != k else q
    return {"weight_q8": codes, "weight_scale": d.view(n, 1).expand(n, kp // BLOCK).contiguous()}


def to_gguf_blocks(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`from_gguf_blocks`: uint8 [N, K_pad / 32 * 34], GGUF's byte order."""
    n = q.shape[0]
    scale = d.contiguous().view(torch.uint8).view(n, -1, 2)  # (N, blocks, 2)
    codes = q.contiguous().view(torch.uint8).view(n, -1, BLOCK)  # (N, blocks, 32)
    return torch.cat([scale, codes], dim=-1).view(n, -1)


def q8_0_nbytes(n: int, k: int) -> int:
    """Bytes of one quantized [N, K] weight (codes + fp16 block scales)."""
    kp = padded_k(k)
    return n * kp + n * (kp // BLOCK) * 2
