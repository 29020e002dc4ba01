"""FP4 (e2m1) codec and the two block formats built on it: MXFP4 and NVFP4.

e2m1 code (4 bits): bit 3 = sign, bits 2-1 = exponent (bias 1), bit 0 = mantissa. The eight
magnitudes, by code 0..7: 0, 0.5, 1, 1.5, 2, 3, 4, 6. Encoding rounds to nearest, ties to the
even code (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4) and
saturates at 6. NaN has no e2m1 code (it encodes as 6 with its sign bit).

Packing: two codes per uint8 along the last dim. Element ``2j`` goes in the LOW nibble
(bits 0-3) of byte ``j``, element ``2j + 1`` in the HIGH nibble (bits 4-7): the order of
``torch.float4_e2m1fn_x2`` and of cuBLAS's FP4 operands, so packed weights feed the native
Blackwell matmul unchanged.

Block formats (scales along K, the last dim of a weight [N, K]; K is zero-padded up to a whole
number of blocks and packed rows hold ``K_pad / 2`` bytes):

* MXFP4 (``fp4_experimental``): one e8m0 scale per 32 weights, a power of two
  ``2^(floor(log2(amax)) - 2)`` (OCP MX rule: the block max lands in [4, 8) and is saturated
  to 6 if above). Stored as ``torch.float8_e8m0fnu`` where torch has it (uint8 otherwise):
  the byte is the biased exponent, ``scale = 2^(byte - 127)``.
* NVFP4 (``fp4_scaled``, ``fp4_scaled_fast``): one e4m3 scale per 16 weights plus one fp32
  scale per tensor, ``tensor_scale = amax / (6 * 448)``, ``block_scale = e4m3(block_amax / 6 /
  tensor_scale)``; the weight is ``e2m1 * block_scale * tensor_scale``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
E4M3_MAX = 448.0
NVFP4_BLOCK = 16
MXFP4_BLOCK = 32
E8M0_BIAS = 127
# torch >= 2.7 has the e8m0 dtype; older torch stores the same bytes as uint8.
E8M0_DTYPE: torch.dtype = getattr(torch, "float8_e8m0fnu", torch.uint8)

_CHUNK_ELEMENTS = 1 << 24  # rows are processed in chunks of about this many weights


def _signed_table(dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """[16] value of every e2m1 code (codes 8..15 are the negatives)."""
    mags = torch.tensor(E2M1_MAGNITUDES, dtype=dtype, device=device)
    return torch.cat([mags, -mags])


def _byte_table(device=None) -> torch.Tensor:
    """[256, 2] fp32: the two values a packed byte holds, (low nibble, high nibble)."""
    t = _signed_table(torch.float32, device)
    byte = torch.arange(256, device=device)
    return torch.stack([t[byte & 0xF], t[byte >> 4]], dim=1)


# --- e2m1 codes -------------------------------------------------------------------------------------
def encode_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round values (already divided by their scale) to e2m1 codes, uint8 in [0, 16).

    The magnitude code is the number of rounding boundaries below |x|; a boundary where a tie
    rounds up (to the even code) is moved one ulp down, so one ``bucketize`` does the lot.
    """
    bounds = _E2M1_BOUNDS.get(x.device)
    if bounds is None:
        bounds = _E2M1_BOUNDS.setdefault(x.device, _rounding_bounds(x.device))
    code = torch.bucketize(x.abs().float(), bounds, out_int32=True).to(torch.uint8)
    return code | (torch.signbit(x) & (code > 0)).to(torch.uint8) << 3


def _rounding_bounds(device) -> torch.Tensor:
    """Midpoints between consecutive magnitudes; ties round up at 0.75, 1.75 and 3.5."""
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], device=device)
    tie_up = torch.tensor([False, True, False, True, False, True, False], device=device)
    return torch.where(tie_up, torch.nextafter(mids, torch.zeros_like(mids)), mids)


_E2M1_BOUNDS: dict = {}


