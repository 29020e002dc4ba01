"""QuantizedLinear: a Linear layer that stores fp8 / fp4 weights and picks its matmul path.

What a layer stores, and how a weight is quantized and dequantized, is its storage format
(``quant/formats/``, one object per mode). The paths (:func:`kernel_path` describes them;
``QuantizedLinear.path`` says which one runs on the layer's device, and why):

* ``dequantize`` — weight -> the activations' dtype, then ``F.linear``. Plain and ``_scaled``
  fp8, fp4 (fused Triton dequantize on CUDA, eager on the CPU), and the fallback of the fast
  modes for layers whose K or N is not a multiple of 16.
* ``scaled_mm`` — fp8 ``_fast`` modes: per-token e4m3 activation scales computed on the fly
  (fused Triton kernel on CUDA), then ``torch._scaled_mm(x_q, weight.t(), scale_a [M, 1],
  scale_b [1, N])``. The weight is stored row-major [N, K], so ``weight.t()`` is the
  column-major mat2 cuBLASLt needs, with no copy.
* ``fp4_native`` — ``fp4_scaled_fast`` on Blackwell: NVFP4 x NVFP4 ``torch._scaled_mm`` with
  swizzled e4m3 block scales; the fp32 tensor scales multiply the output.

Quantized tensors are buffers, materialised once (contiguous, own 16-byte-aligned storage);
``.to(dtype)`` / ``.half()`` move them but never change their dtype. Layers compute in the
dtype of their input activations.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..layout import is_aligned, layout_name
from ..options import QuantMode
from . import fp4, kernels, spec
from .contracts import _FP4_X2, FP4_MM_CONTRACT, SCALED_MM_CONTRACT, SCALED_MM_TENSORWISE_CONTRACT
from .formats import format_for
from .mm_plan import scaled_mm_plan, unit_scale
from .spec import (
    DEQUANTIZE,
    FP4_MIN_CAPABILITY,
    FP4_NATIVE,
    LINEAR,
    SCALED_MM,
    check_device,
    fp4_native_available,
    spec_for,
)
from .weights import quantize_weight

_F32 = torch.float32
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Checkpoint keys these layers do not need (static activation scales: _fast computes per-token ones)
_IGNORED_KEYS = ("scale_input", "input_scale")

_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _materialise(t: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """The tensor in its own contiguous, 16-byte-aligned storage on ``device`` (copy only if not)."""
    t = t.detach()
    if device is not None and device.type != "meta" and t.device != device:
        t = t.to(device)
    if not t.is_contiguous() or t.storage_offset() != 0 or not is_aligned(t):
        t = t.clone(memory_format=torch.contiguous_format)
    return t


_FP4_NATIVE_BROKEN: dict[str, str] = {}  # device -> why the native fp4 call failed


class SharedRows(NamedTuple):
    """Activations quantized once per token for several fp8 ``_fast`` layers that read them (q,
    k and v of self-attention read the same modulated tokens): ``q`` e4m3 [..., K], ``scale``
    fp32 [..., 1], ``dtype`` the activations' own dtype (the layers' output dtype). A tuple, so
    hooks and the layout inspector see its tensors."""

    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def device(self) -> torch.device:
        return self.q.device


# --- the one description of the paths ----------------------------------------------------------
def kernel_path(
    mode: QuantMode | str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    *,
    in_features: int | None = None,
    out_features: int | None = None,
    bias: bool = True,
) -> tuple[str, str]:
    """(path, detail): what runs the matmul of a Linear quantized in ``mode`` on ``device``.

    ``path`` is ``"scaled_mm"`` / ``"fp4_native"`` / ``"dequantize"`` (``"linear"`` for
    ``disabled``, ``"undecided"`` on the meta device); ``detail`` says how, and why a faster
    path is not taken. With ``in_features`` / ``out_features`` it is the path of that layer
    (:meth:`QuantizedLinear.path_for`); without, the path of layers whose shapes its kernels
    accept. ``dtype`` is the activations' dtype, ``bias`` whether the layer has one.

    Raises :class:`UnsupportedModeError` for an fp8 ``_fast`` mode on a CUDA GPU older than
    compute capability 8.9.
    """
    spec = spec_for(mode)
    device = torch.device(device)
    if spec.storage is None:
        return LINEAR, "F.linear at base precision"
    if device.type == "meta":
        return "undecided", "weights on the meta device; the path is chosen once they are loaded"
    fmt = format_for(spec)
    k, n = in_features, out_features
    deq = (DEQUANTIZE, fmt.dequantize_detail(device))
    if spec.matmul == FP4_NATIVE:
        why = _fp4_native_blocker(device, k, n)
        if why:
            return deq[0], deq[1] + f"; native FP4 not used: {why}"
        how = "activations quantized per call"
        return FP4_NATIVE, f"native {fmt.label} x {fmt.label} torch._scaled_mm ({how})"
    if spec.matmul != SCALED_MM:
        return deq
    if (k is not None and k % 16) or (n is not None and n % 16):
        return DEQUANTIZE, (
            f"fp8 weight upcast, then F.linear: in_features {k} / out_features {n} are not "
            f"both multiples of 16, which torch._scaled_mm needs"
        )
    check_device(spec.mode, device)
    w_dtype = fmt.scaled_mm_dtype
    plan = scaled_mm_plan(device, w_dtype, dtype, bias)
    if isinstance(plan, str):
        _warn_once(
            f"plan:{device}:{w_dtype}:{dtype}",
            f"{spec.mode.value}: {plan}; using the dequantize path",
        )
        return DEQUANTIZE, f"fp8 weight upcast, then F.linear ({plan})"
    fused = kernels.HAS_TRITON and device.type == "cuda"
    act = "fused Triton" if fused else "eager"
    detail = f"torch._scaled_mm, per-token e4m3 activation scales ({act} quantization)"
    if device.type == "cuda" and not fused:
        _warn_once(
            f"eager:{device}",
            "Triton is not importable: the per-token activation "
            "quantization of the _fast modes runs eagerly and will not beat bf16",
        )
    return SCALED_MM, detail + (f"; {plan.note}" if plan.note else "")


def _fp4_native_blocker(device: torch.device, k: int | None, n: int | None) -> str:
    """Why the native FP4 matmul cannot run here ("" when it can)."""
    if device.type != "cuda":
        return f"{device.type} has no FP4 tensor cores (emulated path)"
    if not fp4_native_available(device):
        cap = tuple(spec.cuda_capability(device))  # through the module: tests simulate GPUs
        if _FP4_X2 is None:
            return "this torch has no float4_e2m1fn_x2 dtype"
        return (
            f"compute capability {cap[0]}.{cap[1]} < "
            f"{FP4_MIN_CAPABILITY[0]}.{FP4_MIN_CAPABILITY[1]} (Blackwell)"
        )
    if (k is not None and k % 32) or (n is not None and n % 16):
        return f"in_features {k} must be a multiple of 32 and out_features of 16"
    return _FP4_NATIVE_BROKEN.get(str(device), "")


class QuantizedLinear(nn.Module):
    """A Linear whose weight is stored quantized per :class:`QuantMode` (see docs/MODES.md).

    Args:
        in_features: K.
        out_features: N.
        mode: a quantization mode other than ``disabled``.
        bias: whether the layer has a bias (kept in base precision).
        device: where to allocate (``"meta"`` allocates nothing; fill with
            :meth:`set_quantized` or ``load_state_dict(..., assign=True)``).
        dtype: base precision: the bias dtype and the compute dtype reported for the layer.
            Activations of any float dtype are accepted; the output has their dtype.

    State-dict keys: ``self.format.names`` (``quant/formats/``; the table is in ``weights.py``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        mode: QuantMode | str,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        spec = spec_for(mode)
        if spec.storage is None:
            raise ValueError("mode 'disabled' is no quantization: keep the nn.Linear")
        self.spec = spec
        self.mode = spec.mode
        self.format = format_for(spec)  # what is stored, and how (quant/formats/)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.compute_dtype = dtype or torch.get_default_dtype()
        n, k = self.out_features, self.in_features
        for buf in self.format.buffers(n, k):
            self.register_buffer(buf.name, buf.allocate(device))
        if bias:
            self.register_buffer("bias", torch.zeros(n, dtype=self.compute_dtype, device=device))
        else:
            self.register_buffer("bias", None)
        # [1, N] fp32 weight scale in the layout _scaled_mm's row-wise recipe reads (derived).
        self.register_buffer("_scale_b", None, persistent=False)
        self._w_scale_swizzled: tuple | None = None  # (device, tensor) cache of the fp4 native path
        self._refresh()

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def empty(
        cls,
        in_features: int,
        out_features: int,
        mode: QuantMode | str,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> QuantizedLinear:
        """An unfilled layer (values uninitialised; nothing allocated on ``"meta"``)."""
        return cls(in_features, out_features, mode, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: QuantMode | str) -> QuantizedLinear:
        """Quantize an ``nn.Linear`` (its tensors are not modified). A meta Linear gives a meta layer."""
        w, b = linear.weight, linear.bias
        base = w.dtype if w.dtype in _FLOAT_DTYPES else (b.dtype if b is not None else torch.bfloat16)
        q = cls(
            linear.in_features,
            linear.out_features,
            mode,
            bias=linear.bias is not None,
            device=w.device,
            dtype=base,
        )
        if w.device.type != "meta":
            q.set_quantized(quantize_weight(w, q.mode), bias=linear.bias)
        q._layout_name = layout_name(linear)
        return q

    def set_quantized(
        self, tensors: Mapping[str, torch.Tensor], bias: torch.Tensor | None = None
    ) -> QuantizedLinear:
        """Fill the layer with the output of :func:`quantize_weight` (and the bias, if any).

        Tensors are materialised once on the layer's device (or theirs, for a meta layer):
        contiguous, in their own 16-byte-aligned storage.
        """
        expected = list(self.format.names)
        names = set(tensors)
        missing = [n for n in expected if n not in names]
        extra = names - set(expected)
        if missing or extra:
            raise CheckpointError(
                f"{self._where()}: mode {self.mode.value!r} stores {expected}; got {sorted(names)}"
            )
        for name in expected:
            if name in tensors:
                self._put(name, tensors[name])
        if bias is not None:
            if self._buffers.get("bias") is None:
                raise CheckpointError(f"{self._where()}: layer has no bias, got one")
            self._put("bias", bias, dtype=self.compute_dtype)
        self._refresh()
        return self

    def _put(self, name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        old = self._buffers[name]
        n, k = self.out_features, self.in_features
        want = (n,) if name == "bias" else self.format.expected_shape(name, t, n, k)
        if tuple(t.shape) != want:
            raise CheckpointError(
                f"{self._where()}: {name} must have shape {want} for a {n}x{k} layer in mode "
                f"{self.mode.value!r}, got {tuple(t.shape)}"
            )
        if dtype is None and old is not None and t.dtype != old.dtype:
            raise CheckpointError(
                f"{self._where()}: {name} must be {old.dtype} in mode {self.mode.value!r}, got {t.dtype}"
            )
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        device = old.device if old is not None and old.device.type != "meta" else None
        self._buffers[name] = _materialise(t, device)

    def _refresh(self) -> None:
        """Rebuild derived tensors after the stored ones changed (load, quantize, move)."""
        self._paths: dict[tuple, tuple[str, str]] = {}
        self._w_scale_swizzled = None
        if self.spec.matmul == SCALED_MM:
            self._buffers["_scale_b"] = self.format.rowwise_scale(self._buffers, self.out_features)

    # --- loading / moving ---------------------------------------------------------------------------
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        local = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        for name in _IGNORED_KEYS:
            local.pop(name, None)
        bias = local.pop("bias", None)
        if self._buffers.get("bias") is not None and bias is None:
            missing_keys.append(prefix + "bias")
        try:
            if "weight" in local:
                # fp8 as stored (kept as is) or an unquantized weight (quantized now, tensor by
                # tensor); a checkpoint's per-tensor scale comes as scale_weight or weight_scale
                weight = local.pop("weight")
                scale = local.pop("scale_weight", None)
                if scale is None:
                    scale = local.pop("weight_scale", None)
                tensors = quantize_weight(weight, self.mode, scale=scale)
            else:
                tensors = {n: local.pop(n) for n in self.format.names if n in local}
                lost = [n for n in self.format.required if n not in tensors]
                missing_keys.extend(prefix + n for n in lost)
                if lost:
                    tensors = {}
            if tensors:
                self.set_quantized(tensors, bias=bias)
            elif bias is not None and self._buffers.get("bias") is not None:
                self._put("bias", bias, dtype=self.compute_dtype)
        except (CheckpointError, ValueError) as exc:
            error_msgs.append(f"{prefix[:-1] or self._where()}: {exc}")
            return
        if strict:
            unexpected_keys.extend(prefix + k for k in local)

    def _apply(self, fn, recurse=True):
        # Hide quantized storage from dtype conversions (model.to(bf16) / .half()): device moves
        # still apply, the fp8 / fp4 / scale dtypes stay as they are.
        names = [*self.format.names, "_scale_b"]
        held = {n: self._buffers[n] for n in names if self._buffers.get(n) is not None}
        for n in held:
            self._buffers[n] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for n, t in held.items():
                moved = fn(t)
                if moved.dtype != t.dtype:
                    moved = t.to(device=moved.device)
                self._buffers[n] = moved
        if self.bias is not None and self.bias.is_floating_point():
            self.compute_dtype = self.bias.dtype
        self._paths = {}
        self._w_scale_swizzled = None
        return self

    # --- paths --------------------------------------------------------------------------------------
    def _where(self) -> str:
        return layout_name(self)

    @property
    def device(self) -> torch.device:
        return self._buffers[self.format.names[0]].device

    def path_for(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> tuple[str, str]:
        """(path, detail) this layer takes for activations of ``dtype`` on ``device``.

        Raises :class:`UnsupportedModeError` for an fp8 ``_fast`` mode on a CUDA GPU older than
        compute capability 8.9.
        """
        device = torch.device(device) if device is not None else self.device
        dtype = dtype or self.compute_dtype
        key = (str(device), dtype)
        if key not in self._paths:
            self._paths[key] = kernel_path(
                self.mode,
                device,
                dtype,
                in_features=self.in_features,
                out_features=self.out_features,
                bias=self.bias is not None,
            )
        return self._paths[key]

    @property
    def path(self) -> str:
        """The matmul path on the layer's current device ('dequantize' / 'scaled_mm' / ...)."""
        return self.path_for()[0]

    @property
    def path_detail(self) -> str:
        return self.path_for()[1]

    # --- sizes --------------------------------------------------------------------------------------
    @property
    def weight_nbytes(self) -> int:
        """Bytes of the quantized weight and its scales (bias excluded)."""
        names = self.format.names
        return sum(self._buffers[n].nbytes for n in names if self._buffers.get(n) is not None)

    @property
    def nbytes(self) -> int:
        """Bytes of everything in the state dict (weight, scales, bias)."""
        bias = self._buffers.get("bias")
        return self.weight_nbytes + (bias.nbytes if bias is not None else 0)

    # --- compute ------------------------------------------------------------------------------------
    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [N, K] in ``dtype`` (a fresh tensor; one fused pass on CUDA for fp4)."""
        dtype = dtype or self.compute_dtype
        return self.format.dequantize(self._buffers, self.in_features, dtype, self._where())

    def _bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        b = self.bias
        return b if b is None or b.dtype == dtype else b.to(dtype)

    @torch.compiler.disable  # a kernel wrapper: its contract checks stay eager (fusion.py)
    def forward(self, x: torch.Tensor | SharedRows) -> torch.Tensor:
        """x [..., K] (bf16 / fp16 / fp32) -> [..., N] in x's dtype. x is never modified.

        ``x`` may come as :class:`SharedRows` (from ``quant.shared_rows``, only where this layer
        takes the scaled_mm path): its quantization is used as it is."""
        if isinstance(x, SharedRows):
            return self._forward_shared(x)
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{self._where()}: activations must be bf16 / fp16 / fp32, got {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self._where()}: expected [..., {self.in_features}], got {tuple(x.shape)}")
        path, _ = self.path_for(x.device, x.dtype)
        if path == SCALED_MM and x.numel():
            x2 = x.reshape(-1, self.in_features)  # (M, K), a view when x allows it
            q, scale_a = kernels.quantize_rows(x2, self._where())  # (M, K) e4m3, (M, 1) fp32; x2 untouched
            return self._scaled_mm(q, scale_a, x.dtype).view(*x.shape[:-1], self.out_features)
        if path == FP4_NATIVE and x.numel():
            out = self._forward_fp4_native(x)
            if out is not None:
                return out
        return F.linear(x, self.dequantized_weight(x.dtype), self._bias(x.dtype))

    def _forward_shared(self, rows: SharedRows) -> torch.Tensor:
        path, detail = self.path_for(rows.device, rows.dtype)
        if path != SCALED_MM or rows.shape[-1] != self.in_features:
            raise TypeError(
                f"{self._where()}: got activations quantized for scaled_mm [..., {rows.shape[-1]}], but "
                f"this layer ([..., {self.in_features}]) takes the {path} path ({detail}); pass the "
                "activations themselves"
            )
        q = rows.q.reshape(-1, self.in_features)  # (M, K)
        out = self._scaled_mm(q, rows.scale.reshape(-1, 1), rows.dtype)
        return out.view(*rows.shape[:-1], self.out_features)

    def _scaled_mm(self, q: torch.Tensor, scale_a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """e4m3 rows q [M, K] with their scales [M, 1] times the weight -> [M, N] in ``dtype``."""
        where = self._where()
        plan = scaled_mm_plan(q.device, self.format.scaled_mm_dtype, dtype, self.bias is not None)
        if plan.rowwise:
            bias = self._bias(plan.out_dtype) if plan.bias_in_kernel else None
            ops = SCALED_MM_CONTRACT.enforce(
                where,
                mat1=q,
                mat2=self.weight.t(),
                scale_a=scale_a,
                scale_b=self._scale_b,
                bias=bias,
            )
            out = torch._scaled_mm(
                ops["mat1"],
                ops["mat2"],
                scale_a=ops["scale_a"],
                scale_b=ops["scale_b"],
                bias=ops["bias"],
                out_dtype=plan.out_dtype,
            )  # (M, N)
        else:
            one = unit_scale(q.device)
            ops = SCALED_MM_TENSORWISE_CONTRACT.enforce(
                where, mat1=q, mat2=self.weight.t(), scale_a=one, scale_b=one
            )
            out = torch._scaled_mm(
                ops["mat1"], ops["mat2"], scale_a=one, scale_b=one, out_dtype=plan.out_dtype
            )  # (M, N) in units of the scales; `out` is ours to scale in place
            out.mul_(scale_a).mul_(self._scale_b)
        if out.dtype != dtype:
            out = out.to(dtype)
        if self.bias is not None and not plan.bias_in_kernel:
            out = out + self._bias(dtype)
        return out

    def _swizzled_weight_scale(self, device: torch.device) -> torch.Tensor:
        cached = self._w_scale_swizzled
        if cached is None or cached[0] != device:
            cached = (device, fp4.swizzle_block_scales(self.weight_scale))
            self._w_scale_swizzled = cached
        return cached[1]

    def _forward_fp4_native(self, x: torch.Tensor) -> torch.Tensor | None:
        """NVFP4 x NVFP4 on Blackwell. Returns None (after one warning) if torch refuses it."""
        where, dtype = self._where(), x.dtype
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        xp, xs, xg = fp4.quantize_nvfp4(x2)  # (M, K/2) uint8, (M, K/16) e4m3, [] fp32
        try:
            ops = FP4_MM_CONTRACT.enforce(
                where,
                mat1=xp.view(_FP4_X2),
                mat2=self.weight_packed.view(_FP4_X2).t(),  # (K/2, N) column-major, no copy
                scale_a=fp4.swizzle_block_scales(xs),
                scale_b=self._swizzled_weight_scale(x.device),
            )
            out = torch._scaled_mm(
                ops["mat1"],
                ops["mat2"],
                scale_a=ops["scale_a"],
                scale_b=ops["scale_b"],
                out_dtype=torch.bfloat16,
            )  # (M, N) = (x / xg) @ (w / wg)^T
        except (RuntimeError, NotImplementedError, TypeError) as exc:
            reason = f"torch._scaled_mm refused NVFP4 here: {str(exc).strip().splitlines()[0]}"
            _FP4_NATIVE_BROKEN[str(x.device)] = reason
            _warn_once(f"fp4:{x.device}", f"{self.mode.value}: {reason}; using the dequantize path")
            self._paths = {}
            return None
        out = (out.float() * (xg * self.weight_scale_2)).to(dtype)
        if self.bias is not None:
            out = out + self._bias(dtype)
        return out.view(*x.shape[:-1], self.out_features)

    # --- reverse ------------------------------------------------------------------------------------
    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """An ``nn.Linear`` holding the dequantized weight (the reverse of :meth:`from_linear`)."""
        dtype = dtype or self.compute_dtype
        lin = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device="meta", dtype=dtype
        )
        lin.weight = nn.Parameter(self.dequantized_weight(dtype), requires_grad=False)
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.to(dtype).clone(), requires_grad=False)
        lin._layout_name = self._where()
        return lin

    def extra_repr(self) -> str:
        """Sizes, bias, mode and the kernel path this layer takes (or why it cannot run)."""
        try:
            path, detail = self.path_for()
        except Exception as exc:  # e.g. UnsupportedModeError on an old GPU: show, don't fail
            path, detail = "unavailable", str(exc).splitlines()[0]
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, mode={self.mode.value}, path={path} ({detail})"
        )
