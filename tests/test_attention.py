"""Attention dispatch: SDPA against fp64, the registry, availability reasons, set_attention,
layout contracts, and the package-specific guards — all on the CPU.

GPU-only behaviour is simulated by monkeypatching the probes in
``wanstudio.attention_backends.base`` (device capability, import, package version) and by
fake packages whose kernels are exact references.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import call, make_inputs

import wanstudio as ws
import wanstudio.attention as A
import wanstudio.model.audio as audio_module
import wanstudio.model.blocks as blocks_module
from wanstudio.attention_backends import base, registry, sdpa
from wanstudio.attention_backends.base import DeviceInfo, reference_attention, relative_error
from wanstudio.errors import BackendUnavailableError, ConfigError, LayoutError, UnknownOptionError
from wanstudio.layout import COPY_COUNTS, strict_layout
from wanstudio.options import AttentionMode as M

CPU = torch.device("cpu")
GPU0 = torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def fresh_cache():
    A.clear_attention_cache()
    yield
    A.clear_attention_cache()


def qkv(B=2, Lq=37, Lk=37, H=2, D=128, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, H, D, generator=g).to(dtype)
    k = torch.randn(B, Lk, H, D, generator=g).to(dtype)
    v = torch.randn(B, Lk, H, D, generator=g).to(dtype)
    return q, k, v


def tiny(preset="tiny-t2v", dtype=None):
    torch.manual_seed(0)
    return ws.WanModel(ws.WanConfig.preset(preset), dtype=dtype).eval()


# --- a simulated GPU machine -------------------------------------------------------------------
class FakeMachine:
    """Every device looks like one CUDA GPU; only the fake packages given are importable."""

    def __init__(self, monkeypatch, capability=(9, 0), name="Fake H100"):
        self.capability, self.name = capability, name
        self.modules: dict[str, object] = {}
        self.versions: dict[str, tuple[int, ...]] = {}
        monkeypatch.setattr(base, "device_info", lambda d: DeviceInfo(d, self.capability, self.name))
        monkeypatch.setattr(base, "import_module", self.import_module)
        monkeypatch.setattr(base, "package_version", lambda dist: self.versions.get(dist))
        real_inputs = base.probe_inputs  # the tiny call runs on the CPU
        monkeypatch.setattr(base, "probe_inputs", lambda device, dtype: real_inputs(CPU, dtype))
        A.clear_attention_cache()

    def import_module(self, name):
        found = self.modules.get(name)
        if isinstance(found, BaseException):
            raise found
        if found is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return found

    def install(self, name, version=None, **attrs):
        module = types.ModuleType(name)
        for key, value in attrs.items():
            setattr(module, key, value)
        self.modules[name] = module
        if version is not None:
            self.versions[name] = version
        return module


@pytest.fixture
def machine(monkeypatch):
    return FakeMachine(monkeypatch)


def exact_nhd(q, k, v, **_):
    """A stand-in kernel: exact attention in [B, L, H, D], needing stride(-1) == 1."""
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    return reference_attention(q, k, v).to(q.dtype)


def install_fa2(machine, calls=None):
    def flash_attn_func(q, k, v):
        if calls is not None:
            calls.append(q)
        return exact_nhd(q, k, v)

    return machine.install("flash_attn", __version__="2.7.4", flash_attn_func=flash_attn_func)


# --- registry --------------------------------------------------------------------------------
def test_every_attention_mode_has_a_registered_backend():
    assert set(A.BACKENDS) == set(M)
    for mode, backend in A.BACKENDS.items():
        assert backend.name == mode.value
        assert [op.name for op in backend.contract.operands] == ["q", "k", "v"]
        assert backend.needs.dtypes, mode


def test_unknown_mode_names_are_refused_with_a_suggestion():
    q, k, v = qkv()
    with pytest.raises(UnknownOptionError, match="Did you mean 'sageattn'"):
        A.attention(q, k, v, mode="sageatn")
    with pytest.raises(UnknownOptionError):
        A.set_attention(tiny(), "flash")


def test_mode_strings_dispatch_like_members():
    q, k, v = qkv()
    assert torch.equal(A.attention(q, k, v, mode="sdpa"), A.attention(q, k, v, mode=M.SDPA))


# --- sdpa numerics -----------------------------------------------------------------------------
SHAPES = [
    pytest.param(2, 37, 37, 2, 128, id="self-odd-L"),
    pytest.param(2, 45, 19, 2, 128, id="cross-Lq!=Lk"),
    pytest.param(2, 30, 32, 2, 128, id="text-32-keys"),
    pytest.param(1, 18, 257, 2, 128, id="image-257-keys"),
    pytest.param(6, 15, 4, 2, 128, id="audio-frames-x-4-keys"),
    pytest.param(1, 1, 1, 1, 64, id="single-token"),
]


@pytest.mark.parametrize("B, Lq, Lk, H, D", SHAPES)
def test_sdpa_matches_fp64_reference(B, Lq, Lk, H, D):
    q, k, v = qkv(B, Lq, Lk, H, D)
    out = A.attention(q, k, v, mode=M.SDPA)
    assert out.shape == (B, Lq, H, D) and out.dtype == torch.float32
    ref = reference_attention(q, k, v, torch.float64)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_sdpa_in_fp64_is_exact_and_in_bf16_within_bf16_precision():
    q, k, v = qkv(2, 23, 17, 2, 128, dtype=torch.float64)
    ref = reference_attention(q, k, v, torch.float64)
    torch.testing.assert_close(A.attention(q, k, v), ref, rtol=1e-12, atol=1e-12)
    out = A.attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16
    assert relative_error(out, ref) < 1e-2


def test_sdpa_takes_the_models_strided_views_without_copying():
    B, f, n_a, H, D = 2, 3, 4, 2, 128
    kv = torch.randn(B, f, n_a, 2, H, D)  # like AudioCrossAttention's kv_linear output
    k, v = kv[:, :, :, 0].reshape(B * f, n_a, H, D), kv[:, :, :, 1].reshape(B * f, n_a, H, D)
    q = torch.randn(B * f, 5, H, D)
    assert k.stride(1) == 2 * H * D  # a view, not contiguous
    before = sum(COPY_COUNTS.values())
    out = A.attention(q, k, v, where="audio")
    assert sum(COPY_COUNTS.values()) == before
    torch.testing.assert_close(
        out.double(), reference_attention(q, k, v, torch.float64), rtol=1e-5, atol=1e-5
    )


def test_sdpa_kernel_choice_is_reported_and_cpu_keeps_torchs_order():
    q, k, v = qkv(1, 9, 9, 2, 128)
    assert A.sdpa_kernel_choice(q, k, v) in {"cudnn", "flash", "efficient", "math"}
    assert sdpa.kernel_order(q) is None


def test_sdpa_rule_prefers_cudnn_only_where_measured():
    rule = sdpa.SDPA_RULES[0]
    assert rule.order[0] is torch.nn.attention.SDPBackend.CUDNN_ATTENTION
    assert rule.applies((9, 0), torch.bfloat16, 128)
    assert rule.applies((9, 0), torch.float16, 64)
    assert not rule.applies((9, 0), torch.float32, 128)  # fp32: torch's default order
    assert not rule.applies((9, 0), torch.bfloat16, 256)  # beyond cuDNN's head dims
    assert not rule.applies((8, 0), torch.bfloat16, 128)  # Ampere: not measured
    assert "37.9 ms" in rule.evidence


# --- the tiny models -------------------------------------------------------------------------
def _direct_sdpa(q, k, v, *, mode=None, where=None):
    """What the model computed before the dispatcher existed."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


