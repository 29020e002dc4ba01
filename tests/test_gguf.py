"""GGUF files (city96-style conversions of the Wan DiT): the reader, Q8_0 kept as int8 with its
block scales (``gguf_q8_0``), Q4_0 / K-quants dequantized once, F16, and broken files.

Files are written with the ``gguf`` package itself (``gguf.quants.quantize`` + ``GGUFWriter``);
K-quants, which the package reads but cannot write, are random valid blocks written as raw
bytes. References are the package's own ``gguf.quants.dequantize``: a float model holding the
dequantized weights is what a loaded file must compute.
"""

from __future__ import annotations

import copy
import json
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import call, make_inputs

import wanstudio as ws
from wanstudio.errors import CheckpointError
from wanstudio.gguf_file import BLOCK_TYPES, SUPPORTED_TYPES, GGUFEntry, GGUFFile, read_blocks
from wanstudio.options import QuantMode
from wanstudio.quant import QuantizedLinear, QuantMix, q8_0, quantizable_linears, quantize_weight, sqnr_db

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _seeded(preset: str = "tiny-t2v") -> ws.WanModel:
    torch.manual_seed(0)
    return ws.WanModel(ws.WanConfig.preset(preset)).eval()


# fp16 fields of each K-quant block (byte offsets): d / dmin; the rest are codes and packed scales
_K_FP16_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(qtype: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Random valid blocks of a K-quant for an [n, k] weight: uint8 [n, k / 256 * block bytes].

    Codes and packed scales are random bytes (every pattern is valid); the fp16 super-block
    scales are small finite numbers, so the weights have trained-layer magnitudes."""
    per_block, nbytes = BLOCK_TYPES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n * k // per_block, nbytes), dtype=np.uint8)
    for off in _K_FP16_FIELDS[qtype]:
        d = (rng.uniform(0.5, 1.0, size=raw.shape[0]) * 2e-4).astype(np.float16)
        raw[:, off : off + 2] = d.view(np.uint8).reshape(-1, 2)
    return raw.reshape(n, -1)


def write_gguf(model: torch.nn.Module, path, qtype, *, per_layer=None, orig_shape=(), prefix="") -> dict:
    """The model as a GGUF file: 2-D weights whose rows hold whole blocks in ``qtype`` (or
    ``per_layer[name]``: a GGML type, or raw K-quant blocks), everything else F32, as
    city96's converter does. ``orig_shape``: names stored flattened to rows of 256 with a
    ``comfy.gguf.orig_shape`` key; ``prefix`` goes before every tensor name in the file.
    Returns {name: the dequantized weight the file holds}."""
    per_layer = per_layer or {}
    writer = gguf.GGUFWriter(str(path), arch="wan")
    held = {}
    for name, value in model.state_dict().items():
        a = value.float().numpy()
        kind = per_layer.get(name, qtype)
        if isinstance(kind, np.ndarray):  # raw K-quant blocks
            ktype = Q[per_layer[name + ":type"]]
            writer.add_tensor(prefix + name, kind, raw_dtype=ktype)
            held[name] = gguf.quants.dequantize(kind, ktype).reshape(a.shape)
            continue
        if name in orig_shape:
            writer.add_array(f"comfy.gguf.orig_shape.{prefix}{name}", list(a.shape))
            a = a.reshape(-1, 256)
        block = gguf.GGML_QUANT_SIZES[kind][0]
        if name.endswith(".weight") and value.dim() == 2 and a.shape[-1] % block == 0 and kind != Q.F32:
            data = gguf.quants.quantize(a, kind)
            writer.add_tensor(prefix + name, data, raw_dtype=kind)
            deq = a.astype(np.float16) if kind == Q.F16 else gguf.quants.dequantize(data, kind)
            held[name] = np.asarray(deq, dtype=np.float32).reshape(value.shape)
        else:
            writer.add_tensor(prefix + name, a)
            held[name] = a.reshape(value.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in held.items()}


def holding(model: ws.WanModel, weights: dict) -> ws.WanModel:
    """A float copy of ``model`` holding ``weights`` (the dequantizing reference)."""
    ref = copy.deepcopy(model)
    ref.load_state_dict({k: v.reshape(ref.state_dict()[k].shape) for k, v in weights.items()})
    return ref


def _out(model: ws.WanModel) -> torch.Tensor:
    with torch.no_grad():
        return call(model, make_inputs(model.config))


# --- the reader -------------------------------------------------------------------------------------
def test_reader_gives_torch_shapes_types_and_places(tmp_path):
    model = _seeded()
    write_gguf(model, tmp_path / "m.gguf", Q.Q8_0)
    f = GGUFFile(tmp_path / "m.gguf")
    assert f.metadata["general.architecture"] == "wan"
    sd = model.state_dict()
    assert list(f.entries) == list(sd)
    for name, entry in f.entries.items():
        assert entry.shape == tuple(sd[name].shape), name  # GGUF's dims reversed back
    ffn = f.entries["blocks.0.ffn.0.weight"]  # [512, 256]: a non-square weight
    assert isinstance(ffn, GGUFEntry) and ffn.ggml_type == "Q8_0" and ffn.nbytes == 512 * 256 // 32 * 34
    assert f.entries["patch_embedding.weight"].dtype == torch.float32  # 5-D, F32
    assert len(f.entries["patch_embedding.weight"].shape) == 5
    reader = gguf.GGUFReader(tmp_path / "m.gguf")  # the package's own view of the bytes
    t = next(t for t in reader.tensors if t.name == "blocks.0.ffn.0.weight")
    assert ffn.start == t.data_offset
    assert np.array_equal(read_blocks(ffn).numpy(), np.asarray(t.data))


def test_orig_shape_key_gives_the_real_shape(tmp_path):
    model = _seeded()
    name = "text_embedding.0.weight"  # [256, 64], stored as [64, 256]
    held = write_gguf(model, tmp_path / "m.gguf", Q.Q8_0, orig_shape=(name, "head.modulation"))
    entry = GGUFFile(tmp_path / "m.gguf").entries[name]
    assert entry.shape == (256, 64) and entry.stored_shape == (64, 256)
    mod = GGUFFile(tmp_path / "m.gguf").entries["head.modulation"]
    assert mod.shape == (1, 2, 256)  # F32 flattened to [2, 256] in the file
    loaded = ws.load_model(tmp_path / "m.gguf", dtype=torch.float32)
    assert torch.equal(loaded.head.modulation, held["head.modulation"])
    assert torch.equal(loaded.text_embedding[0].weight, held[name])


# --- Q8_0 kept as stored -------------------------------------------------------------------------
def test_q8_0_matches_ggml_bit_for_bit():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 96, generator=g) * 0.02
    w[0, :32] = 0  # an all-zero block
    w[1, :32] = torch.arange(-16, 16) + 0.5  # d = 1: every code a tie (GGML rounds away from 0)
    w[1, 31] = 127.0
    w[2, :32] = w[1, :32] * 1e-3  # the same ties through an inexact 1 / d
    q, d = q8_0.quantize_q8_0(w)
    ref = gguf.quants.quantize(w.numpy(), Q.Q8_0)
    assert np.array_equal(q8_0.to_gguf_blocks(q, d).numpy(), ref)
    assert np.array_equal(q8_0.dequantize_q8_0(q, d, 96).numpy(), gguf.quants.dequantize(ref, Q.Q8_0))
    back_q, back_d = q8_0.from_gguf_blocks(torch.from_numpy(ref), 40, 96)
    assert torch.equal(back_q, q) and torch.equal(back_d, d)
    assert np.array_equal(
        q8_0.blocks_to_float(torch.from_numpy(ref)).numpy(), gguf.quants.dequantize(ref, Q.Q8_0).ravel()
    )


def test_q8_0_format_pads_k_and_round_trips_its_state_dict():
    torch.manual_seed(0)
    lin = torch.nn.Linear(100, 24)  # K not a multiple of 32: zero-padded blocks
    layer = QuantizedLinear.from_linear(lin, QuantMode.GGUF_Q8_0)
    assert layer.weight_q8.shape == (24, 128) and layer.weight_scale.shape == (24, 4)
    assert layer.weight_scale.dtype == torch.float16 and layer.weight_nbytes == q8_0.q8_0_nbytes(24, 100)
    w = lin.weight.detach()
    ref = gguf.quants.dequantize(
        gguf.quants.quantize(torch.nn.functional.pad(w, (0, 28)).numpy(), Q.Q8_0), Q.Q8_0
    )
    assert torch.equal(layer.dequantized_weight(torch.float32), torch.from_numpy(ref)[:, :100])
    other = QuantizedLinear.empty(100, 24, QuantMode.GGUF_Q8_0, device="meta", dtype=torch.float32)
    other.load_state_dict(layer.state_dict(), assign=True)
    x = torch.randn(3, 100)
    assert torch.equal(other(x), layer(x))


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model."])
def test_prefixed_tensor_names_load_as_the_plain_file(tmp_path, prefix):
    """ComfyUI-saved GGUF files carry the checkpoint's key prefix; the key table strips it as it
    does for safetensors."""
    model = _seeded("tiny-infinitetalk")
    write_gguf(model, tmp_path / "plain.gguf", Q.Q8_0)
    write_gguf(model, tmp_path / "prefixed.gguf", Q.Q8_0, prefix=prefix)
    plain = ws.load_model(tmp_path / "plain.gguf", dtype=torch.float32).state_dict()
    prefixed = ws.load_model(tmp_path / "prefixed.gguf", dtype=torch.float32).state_dict()
    assert list(prefixed) == list(plain)
    for name, tensor in plain.items():
        assert torch.equal(prefixed[name], tensor), name


def test_q8_0_file_runs_as_stored(tmp_path):
    model = _seeded("tiny-infinitetalk")
    held = write_gguf(model, tmp_path / "q8.gguf", Q.Q8_0)
    loaded = ws.load_model(tmp_path / "q8.gguf", dtype=torch.float32)
    assert loaded.quantization is QuantMode.GGUF_Q8_0
    assert loaded.checkpoint_info.formats == ["gguf"]
    assert loaded.checkpoint_info.storage["gguf Q8_0"] > 0
    f = GGUFFile(tmp_path / "q8.gguf")
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantizedLinear)}
    assert set(layers) == {n for n, _ in quantizable_linears(model)}
    for name, layer in layers.items():  # the file's blocks, byte for byte
        raw = read_blocks(f.entries[name + ".weight"])
        assert torch.equal(q8_0.to_gguf_blocks(layer.weight_q8, layer.weight_scale), raw), name
    # text_embedding etc. (kept in base precision) hold the dequantized Q8_0 weight
    assert torch.equal(loaded.text_embedding[0].weight, held["text_embedding.0.weight"])
    reference = holding(model, held)
    ref_out, out, float_out = _out(reference), _out(loaded), _out(model)
    assert sqnr_db(ref_out, out) > 100  # the same numbers, up to GEMM order
    bar = sqnr_db(float_out, ref_out) - 2.0  # ~48 dB on this model
    assert sqnr_db(float_out, out) >= bar > 40


# --- the other types: dequantized once --------------------------------------------------------------
@pytest.mark.parametrize("qtype", ["Q4_0", "F16"])
def test_q4_0_and_f16_files_are_dequantized_once(tmp_path, qtype):
    model = _seeded()
    held = write_gguf(model, tmp_path / "m.gguf", Q[qtype])
    loaded = ws.load_model(tmp_path / "m.gguf", dtype=torch.float32)
    assert loaded.quantization is QuantMode.DISABLED
    assert not any(isinstance(m, QuantizedLinear) for m in loaded.modules())
    assert torch.equal(loaded.blocks[1].ffn[2].weight, held["blocks.1.ffn.2.weight"])
    reference = holding(model, held)
    float_out, ref_out, out = _out(model), _out(reference), _out(loaded)
    assert sqnr_db(ref_out, out) > 100
    bar = sqnr_db(float_out, ref_out) - 2.0  # Q4_0 ~22 dB, F16 ~70 dB on this model
    assert sqnr_db(float_out, out) >= bar > (18 if qtype == "Q4_0" else 60)


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_dequantize_as_gguf_does(tmp_path, qtype):
    model = _seeded()
    per_layer = {}
    for i, (name, lin) in enumerate(quantizable_linears(model)):
        if lin.in_features % 256 == 0:
            per_layer[name + ".weight"] = random_blocks(qtype, lin.out_features, lin.in_features, seed=i)
            per_layer[name + ".weight:type"] = qtype
    held = write_gguf(model, tmp_path / "k.gguf", Q.F16, per_layer=per_layer)
    entry = GGUFFile(tmp_path / "k.gguf").entries["blocks.0.self_attn.q.weight"]
    assert entry.ggml_type == qtype and entry.nbytes == 256 * BLOCK_TYPES[qtype][1]
    loaded = ws.load_model(tmp_path / "k.gguf", dtype=torch.float32)
    for name in (n for n in per_layer if not n.endswith(":type")):
        layer = loaded.get_submodule(name.rpartition(".")[0])
        assert torch.equal(layer.weight, held[name]), name  # gguf.quants.dequantize's numbers
    assert sqnr_db(_out(holding(model, held)), _out(loaded)) > 100
    # a requested mode quantizes the dequantized weight
    q8 = ws.load_model(tmp_path / "k.gguf", dtype=torch.float32, quantization="gguf_q8_0")
    expected = quantize_weight(held["blocks.0.self_attn.q.weight"], QuantMode.GGUF_Q8_0)
    assert torch.equal(q8.blocks[0].self_attn.q.weight_q8, expected["weight_q8"])


def test_a_mixed_gguf_file_runs_each_layer_as_stored(tmp_path):
    model = _seeded()
    ffn = {f"blocks.{i}.ffn.{j}.weight": Q.Q4_K for i in range(2) for j in (0, 2)}
    per_layer = {}
    for name in ffn:
        w = model.state_dict()[name]
        per_layer[name] = random_blocks("Q4_K", *w.shape, seed=len(per_layer))
        per_layer[name + ":type"] = "Q4_K"
    held = write_gguf(model, tmp_path / "mix.gguf", Q.Q8_0, per_layer=per_layer)
    loaded = ws.load_model(tmp_path / "mix.gguf", dtype=torch.float32)
    assert isinstance(loaded.quantization, QuantMix) and loaded.quantization.value == "mixed"
    assert loaded.quantization.modes == {QuantMode.GGUF_Q8_0: 16, QuantMode.DISABLED: 4}
    assert type(loaded.blocks[0].ffn[0]) is torch.nn.Linear
    assert isinstance(loaded.blocks[0].self_attn.q, QuantizedLinear)
    assert sqnr_db(_out(holding(model, held)), _out(loaded)) > 100
    info = ws.checkpoints.describe_checkpoint(tmp_path / "mix.gguf")
    assert "blocks.*.ffn: 4 gguf Q4_K" in info and "blocks.*.self_attn: 8 gguf Q8_0" in info
    assert "model: tiny-t2v" in info and "mixed layers: gguf_q8_0 x 16, disabled x 4" in info


# --- broken files ----------------------------------------------------------------------------------
def _info_at(data: bytes, name: str) -> int:
    """Byte offset of the tensor-info record after ``name`` (n_dims, dims, type, offset)."""
    key = struct.pack("<Q", len(name)) + name.encode()
    pos = data.index(key)
    return pos + len(key)


@pytest.fixture
def q8_file(tmp_path):
    write_gguf(_seeded(), tmp_path / "m.gguf", Q.Q8_0)
    return tmp_path / "m.gguf"


def _patched(path, name: str, field: str, value: int):
    data = bytearray(path.read_bytes())
    at = _info_at(bytes(data), name)
    (n_dims,) = struct.unpack_from("<I", data, at)
    where = {
        "dim0": (at + 4, "<Q"),
        "type": (at + 4 + 8 * n_dims, "<I"),
        "offset": (at + 8 + 8 * n_dims, "<Q"),
    }
    pos, fmt = where[field]
    struct.pack_into(fmt, data, pos, value)
    path.write_bytes(bytes(data))


def test_an_unsupported_type_is_named_with_the_supported_ones(q8_file):
    _patched(q8_file, "blocks.0.self_attn.q.weight", "type", int(Q.IQ2_XXS))
    with pytest.raises(
        CheckpointError, match=r"m\.gguf: tensor 'blocks\.0\.self_attn\.q\.weight': GGML type IQ2_XXS"
    ) as e:
        ws.load_model(q8_file)
    assert ", ".join(SUPPORTED_TYPES) in str(e.value)
    _patched(q8_file, "blocks.0.self_attn.q.weight", "type", 99)
    with pytest.raises(CheckpointError, match="unknown type id 99 is not supported"):
        ws.load_model(q8_file)


def test_truncated_and_corrupt_files_are_checkpoint_errors(q8_file, tmp_path):
    data = q8_file.read_bytes()
    cases = {
        "truncated.gguf": (data[: len(data) - 100], "the file is truncated"),
        "header.gguf": (data[:300], "the GGUF header runs to byte"),
        "short.gguf": (data[:20], "too short to be a GGUF file"),
        "version.gguf": (data[:4] + struct.pack("<I", 1) + data[8:], "not a readable GGUF file"),
        "kv_count.gguf": (data[:16] + struct.pack("<Q", 2**60) + data[24:], "the GGUF header runs to byte"),
    }
    for name, (content, problem) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=problem) as e:
            ws.load_model(tmp_path / name)
        assert name in str(e.value)


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("offset", 3, "not a multiple of the file's alignment"),
        ("offset", 0, "overlap tensor"),
        ("dim0", 100, "not a readable GGUF file|rows of 100 Q8_0 weights are not whole blocks"),
        ("offset", 2**40, "the file is truncated"),
    ],
)
def test_a_corrupt_tensor_table_names_the_tensor(q8_file, field, value, problem):
    _patched(q8_file, "blocks.1.ffn.2.weight", field, value)
    with pytest.raises(CheckpointError, match=problem):
        GGUFFile(q8_file)


def test_a_bad_orig_shape_is_refused(tmp_path):
    model = _seeded()
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), arch="wan")
    writer.add_array("comfy.gguf.orig_shape.x", [3, 5])
    writer.add_tensor("x", np.zeros((2, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"orig_shape\.x = \[3, 5\] does not hold its 16 elements"):
        GGUFFile(tmp_path / "m.gguf")
    del model


# --- memory --------------------------------------------------------------------------------------------
_RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys, gc
    import torch
    import wanstudio as ws

    def status_kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    cfg = ws.WanConfig(**json.loads(sys.argv[2]))
    ws.WanModel(cfg, device="meta")
    import gguf  # imported before the baseline, like wanstudio itself
    gc.collect()
    before = status_kib("VmHWM")
    model = ws.load_model(sys.argv[1], config=cfg, dtype=torch.bfloat16)
    peak = status_kib("VmHWM")
    size = sum(t.nbytes for t in model.state_dict().values())
    print(json.dumps({"peak_delta": peak - before, "model_bytes": size}))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_peak_host_memory_stays_near_one_copy_of_the_loaded_model(tmp_path, qtype):
    cfg = dict(dim=768, ffn_dim=3072, num_heads=6, num_layers=8, text_dim=256)
    torch.manual_seed(0)
    model = ws.WanModel(ws.WanConfig(**cfg), dtype=torch.bfloat16)
    per_layer = {}
    if qtype == "Q4_K":  # the K-quant layers: random blocks (dequantized at load to bf16)
        for i, (name, lin) in enumerate(quantizable_linears(model)):
            per_layer[name + ".weight"] = random_blocks("Q4_K", lin.out_features, lin.in_features, seed=i)
            per_layer[name + ".weight:type"] = "Q4_K"
    write_gguf(model, tmp_path / "big.gguf", Q.Q8_0, per_layer=per_layer)
    del model, per_layer
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / "big.gguf"), json.dumps(cfg)],
        capture_output=True,
        text=True,
        check=True,
    )
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = figures["peak_delta"] / figures["model_bytes"]
    print(f"{qtype}: peak RSS growth {ratio:.2f}x the loaded model")
    assert ratio < 1.3


@pytest.mark.slow
def test_random_header_damage_is_a_checkpoint_error_or_a_valid_file(tmp_path):
    """Byte flips anywhere in the header and tensor table: the reader either reads a file it
    validated or raises CheckpointError (never another exception, never a hang)."""
    model = _seeded()
    write_gguf(model.blocks[0].ffn, tmp_path / "ok.gguf", Q.Q8_0, orig_shape=("0.weight",))
    data = (tmp_path / "ok.gguf").read_bytes()
    header = GGUFFile(tmp_path / "ok.gguf").entries["0.weight"].start  # header + table + padding
    rng = np.random.default_rng(0)
    outcomes = {"ok": 0, "refused": 0}
    for i in range(300):
        damaged = bytearray(data)
        for pos in rng.integers(0, header, size=rng.integers(1, 4)):
            damaged[pos] = int(rng.integers(0, 256))
        path = tmp_path / f"d{i}.gguf"
        path.write_bytes(bytes(damaged))
        try:
            f = GGUFFile(path)
        except CheckpointError as e:
            assert path.name in str(e)
            outcomes["refused"] += 1
        else:
            assert all(e.start + e.nbytes <= len(damaged) for e in f.entries.values())
            outcomes["ok"] += 1
        path.unlink()
    print(outcomes)
    assert outcomes["refused"] > 50