def decode_e2m1(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 codes in [0, 16) -> values."""
    return _signed_table(dtype, codes.device)[codes.long()]


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """[..., 2n] codes -> [..., n] bytes, element 2j in the low nibble, 2j + 1 in the high."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_e2m1 needs an even last dim, got shape {tuple(codes.shape)}")
    pairs = codes.unflatten(-1, (-1, 2))  # (..., n, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., 2n] codes (inverse of :func:`pack_e2m1`)."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)  # (..., n, 2) -> (..., 2n)


def decode_packed(packed: torch.Tensor) -> torch.Tensor:
    """[R, n] packed bytes -> [R, 2n] fp32 values in one gather (no per-element index math)."""
    table = _byte_table(packed.device)
    return F.embedding(packed.to(torch.int32), table).flatten(-2)  # (R, n, 2) -> (R, 2n)


# --- helpers -------------------------------------------------------------------------------------
def padded_k(k: int, block: int) -> int:
    """``k`` rounded up to a multiple of ``block`` (K is zero-padded to whole blocks)."""
    return -(-k // block) * block


def _blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    """[R, K] -> [R, K_pad / block, block] fp32, zero-padded along K."""
    r, k = w.shape
    w = w.float()
    if k % block:
        w = F.pad(w, (0, padded_k(k, block) - k))
    return w.view(r, -1, block)  # (R, blocks, block)


def _row_chunks(rows: int, cols: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, cols))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def _check_weight(w: torch.Tensor) -> None:
    if w.dim() != 2:
        raise ValueError(f"fp4 quantization takes a 2-D weight [N, K], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"fp4 quantization takes a floating-point weight, got {w.dtype}")


# --- MXFP4 -------------------------------------------------------------------------------------------
def mx_exponents(block_amax: torch.Tensor) -> torch.Tensor:
    """Shared exponent of each block (int32): floor(log2(amax)) - 2, in [-127, 127].

    ``frexp`` gives amax = m * 2^e with m in [0.5, 1), so floor(log2(amax)) = e - 1 exactly.
    All-zero blocks get the smallest scale, 2^-127.
    """
    _, e = torch.frexp(block_amax.float())
    exp = (e - 1 - 2).clamp(-E8M0_BIAS, E8M0_BIAS)
    return torch.where(block_amax > 0, exp, torch.full_like(exp, -E8M0_BIAS))


def pow2(exp: torch.Tensor) -> torch.Tensor:
    """2^exp as fp32 for int exponents in [-127, 127], exact (built from the float bits)."""
    exp = exp.to(torch.int32)
    bits = torch.where(exp > -127, (exp + 127) << 23, torch.full_like(exp, 1 << 22))
    return bits.view(torch.float32)  # 1 << 22 is the subnormal 2^-127


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """e8m0 bytes (dtype E8M0_DTYPE or uint8) -> fp32 powers of two."""
    return pow2(scale.view(torch.uint8).to(torch.int32) - E8M0_BIAS)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (packed uint8 [N, K_pad / 2], scale e8m0 [N, K_pad / 32])."""
    _check_weight(w)
    n, k = w.shape
    kp = padded_k(k, MXFP4_BLOCK)
    packed = torch.empty(n, kp // 2, dtype=torch.uint8, device=w.device)
    scale = torch.empty(n, kp // MXFP4_BLOCK, dtype=torch.uint8, device=w.device)
    for rows in _row_chunks(n, kp):
        blocks = _blocks(w[rows], MXFP4_BLOCK)  # (r, blocks, 32)
        exp = mx_exponents(blocks.abs().amax(dim=-1))  # (r, blocks)
        codes = encode_e2m1(blocks * pow2(-exp)[..., None])
        packed[rows] = pack_e2m1(codes.flatten(1))
        scale[rows] = (exp + E8M0_BIAS).to(torch.uint8)
    return packed, scale.view(E8M0_DTYPE)


def dequantize_mxfp4(
    packed: torch.Tensor, scale: torch.Tensor, k: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`quantize_mxfp4`: [N, K] in ``dtype`` (eager reference path)."""
    n = packed.shape[0]
    vals = decode_packed(packed).view(n, -1, MXFP4_BLOCK)  # (N, blocks, 32)
    w = vals * e8m0_to_float(scale)[..., None]
    return w.flatten(1)[:, :k].to(dtype)


# --- NVFP4 -------------------------------------------------------------------------------------------
def nvfp4_tensor_scale(w: torch.Tensor) -> torch.Tensor:
    """fp32 scalar: amax / (6 * 448), so every block scale fits e4m3 (1.0 for an all-zero w)."""
    amax = w.abs().amax().float()
    return torch.where(amax > 0, amax / (E2M1_MAX * E4M3_MAX), torch.ones_like(amax))


def quantize_nvfp4(
    w: torch.Tensor, tensor_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (packed uint8 [N, K_pad/2], block scale e4m3 [N, K_pad/16], tensor scale fp32 [])."""
    _check_weight(w)
    n, k = w.shape
    kp = padded_k(k, NVFP4_BLOCK)
    ts = (nvfp4_tensor_scale(w) if tensor_scale is None else tensor_scale.float()).reshape(())
    packed = torch.empty(n, kp // 2, dtype=torch.uint8, device=w.device)
    bscale = torch.empty(n, kp // NVFP4_BLOCK, dtype=torch.float8_e4m3fn, device=w.device)
    for rows in _row_chunks(n, kp):
        blocks = _blocks(w[rows], NVFP4_BLOCK)  # (r, blocks, 16)
        bs = (blocks.abs().amax(dim=-1) / E2M1_MAX / ts).clamp(max=E4M3_MAX)
        bs = bs.to(torch.float8_e4m3fn)
        eff = bs.float() * ts  # (r, blocks) the scale a decoder will use
        safe = torch.where(eff > 0, eff, torch.ones_like(eff))
        codes = encode_e2m1(blocks / safe[..., None])
        packed[rows] = pack_e2m1(codes.flatten(1))
        bscale[rows] = bs
    return packed, bscale, ts.clone()


def dequantize_nvfp4(
    packed: torch.Tensor,
    block_scale: torch.Tensor,
    tensor_scale: torch.Tensor,
    k: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_nvfp4`: [N, K] in ``dtype`` (eager reference path)."""
    n = packed.shape[0]
    vals = decode_packed(packed).view(n, -1, NVFP4_BLOCK)  # (N, blocks, 16)
    w = vals * block_scale.float()[..., None]  # exact: <= 2 x 4 significant bits
    w = w * tensor_scale.float()
    return w.flatten(1)[:, :k].to(dtype)


# --- cuBLAS block-scale layout (native Blackwell path) --------------------------------------------
def swizzle_block_scales(scale: torch.Tensor) -> torch.Tensor:
    """[R, C] block scales -> the 1-D tiled layout cuBLAS reads for block-scaled FP4 matmuls.

    Rows are padded to a multiple of 128 and columns to a multiple of 4 (zeros); each 128 x 4
    tile is stored contiguously, tiles in row-major tile order, and inside a tile the element
    (r, c) sits at ``(r % 32) * 16 + (r // 32) * 4 + c``.
    """
    r, c = scale.shape
    rp, cp = -(-r // 128) * 128, -(-c // 4) * 4
    raw = scale.view(torch.uint8)  # pad / permute as bytes: fp8 dtypes lack some kernels
    if (rp, cp) != (r, c):
        raw = F.pad(raw, (0, cp - c, 0, rp - r))
    tiles = raw.view(rp // 128, 4, 32, cp // 4, 4)  # (row tile, r // 32, r % 32, col tile, c)
    out = tiles.permute(0, 3, 2, 1, 4).contiguous().view(-1)  # (row tile, col tile, r%32, r//32, c)
    return out.view(scale.dtype)


def swizzled_numel(rows: int, cols: int) -> int:
    """Elements of an [rows, cols] block-scale matrix after :func:`swizzle_block_scales` (128 x 4 tiles)."""
    return -(-rows // 128) * 128 * (-(-cols // 4) * 4)


def fp4_nbytes(n: int, k: int, block: int, tensor_scale: bool) -> int:
    """Bytes of one quantized [N, K] weight (packed values + block scales + tensor scale)."""
    kp = padded_k(k, block)
    return n * kp // 2 + n * kp // block + (4 if tensor_scale else 0)