@pytest.mark.parametrize(
    "preset, speakers",
    [
        ("tiny-t2v", 1),
        ("tiny-i2v", 1),
        ("tiny-infinitetalk", 1),
        ("tiny-infinitetalk", 2),
    ],
)
def test_tiny_models_give_identical_output_through_the_dispatcher(monkeypatch, preset, speakers):
    model = tiny(preset)
    inputs = make_inputs(model.config, batch=2, speakers=speakers)
    copies = sum(COPY_COUNTS.values())
    with torch.no_grad():
        dispatched = call(model, inputs)
    assert sum(COPY_COUNTS.values()) == copies  # the model's q/k/v satisfy the contract as is
    monkeypatch.setattr(blocks_module, "attention", _direct_sdpa)
    monkeypatch.setattr(audio_module, "attention", _direct_sdpa)
    with torch.no_grad():
        direct = call(model, inputs)
    assert torch.equal(dispatched, direct)


# --- unavailable backends ------------------------------------------------------------------------
def test_every_gpu_mode_is_unavailable_on_the_cpu_with_the_reason():
    modes = A.available_attention_modes("cpu")
    assert list(modes) == list(M)
    assert modes[M.SDPA].available and "SDPA" in modes[M.SDPA].kernel
    for mode, found in modes.items():
        if mode is not M.SDPA:
            assert not found.available
            assert "needs a CUDA GPU" in found.reason, (mode, found.reason)
            assert found.short == "needs a CUDA GPU", (mode, found.short)


