"""What an attention backend declares, and the probes that decide whether it can run here.

A backend is data (:class:`AttentionBackend`): what it needs of the device and the inputs
(:class:`Needs`), the layout contract its kernel checks before launch, and a loader that
imports the package and returns a :class:`Kernel`, or raises :class:`Unavailable` with the
reason. Importing is not proof that compiled kernels load, so most backends are also
*probed* with one tiny real call, compared with an fp32 reference.

The probes (:func:`device_info`, :func:`import_module`, :func:`package_version`,
:func:`probe_inputs`) are module functions so tests can simulate a missing package or an
old GPU by monkeypatching them.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..availability import NEEDS_CUDA, Availability, sm, too_old  # Availability: re-exported
from ..layout import LayoutContract, Operand, StrideRule

HALF = (torch.float16, torch.bfloat16)
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Unavailable(Exception):
    """Raised by a backend's loader: the message is the user-facing reason, ``short`` the same
    at label size (``Availability.short``)."""

    def __init__(self, reason: str, short: str = "not available here"):
        super().__init__(reason)
        self.short = short


# --- device ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceInfo:
    """A device and what :func:`device_info` probed of it (capability None and name '' off CUDA)."""

    device: torch.device
    capability: tuple[int, int] | None = None  # CUDA compute capability; None: no CUDA GPU
    name: str = ""


def normalize_device(device: torch.device | str | int | None) -> torch.device:
    """None -> the current CUDA device if there is one, else the CPU; 'cuda' -> 'cuda:<index>'."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def device_info(device: torch.device) -> DeviceInfo:
    """The capability probe: compute capability and name of a CUDA device (None elsewhere)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return DeviceInfo(device)
    return DeviceInfo(
        device, tuple(torch.cuda.get_device_capability(device)), torch.cuda.get_device_name(device)
    )


# --- packages --------------------------------------------------------------------------------
def import_module(name: str):
    """The import probe."""
    return importlib.import_module(name)


def package_version(distribution: str) -> tuple[int, ...] | None:
    """Installed version of a distribution as ints ('2.2.0+cu128' -> (2, 2, 0)); None if absent."""
    try:
        text = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    return tuple(int(p) for p in re.findall(r"\d+", text.split("+")[0])[:3])


def version_text(version: tuple[int, ...] | None) -> str:
    """A version tuple as text ((2, 2, 0) -> '2.2.0'); '?' when unknown (None)."""
    return "?" if version is None else ".".join(map(str, version))


def load_module(name: str, install: str):
    """Import ``name`` or raise Unavailable saying whether it is missing or broken."""
    try:
        return import_module(name)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if missing and (name == missing or name.startswith(missing + ".")):
            raise Unavailable(f"package {name!r} is not installed ({install})", "not installed") from None
        if missing.startswith(name.split(".")[0]):  # its own compiled extension
            raise Unavailable(
                f"package {name!r} is installed but its compiled extension {missing!r} is "
                f"missing (reinstall a build for this torch, {torch.__version__})",
                "compiled extension missing",
            ) from None
        if missing and "." not in missing:  # a dependency, e.g. triton
            raise Unavailable(
                f"package {name!r} is installed but needs {missing!r}, which is not", f"needs {missing}"
            ) from None
        error = e
    except Exception as e:  # an extension built for another torch: ImportError / OSError
        error = e
    raise Unavailable(
        f"package {name!r} is installed but fails to import ({_first_line(error)}); "
        f"it is probably built for another torch (this is torch {torch.__version__})",
        "built for another torch",
    )


def _cc(capability: tuple[int, int]) -> str:
    return f"{capability[0]}.{capability[1]}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


# --- what a backend needs --------------------------------------------------------------------
@dataclass(frozen=True)
class Needs:
    """Device and input constraints of a backend, as data (checked before any import)."""

    cuda: bool = True
    min_capability: tuple[int, int] | None = None
    capabilities: tuple[tuple[int, int], ...] | None = None  # builds for exact archs only
    arch_label: str = ""  # how to name the required GPU in messages ("Hopper", "Blackwell")
    dtypes: tuple[torch.dtype, ...] = HALF
    head_dims: tuple[int, ...] | None = None  # allowed head dims (None: any up to max_head_dim)
    max_head_dim: int | None = None

    def unavailable_on(self, info: DeviceInfo) -> Unavailable | None:
        """Why this device cannot run the backend (None: it can), before anything is imported."""
        if not self.cuda:
            return None
        if info.capability is None and info.device.type == "cuda":
            return Unavailable(f"needs a CUDA GPU; this torch ({torch.__version__}) sees none", NEEDS_CUDA)
        if info.capability is None:
            return Unavailable(f"needs a CUDA GPU ({info.device} is not one)", NEEDS_CUDA)
        cc, label = info.capability, f" ({self.arch_label})" if self.arch_label else ""
        gpu = f"{info.name or info.device} is compute capability {_cc(cc)}"
        if self.capabilities is not None and cc not in self.capabilities:
            want = ", ".join(_cc(c) for c in self.capabilities)
            short = (
                f"needs a {self.arch_label} GPU"
                if self.arch_label
                else "needs " + "/".join(sm(c) for c in self.capabilities)
            )
            return Unavailable(
                f"wrong GPU architecture: needs compute capability {want}{label}; {gpu}", short
            )
        if self.min_capability is not None and cc < self.min_capability:
            return Unavailable(
                f"GPU too old: needs compute capability >= {_cc(self.min_capability)}{label}; {gpu}",
                too_old(self.min_capability),
            )
        return None

    def dtype_problem(self, dtype: torch.dtype) -> str | None:
        """Why ``dtype`` is not supported (naming the supported ones), or None if it is."""
        if dtype in self.dtypes:
            return None
        names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
        return f"dtype {str(dtype).replace('torch.', '')} is not supported (needs one of {names})"

    def head_dim_problem(self, head_dim: int) -> str | None:
        """Why ``head_dim`` is not supported (not listed, or over the maximum), or None if it is."""
        if self.head_dims is not None and head_dim not in self.head_dims:
            return f"head dim {head_dim} is not supported (needs one of {self.head_dims})"
        if self.max_head_dim is not None and head_dim > self.max_head_dim:
            return f"head dim {head_dim} is not supported (needs <= {self.max_head_dim})"
        return None


@dataclass(frozen=True)
class Kernel:
    """A loaded backend on one device.

    ``run(q, k, v)`` takes the model's [B, L, H, D] tensors (contract already enforced),
    converts to its own layout inside and returns [B, Lq, H, D].

    A kernel that mishandles a partial last block of keys declares ``key_block``: calls whose
    missing keys (``-Lk % key_block``) exceed ``max_key_padding * Lk`` are outside its domain
    (``key_rule`` says why) and run SDPA instead (see ``attention.py``). ``sdpa_below_keys``
    routes short key sets (audio: 32 keys, text) to SDPA where it is the faster kernel.
    """

    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    label: str
    key_block: int = 0  # 0: any key count
    max_key_padding: float = 0.0
    key_rule: str = ""
    sdpa_below_keys: int = 0  # calls with fewer keys run SDPA: faster there (measured), not wrong


@dataclass(frozen=True)
class AttentionBackend:
    """One attention implementation: what it needs, its layout contract, how to load it.

    Args:
        name: shown in messages (the mode name, or e.g. ``"fa4"`` for a candidate of
            ``flash_attn`` that has no mode of its own).
        needs: device / dtype / head-dim constraints, checked before importing anything.
        contract: checked by the dispatcher before every launch (``LayoutContract.enforce``).
        load: imports the package for a device; returns a :class:`Kernel` or raises
            :class:`Unavailable`.
        probe: importing is not proof (compiled ops may not load): run one tiny real call.
        rel_tol: relative L2 error against an fp32 reference on random bf16 inputs that this
            kernel is known to stay within (used by the probe, loosely, and the GPU tests).
        diagnose: optional; explains a failed probe (e.g. xformers' build metadata).
    """

    name: str
    needs: Needs
    contract: LayoutContract
    load: Callable[[DeviceInfo], Kernel]
    probe: bool = True
    rel_tol: float = 0.01  # exact-softmax kernels in bf16
    diagnose: Callable[[], str] | None = None
    kernels: dict = field(default_factory=dict, compare=False, repr=False)  # device -> Kernel


def qkv_contract(kernel: str, dtypes: tuple[torch.dtype, ...], stride: StrideRule) -> LayoutContract:
    """The usual attention contract: q, k, v 4-D [B, L, H, D] with the same rules."""
    return LayoutContract(
        kernel, tuple(Operand(n, dtypes=dtypes, stride=stride, ndim=4) for n in ("q", "k", "v"))
    )


# --- the tiny real call ------------------------------------------------------------------------
PROBE_SHAPE = dict(batch=1, q_len=200, k_len=128, heads=2, head_dim=128)


def probe_inputs(device: torch.device, dtype: torch.dtype):
    """q [1, 200, 2, 128], k / v [1, 128, 2, 128]: a partial query block, full key blocks."""
    s = PROBE_SHAPE
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape_q = (s["batch"], s["q_len"], s["heads"], s["head_dim"])
    shape_k = (s["batch"], s["k_len"], s["heads"], s["head_dim"])
    q, k, v = (torch.randn(sh, generator=gen) for sh in (shape_q, shape_k, shape_k))
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v computed explicitly in ``dtype``; [B, L, H, D] in and out."""
    qh, kh, vh = (t.to(dtype).transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
    scores = (qh @ kh.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, Lq, Lk)
    return (scores.softmax(-1) @ vh).transpose(1, 2)  # (B, Lq, H, D)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| computed in float64 (ref's norm floored at 1e-30)."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def probe(backend: AttentionBackend, kernel: Kernel, info: DeviceInfo) -> Unavailable | None:
    """Run one tiny real call; None if it works, else why not."""
    dtype = torch.bfloat16 if torch.bfloat16 in backend.needs.dtypes else backend.needs.dtypes[0]
    q, k, v = probe_inputs(info.device, dtype)
    try:
        out = kernel.run(q, k, v)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)  # a failed launch surfaces here, not later
    except Exception as e:  # any failure of the foreign kernel is the answer we want
        extra = backend.diagnose() if backend.diagnose else ""
        reason = f"it imports, but a tiny test call failed ({_first_line(e)})" + (
            f"; {extra}" if extra else ""
        )
        return Unavailable(reason, "test call failed")
    if tuple(out.shape) != tuple(q.shape):
        return Unavailable(
            f"a tiny test call returned shape {tuple(out.shape)}, expected {tuple(q.shape)}",
            "test call failed",
        )
    err = relative_error(out, reference_attention(q, k, v))
    limit = max(0.1, 3 * backend.rel_tol)  # a smoke test: accuracy is the GPU tests' job
    if not err <= limit:  # also catches NaN
        return Unavailable(
            f"a tiny test call gave wrong results (relative error {err:.1%}, allowed {limit:.0%})",
            "wrong results",
        )
    return None


# --- availability, decided once per (backend, device) -------------------------------------------
# Here rather than in ``registry`` because ``flash_attn`` checks its candidates through it, and
# the registry imports the backends: keeping it below both avoids an import cycle.
_CHECKED: dict[tuple[str, torch.device], tuple[Availability, Kernel | None]] = {}


def check(backend: AttentionBackend, device: torch.device) -> tuple[Availability, Kernel | None]:
    """Availability of a backend on a (normalized) device, and its kernel if available. Cached.

    Needs -> import -> tiny real call: the first that fails gives the reason.
    """
    key = (backend.name, device)
    if key in _CHECKED:
        return _CHECKED[key]
    info = device_info(device)
    problem, kernel = backend.needs.unavailable_on(info), None
    if problem is None:
        try:
            kernel = backend.load(info)
        except Unavailable as e:
            problem = e
    if problem is None and backend.probe:
        problem = probe(backend, kernel, info)
    result = (
        (Availability.runs(kernel.label), kernel)
        if problem is None
        else (Availability.refused(problem.short, str(problem)), None)
    )
    _CHECKED[key] = result
    return result


def clear_checks() -> None:
    """Forget every availability result (the loaded kernels stay on their backends)."""
    _CHECKED.clear()