def test_a_gpu_mode_reached_on_the_cpu_raises_backend_unavailable():
    q, k, v = qkv()
    with pytest.raises(BackendUnavailableError, match="needs a CUDA GPU"):
        A.attention(q, k, v, mode=M.FLASH_ATTN, where="blocks.0.self_attn")


def test_set_attention_refuses_an_unavailable_mode_naming_reason_and_working_modes():
    model = tiny()
    with pytest.raises(BackendUnavailableError) as info:
        A.set_attention(model, M.FLASH_ATTN_3)
    message = str(info.value)
    assert "'flash_attn_3' cannot run here" in message
    assert "needs a CUDA GPU" in message
    assert "Modes that work here: sdpa." in message
    assert set(A.model_attention_modes(model).values()) == {M.SDPA}  # unchanged


def test_a_missing_package_is_named(machine):
    found = A.available_attention_modes(GPU0)
    assert found[M.FLASH_ATTN_3].reason.startswith("package 'flash_attn_interface' is not installed")
    assert found[M.FLASH_ATTN_2].reason.startswith("package 'flash_attn' is not installed")
    assert found[M.SAGEATTN].reason.startswith("package 'sageattention' is not installed")
    assert found[M.SAGEATTN_3_FP8].reason.startswith("package 'sageattention' is not installed")
    assert found[M.XFORMERS].reason.startswith("package 'xformers' is not installed")
    best = found[M.FLASH_ATTN].reason
    assert best.startswith("no FlashAttention works here")
    assert "flash_attn_3: package 'flash_attn_interface'" in best and "fa4: package" in best
    # Blackwell-only kernels are refused for the architecture before any import
    assert found[M.SAGEATTN_3].reason.startswith("wrong GPU architecture")
    assert "Blackwell" in found[M.SAGEATTN_3_FP4].reason


def test_a_package_built_for_another_torch_is_named(machine):
    machine.modules["flash_attn_interface"] = ImportError(
        "flash_attn_3/_C.abi3.so: undefined symbol: _ZN3c104cuda9SetDeviceEi"
    )
    reason = A.available_attention_modes(GPU0)[M.FLASH_ATTN_3].reason
    assert "is installed but fails to import" in reason
    assert "undefined symbol" in reason and "built for another torch" in reason


@pytest.mark.parametrize(
    "module, missing, mode, expected",
    [
        (
            "sageattention",
            "triton",
            M.SAGEATTN,
            "package 'sageattention' is installed but needs 'triton', which is not",
        ),
        (
            "flash_attn",
            "flash_attn_2_cuda",
            M.FLASH_ATTN_2,
            "package 'flash_attn' is installed but its compiled extension 'flash_attn_2_cuda' is missing",
        ),
    ],
)
def test_a_missing_dependency_or_extension_is_named(machine, module, missing, mode, expected):
    machine.modules[module] = ModuleNotFoundError(f"No module named {missing!r}", name=missing)
    assert A.available_attention_modes(GPU0)[mode].reason.startswith(expected)


@pytest.mark.parametrize(
    "mode, capability, expected",
    [
        (M.FLASH_ATTN_2, (7, 5), "GPU too old: needs compute capability >= 8.0"),
        (M.FLASH_ATTN, (7, 5), "GPU too old: needs compute capability >= 8.0"),
        (M.SAGEATTN, (7, 5), "GPU too old: needs compute capability >= 8.0"),
        (M.SAGEATTN_3_FP8, (8, 6), "GPU too old: needs compute capability >= 8.9"),
        (M.SAGEATTN_3, (9, 0), "wrong GPU architecture: needs compute capability 10.0, 12.0, 12.1"),
        (M.XFORMERS, (3, 7), "GPU too old: needs compute capability >= 5.0"),
    ],
)
def test_a_too_old_gpu_is_named(machine, mode, capability, expected):
    machine.capability, machine.name = capability, "Old Card"
    install_fa2(machine)  # installed packages do not help an old GPU
    found = A.available_attention_modes(GPU0)[mode]
    assert not found.available
    assert found.reason.startswith(expected)
    assert f"Old Card is compute capability {capability[0]}.{capability[1]}" in found.reason


def test_every_refusal_carries_a_label_sized_short_reason(machine):
    """Availability.short is set where the decision is made (never parsed out of the reason)."""
    found = A.available_attention_modes(GPU0)
    assert found[M.FLASH_ATTN_2].short == "not installed"
    assert found[M.FLASH_ATTN].short == "not installed"  # every candidate: not installed
    assert found[M.SAGEATTN_3].short == "needs a Blackwell GPU"
    machine.modules["flash_attn_interface"] = ImportError("_C.abi3.so: undefined symbol: x")
    machine.modules["sageattention"] = ModuleNotFoundError("No module named 'triton'", name="triton")
    machine.install("xformers", (0, 0, 35))
    machine.install("xformers.ops", memory_efficient_attention=lambda q, k, v: torch.zeros_like(q))
    A.clear_attention_cache()
    found = A.available_attention_modes(GPU0)
    assert found[M.FLASH_ATTN_3].short == "built for another torch"
    assert found[M.SAGEATTN].short == "needs triton"
    assert found[M.XFORMERS].short == "wrong results"
    assert found[M.FLASH_ATTN].short == "no FlashAttention works"  # candidates differ
    machine.capability = (8, 6)
    A.clear_attention_cache()
    assert A.available_attention_modes(GPU0)[M.SAGEATTN_3_FP8].short == "GPU too old (needs sm89+)"


def test_xformers_without_kernels_is_found_by_the_tiny_call(machine):
    def no_kernels(q, k, v):
        raise NotImplementedError(
            "No operator found for `memory_efficient_attention_forward` with inputs:\n ..."
        )

    machine.install("xformers", (0, 0, 35))
    machine.install("xformers.ops", memory_efficient_attention=no_kernels)
    machine.install(
        "xformers._cpp_lib",
        _cpp_library_load_exception=RuntimeError(
            "xFormers can't load C++/CUDA extensions. xFormers was built for:\n"
            "    PyTorch 2.10.0+cu128 with CUDA 1208 (you have 2.11.0+cu128)"
        ),
    )
    found = A.available_attention_modes(GPU0)[M.XFORMERS]
    assert not found.available
    assert "a tiny test call failed (NotImplementedError: No operator found" in found.reason
    assert "built for: PyTorch 2.10.0+cu128" in found.reason


def test_a_kernel_giving_wrong_results_is_refused_by_the_probe(machine):
    machine.install("xformers", (0, 0, 35))
    machine.install("xformers.ops", memory_efficient_attention=lambda q, k, v: torch.zeros_like(q))
    reason = A.available_attention_modes(GPU0)[M.XFORMERS].reason
    assert "gave wrong results (relative error 100.0%" in reason


def test_flash_attn_picks_the_best_installed_for_the_architecture(machine):
    install_fa2(machine)
    assert A.available_attention_modes(GPU0)[M.FLASH_ATTN].kernel == "FA2 (flash_attn 2.7.4)"
    machine.install("flash_attn_interface", flash_attn_func=lambda q, k, v: (exact_nhd(q, k, v), None))
    A.clear_attention_cache()
    assert A.available_attention_modes(GPU0)[M.FLASH_ATTN].kernel.startswith("FA3")
    machine.capability = (8, 0)  # Ampere: FA2 first
    A.clear_attention_cache()
    assert A.available_attention_modes(GPU0)[M.FLASH_ATTN].kernel.startswith("FA2")


def test_flash_attn_2_refuses_another_major_version(machine):
    machine.install("flash_attn", __version__="1.0.9", flash_attn_func=exact_nhd)
    reason = A.available_attention_modes(GPU0)[M.FLASH_ATTN_2].reason
    assert reason == "flash_attn 1.0.9 is installed; flash_attn_2 needs FlashAttention 2.x"


def test_availability_is_probed_once_per_device(machine, monkeypatch):
    calls = []
    real = base.device_info
    monkeypatch.setattr(base, "device_info", lambda d: calls.append(d) or real(d))
    A.available_attention_modes(GPU0)
    first = len(calls)
    A.available_attention_modes(GPU0)
    A.available_attention_modes("cuda:0")
    assert len(calls) == first
    A.available_attention_modes(torch.device("cuda", 1))
    assert len(calls) > first


def test_dispatch_does_not_probe_after_the_first_call(machine, monkeypatch):
    install_fa2(machine)
    q, k, v = qkv(dtype=torch.bfloat16)
    A.attention(q, k, v, mode=M.FLASH_ATTN_2)
    probes = []
    monkeypatch.setattr(registry, "check", lambda *a: probes.append(a))
    monkeypatch.setattr(base, "device_info", lambda d: probes.append(d))
    for _ in range(3):
        A.attention(q, k, v, mode=M.FLASH_ATTN_2)
    assert probes == []


# --- set_attention ---------------------------------------------------------------------------
def test_fallback_warns_exactly_once_and_uses_sdpa():
    model = tiny("tiny-infinitetalk")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            A.set_attention(model, "flash_attn", fallback="sdpa")
    assert len(caught) == 1
    assert "'flash_attn' cannot run here (needs a CUDA GPU" in str(caught[0].message)
    assert "using 'sdpa' instead" in str(caught[0].message)
    modes = A.model_attention_modes(model)
    assert set(modes.values()) == {M.SDPA}
    kinds = {name.split(".")[-1] for name in modes}
    assert kinds == {"self_attn", "cross_attn", "audio_cross_attn"}
    with warnings.catch_warnings(record=True) as caught:  # another mode: its own warning
        warnings.simplefilter("always")
        A.set_attention(model, "xformers", fallback="sdpa")
        A.set_attention(model, "xformers", fallback="sdpa")
    assert len(caught) == 1 and "'xformers'" in str(caught[0].message)


def test_a_fallback_that_cannot_run_either_is_refused():
    with pytest.raises(BackendUnavailableError, match="nor can its fallback 'xformers'"):
        A.set_attention(tiny(), M.FLASH_ATTN, fallback=M.XFORMERS)


def test_set_attention_sets_every_attending_module(machine):
    install_fa2(machine)
    model = tiny("tiny-infinitetalk", dtype=torch.bfloat16)
    assert A.set_attention(model, M.FLASH_ATTN_2) is model
    modes = A.model_attention_modes(model)
    assert len(modes) == 2 * 3 and set(modes.values()) == {M.FLASH_ATTN_2}


def test_per_block_override(machine):
    calls = []
    install_fa2(machine, calls)
    model = tiny("tiny-i2v", dtype=torch.bfloat16)
    inputs = make_inputs(model.config, batch=1)
    with torch.no_grad():
        reference = call(model, inputs)
    A.set_attention(model, M.FLASH_ATTN_2, blocks=[-1])
    calls.clear()  # the probe's call
    modes = A.model_attention_modes(model)
    assert {n: m.value for n, m in modes.items()} == {
        "blocks.0.self_attn": "sdpa",
        "blocks.0.cross_attn": "sdpa",
        "blocks.1.self_attn": "flash_attn_2",
        "blocks.1.cross_attn": "flash_attn_2",
    }
    with torch.no_grad():
        mixed = call(model, inputs)
    assert len(calls) == 3  # block 1: self, text cross, image cross
    assert relative_error(mixed, reference) < 2e-2
    with pytest.raises(ConfigError, match="block index 2 is out of range"):
        A.set_attention(model, M.SDPA, blocks=[2])


def test_set_attention_checks_the_models_dtype(machine):
    install_fa2(machine)
    model = tiny()  # float32
    with pytest.raises(BackendUnavailableError) as info:
        A.set_attention(model, M.FLASH_ATTN_2)
    assert "dtype float32 is not supported (needs one of float16, bfloat16)" in str(info.value)
    assert "the model computes in float32" in str(info.value)
    assert "Modes that work here: sdpa, xformers" not in str(info.value)


# --- layout contracts ------------------------------------------------------------------------
def _last_dim_strided(B=2, L=11, H=2, D=128, dtype=torch.bfloat16):
    return torch.randn(B, L, D, H).to(dtype).transpose(-1, -2)  # (B, L, H, D), stride(-1) == H


@pytest.mark.parametrize("mode", [M.SDPA, M.FLASH_ATTN_2])
def test_a_strided_last_dim_is_copied_once_outside_strict_mode(machine, mode):
    install_fa2(machine)
    q = _last_dim_strided()
    _, k, v = qkv(2, 11, 13, dtype=torch.bfloat16)
    assert q.stride(-1) != 1
    kernel = A.BACKENDS[mode].contract.kernel
    key, key_k = (("blocks.0.self_attn", kernel, name) for name in ("q", "k"))
    before, before_k = COPY_COUNTS[key], COPY_COUNTS[key_k]  # counts are global: earlier tests add
    out = A.attention(q, k, v, mode=mode, where="blocks.0.self_attn")
    assert COPY_COUNTS[key] == before + 1
    assert COPY_COUNTS[key_k] == before_k  # k was fine: not copied
    assert relative_error(out, reference_attention(q, k, v, torch.float64)) < 1e-2


@pytest.mark.parametrize("mode", [M.SDPA, M.FLASH_ATTN_2])
def test_a_strided_last_dim_raises_in_strict_mode(machine, mode):
    install_fa2(machine)
    q = _last_dim_strided()
    _, k, v = qkv(2, 11, 13, dtype=torch.bfloat16)
    with strict_layout(), pytest.raises(LayoutError) as info:
        A.attention(q, k, v, mode=mode, where="blocks.0.self_attn")
    message = str(info.value)
    assert message.startswith("blocks.0.self_attn: kernel ")
    assert "operand 'q'" in message and "stride(-1) == 1" in message


def test_a_wrong_dtype_is_a_layout_error_even_outside_strict_mode(machine):
    install_fa2(machine)
    q, k, v = qkv()
    with pytest.raises(LayoutError, match="dtype"):
        A.attention(q, k, v, mode=M.FLASH_ATTN_2)


# --- SageAttention guards ----------------------------------------------------------------------
def install_sage_v1(machine, calls):
    """sageattention 1.0.6's behaviour that matters: it centres k in place; an exact kernel."""

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, smooth_k=True):
        calls.append(dict(tensor_layout=tensor_layout, smooth_k=smooth_k, keys=k.shape[1]))
        if smooth_k:
            k -= k.mean(dim=1 if tensor_layout == "NHD" else 2, keepdim=True)
        return exact_nhd(q, k, v)

    return machine.install("sageattention", (1, 0, 6), sageattn=sageattn)


def test_sageattn_1x_never_writes_the_callers_k(machine):
    calls = []
    install_sage_v1(machine, calls)
    q, k, v = qkv(1, 70, 128, dtype=torch.bfloat16)
    k_before = k.clone()
    out = A.attention(q, k, v, mode=M.SAGEATTN)
    assert torch.equal(k, k_before)
    assert calls[-1] == dict(tensor_layout="NHD", smooth_k=False, keys=128)
    assert relative_error(out, reference_attention(q, k, v)) < 1e-2


@pytest.mark.parametrize("keys", [257, 32, 4, 4680])
def test_sageattn_1x_short_partial_key_blocks_run_sdpa_with_one_warning(machine, keys):
    calls = []
    install_sage_v1(machine, calls)
    found = A.available_attention_modes(CPU)[M.SAGEATTN]  # the fake machine's CPU is a GPU
    assert found.available and found.kernel == "sageattention 1.0.6 (Triton)"
    calls.clear()  # the probe's call
    q, k, v = qkv(1, 18, keys, H=1, dtype=torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            out = A.attention(q, k, v, mode=M.SAGEATTN, where="blocks.0.cross_attn")
    assert len(caught) == 1 and "does not mask a partial block of 64 keys" in str(caught[0].message)
    assert f"first: {keys} keys at blocks.0.cross_attn" in str(caught[0].message)
    assert calls == []
    assert A.rerouted_attention_calls() == {("blocks.0.cross_attn", "sageattn"): 2}
    assert torch.equal(out, A.attention(q, k, v, mode=M.SDPA))


@pytest.mark.parametrize("keys", [128, 512, 13_000, 32_760])
def test_sageattn_1x_runs_full_blocks_and_negligible_padding(machine, keys):
    calls = []
    install_sage_v1(machine, calls)
    q, k, v = qkv(1, 3, keys, H=1, D=64, dtype=torch.bfloat16)
    A.attention(q, k, v, mode=M.SAGEATTN)
    assert calls[-1]["keys"] == keys
    assert A.rerouted_attention_calls() == {}


def test_sageattn_2x_runs_any_key_count_and_passes_k_through(machine):
    calls = []

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False, **kw):
        calls.append((tensor_layout, k))
        return exact_nhd(q, k, v)

    machine.install("sageattention", (2, 2, 0), sageattn=sageattn)
    q, k, v = qkv(1, 18, 257, dtype=torch.bfloat16)
    A.attention(q, k, v, mode=M.SAGEATTN)
    assert calls[-1][0] == "NHD" and calls[-1][1] is k
    assert A.rerouted_attention_calls() == {}


@pytest.mark.parametrize("mode, smoothing", [(M.SAGEATTN_3, True), (M.SAGEATTN_3_FP4, False)])
def test_sageattention3_gets_hnd_a_private_k_and_its_smoothing_flag(machine, mode, smoothing):
    machine.capability = (12, 0)
    calls = []

    def sageattn3_blackwell(q, k, v, attn_mask=None, is_causal=False, per_block_mean=True):
        calls.append(per_block_mean)
        k -= k.mean(dim=-2, keepdim=True)  # as the real kernel does, in place
        out = exact_nhd(*(t.transpose(1, 2).contiguous() for t in (q, k, v)))
        return out.transpose(1, 2).contiguous()  # (B, H, Lq, D)

    machine.install("sageattn3", sageattn3_blackwell=sageattn3_blackwell)
    q, k, v = qkv(1, 33, 70, dtype=torch.bfloat16)
    k_before = k.clone()
    out = A.attention(q, k, v, mode=mode)
    assert torch.equal(k, k_before)
    assert calls[-1] is smoothing
    assert out.shape == q.shape
    assert relative_error(out, reference_attention(q, k, v)) < 1e-2


def test_sageattn_3_fp8_needs_sageattention_2(machine):
    install_sage_v1(machine, [])
    reason = A.available_attention_modes(GPU0)[M.SAGEATTN_3_FP8].reason
    assert reason.startswith("sageattention 1.0.6 is installed (Triton only)")
    assert "needs sageattention >= 2" in reason


@pytest.mark.parametrize(
    "capability, kernel",
    [
        ((9, 0), "sageattn_qk_int8_pv_fp8_cuda_sm90"),
        ((8, 9), "sageattn_qk_int8_pv_fp8_cuda"),
    ],
)
def test_sageattn_3_fp8_uses_hoppers_own_kernel(machine, capability, kernel):
    machine.capability = capability
    used = []

    def fake(name):
        def fn(q, k, v, tensor_layout="HND", **kw):
            used.append((name, tensor_layout, kw.get("pv_accum_dtype")))
            return exact_nhd(q, k, v)

        return fn

    machine.install(
        "sageattention",
        (2, 2, 0),
        sageattn=fake("sageattn"),
        sageattn_qk_int8_pv_fp8_cuda=fake("sageattn_qk_int8_pv_fp8_cuda"),
        sageattn_qk_int8_pv_fp8_cuda_sm90=fake("sageattn_qk_int8_pv_fp8_cuda_sm90"),
    )
    found = A.available_attention_modes(GPU0)[M.SAGEATTN_3_FP8]
    assert found.available and kernel in found.kernel
    q, k, v = qkv(1, 20, 30, dtype=torch.float16)
    A.attention(q, k, v, mode=M.SAGEATTN_3_FP8)
    assert used[-1] == (kernel, "NHD", "fp32+fp32")


def test_the_registry_collects_every_backend_module():
    """Adding a backend is an option plus one module declaring ``MODES`` (docs/ARCHITECTURE.md)."""
    import importlib
    import pathlib
    import pkgutil

    from wanstudio.attention_backends import registry

    declared = {}
    folder = str(pathlib.Path(registry.__file__).parent)
    for info in pkgutil.iter_modules([folder]):
        module = importlib.import_module(f"wanstudio.attention_backends.{info.name}")
        declared.update(getattr(module, "MODES", {}))
    assert declared == registry.BACKENDS and set(declared) == set(M)


@pytest.mark.parametrize("keys, to_fa4", [(32, False), (63, False), (64, True), (1560, True)])
def test_fa4_sends_short_key_sets_to_sdpa_where_sdpa_is_faster(machine, keys, to_fa4):
    calls = []

    def flash_attn_func(q, k, v):
        calls.append(k.shape[1])
        return exact_nhd(q, k, v), None  # FA4 returns (out, lse)

    machine.install("flash_attn.cute", flash_attn_func=flash_attn_func)
    found = A.available_attention_modes(CPU)[M.FLASH_ATTN]  # Hopper: FA3 missing, FA4 next
    assert found.available and found.kernel.startswith("FA4")
    calls.clear()
    q, k, v = qkv(1, 40, keys, H=2, dtype=torch.bfloat16)
    out = A.attention(q, k, v, mode=M.FLASH_ATTN, where="blocks.0.audio_cross_attn")
    assert calls == ([keys] if to_fa4 else [])
    assert A.rerouted_attention_calls() == {}  # a speed route, not a correctness reroute
    assert relative_error(out, reference_attention(q, k, v)) < 1e-2
