"""wanstudio.weights: the one safetensors reader, shard resolution and fp8 dequantization.

Each hostile file below once loaded as garbage or leaked a generic exception (TypeError,
OSError, RecursionError, RuntimeError, IndexError); each must now be a ``CheckpointError``
naming the file, the key and the problem. ``test_fuzz_checkpoints.py`` covers the space
around these examples.
"""

from __future__ import annotations

import json
import struct
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import wanstudio as ws
from wanstudio.checkpoints import load_model, scan_checkpoint
from wanstudio.encoders.weights import read_state_dict
from wanstudio.errors import CheckpointError, ConfigError
from wanstudio.weights import SafetensorsFile, dequantize_fp8, read_tensor, resolve_files

DATA = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)  # a = [1, 2], b = [3, 4]


def _entries(**changes) -> dict:
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
    }
    for key, fields in changes.items():
        header[key] = fields if not isinstance(fields, dict) else {**header.get(key, {}), **fields}
    return header


def _write(path, header: dict | str | bytes, data: bytes = DATA, *, hlen_delta: int = 0):
    """A safetensors file with exactly this header (JSON text as given, else json.dumps)."""
    text = (
        header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header))
    )
    text = text.encode() if isinstance(text, str) else text
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text) + hlen_delta) + text + data)
    return path


def _refused(path, *, key: str | None, problem: str) -> None:
    """The library refuses the file; so do we, with a CheckpointError naming file, key, problem."""
    with pytest.raises(Exception):  # noqa: B017 - the oracle refuses it, whatever its exception
        load_file(path)
    with pytest.raises(CheckpointError, match=problem) as err:
        st = SafetensorsFile(path)
        [read_tensor(e) for e in st.entries.values()]
    assert path.name in str(err.value)
    if key is not None:
        assert repr(key) in str(err.value)


def test_a_valid_file_reads_like_the_library(tmp_path):
    path = _write(tmp_path / "ok.safetensors", _entries())
    st = SafetensorsFile(path)
    assert st.keys() == ["a", "b"]
    expected = load_file(path)
    for key, entry in st.entries.items():
        assert torch.equal(read_tensor(entry), expected[key])
    assert st.read_all().keys() == expected.keys()


# --- B.1: offsets must tile the data area ---------------------------------------------------------
def test_two_keys_over_the_same_bytes_are_refused_not_aliased(tmp_path):
    path = _write(tmp_path / "alias.safetensors", _entries(b={"data_offsets": [0, 8]}), DATA[:8])
    _refused(path, key="b", problem="overlaps tensor 'a'")


def test_a_negative_offset_is_refused_instead_of_reading_header_bytes(tmp_path):
    path = _write(
        tmp_path / "neg.safetensors", _entries(a={"data_offsets": [-8, 0]}, b={"data_offsets": [0, 8]})
    )
    _refused(path, key="a", problem="non-negative integers")


def test_a_header_length_short_by_its_padding_is_refused_instead_of_shifting_every_tensor(tmp_path):
    text = json.dumps(_entries()).encode()
    pad = 8 - len(text) % 8 or 8
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + b" " * pad + DATA)  # length without padding
    _refused(path, key=None, problem=f"{pad} bytes after tensor 'b' belong to no tensor")


def test_offsets_that_end_before_they_begin_are_refused(tmp_path):
    path = _write(tmp_path / "rev.safetensors", _entries(b={"data_offsets": [16, 8]}))
    _refused(path, key="b", problem=r"data_offsets \[16, 8\] end before they begin")


def test_data_bytes_that_belong_to_no_tensor_are_refused(tmp_path):
    gap = _write(tmp_path / "gap.safetensors", _entries(a={"shape": [1], "data_offsets": [0, 4]}))
    _refused(gap, key="b", problem="leaves data bytes 4..8 unclaimed")
    tail = _write(tmp_path / "tail.safetensors", _entries(), DATA + b"\0" * 8)
    _refused(tail, key=None, problem="8 bytes after tensor 'b' belong to no tensor")


def test_a_byte_count_that_disagrees_with_the_shape_is_refused_when_the_header_is_read(tmp_path):
    path = _write(tmp_path / "count.safetensors", _entries(a={"shape": [3]}))
    with pytest.raises(CheckpointError, match=r"'a': shape \[3\] of F32 needs 12 bytes but data_offsets"):
        SafetensorsFile(path)  # before any read_tensor


# --- B.2: every malformed header is a CheckpointError ----------------------------------------------
@pytest.mark.parametrize(
    "name, header, key, problem",
    [
        ("entry-is-a-number", _entries(a=5), "a", "expected an object with dtype, shape and data_offsets"),
        ("nested-shape", _entries(a={"shape": [[2]]}), "a", "shape must be a list of non-negative integers"),
        ("three-offsets", _entries(a={"data_offsets": [0, 8, 8]}), "a", "two non-negative integers"),
        ("dtype-as-list", _entries(a={"dtype": ["F32"]}), "a", "unknown dtype"),
        ("bool-shape", _entries(a={"shape": [True, 2]}), "a", "list of non-negative integers"),
        ("negative-shape", _entries(a={"shape": [-2]}), "a", "list of non-negative integers"),
        ("2**62-elements", _entries(a={"shape": [2**62]}), "a", r"needs 18446744073709551616 bytes"),
        ("huge-shape", _entries(a={"shape": [2**64, 0]}), "a", r"exceeds 2\*\*63 - 1"),
        ("offset-before-file-start", _entries(a={"data_offsets": [-(10**6), 8]}), "a", "non-negative"),
        ("missing-field", {"a": {"dtype": "F32", "shape": [2]}, "b": _entries()["b"]}, "a", "missing field"),
        (
            "duplicate-field",
            '{"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
            "a",
            "duplicate",
        ),
    ],
)
def test_a_malformed_entry_is_a_checkpoint_error_naming_the_key(tmp_path, name, header, key, problem):
    _refused(_write(tmp_path / f"{name}.safetensors", header), key=key, problem=problem)


@pytest.mark.parametrize("spelling", ["NaN", "Infinity", "-Infinity", "-0", "8.0", "1e1"])
def test_offsets_that_are_no_json_integers_are_refused(tmp_path, spelling):
    text = json.dumps(_entries()).replace("[0, 8]", f"[{spelling}, 8]")
    _refused(_write(tmp_path / "nan.safetensors", text), key="a", problem="two non-negative integers")


def test_ten_thousand_deep_nesting_is_refused_quickly(tmp_path):
    text = '{"a":' + "[" * 10_000 + "]" * 10_000 + "}"
    start = time.perf_counter()
    _refused(_write(tmp_path / "deep.safetensors", text), key=None, problem="nested too deeply")
    assert time.perf_counter() - start < 1.0


def test_duplicate_keys_are_refused(tmp_path):
    # the library keeps the last "a" (which alone leaves bytes 0..8 unclaimed): both refuse
    text = '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"\\u0061":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}'
    _refused(_write(tmp_path / "dup.safetensors", text), key=None, problem="key 'a' appears twice")


def test_a_header_that_is_not_utf8_json_is_refused(tmp_path):
    bad = json.dumps(_entries()).encode().replace(b'"a"', b'"a\xff"')
    _refused(_write(tmp_path / "utf8.safetensors", bad), key=None, problem="not UTF-8")
    surrogate = json.dumps(_entries()).replace('"a"', '"\\ud800"')
    _refused(_write(tmp_path / "sur.safetensors", surrogate), key=None, problem="lone UTF-16 surrogate")


def test_metadata_must_map_strings_to_strings(tmp_path):
    header = {"__metadata__": {"format": 1}, **_entries()}
    _refused(
        _write(tmp_path / "meta.safetensors", header), key=None, problem="'format' has the non-string value"
    )
    ok = _write(tmp_path / "ok.safetensors", {"__metadata__": {"format": "pt"}, **_entries()})
    assert SafetensorsFile(ok).metadata == {"format": "pt"}


def test_stricter_than_the_library_on_extra_fields_and_sub_byte_dtypes(tmp_path):
    extra = _write(tmp_path / "extra.safetensors", _entries(a={"note": "x"}))
    assert set(load_file(extra)) == {"a", "b"}  # the library ignores the field ...
    with pytest.raises(CheckpointError, match="'a': unexpected field 'note'"):
        SafetensorsFile(extra)  # ... we do not: a writer we do not know made it
    f4 = _write(tmp_path / "f4.safetensors", _entries(a={"dtype": "F4", "shape": [16]}))
    with pytest.raises(CheckpointError, match="dtype F4 is not supported by wanstudio"):
        SafetensorsFile(f4)


# --- B.3: the DiT loader ------------------------------------------------------------------------------
def _tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in ws.WanModel(ws.WanConfig.preset("tiny-t2v")).state_dict().items()}


def test_one_renamed_block_key_is_named_instead_of_building_ten_thousand_layers(tmp_path):
    sd = _tiny_state()
    sd["blocks.9999.norm3.weight"] = sd.pop("blocks.1.norm3.weight")
    save_file(sd, tmp_path / "dit.safetensors")
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "dit.safetensors")
    assert time.perf_counter() - start < 5.0
    msg = str(err.value)
    assert "dit.safetensors" in msg
    assert "blocks.9999.norm3.weight: block ids run 0..1 then jump to 9999; a renamed or foreign key?" in msg


def test_block_ids_must_run_from_zero_with_the_same_tensors_in_every_block():
    shapes = {k: tuple(v.shape) for k, v in _tiny_state().items()}
    no_zero = {k.replace("blocks.0.", "blocks.2."): v for k, v in shapes.items()}
    with pytest.raises(ConfigError, match="block ids start at 1, not 0"):
        ws.WanConfig.from_state_dict(no_zero)
    moved = dict(shapes)
    moved["blocks.2.norm3.weight"] = moved.pop("blocks.1.norm3.weight")  # ids still 0..2
    with pytest.raises(ConfigError, match=r"blocks\.1\.norm3\.weight is missing"):
        ws.WanConfig.from_state_dict(moved)
    padded = {k.replace("blocks.1.", "blocks.01."): v for k, v in shapes.items()}
    with pytest.raises(ConfigError, match="leading zero"):
        ws.WanConfig.from_state_dict(padded)


@pytest.mark.parametrize(
    "key, tensor",
    [
        ("patch_embedding.weight", torch.tensor(1.0)),  # shape [] on a weight: was an IndexError
        ("time_embedding.0.weight", torch.zeros(256)),  # wrong rank: was an IndexError
        ("patch_embedding.weight", torch.zeros(256, 16, 1, 0, 2)),  # a zero dim: was a ZeroDivisionError
    ],
)
def test_a_weight_of_the_wrong_rank_is_a_checkpoint_error(tmp_path, key, tensor):
    sd = _tiny_state()
    sd[key] = tensor
    save_file(sd, tmp_path / "dit.safetensors")
    with pytest.raises(
        CheckpointError, match=rf"dit\.safetensors: cannot infer the model config: {key} has shape"
    ):
        load_model(tmp_path / "dit.safetensors")


def test_two_keys_naming_one_official_tensor_are_refused(tmp_path):
    sd = _tiny_state()
    sd["model.diffusion_model.head.modulation"] = sd["head.modulation"].clone()
    save_file(sd, tmp_path / "dit.safetensors")
    with pytest.raises(CheckpointError, match="both name the tensor 'head.modulation'"):
        scan_checkpoint(tmp_path / "dit.safetensors")


# --- shards and fp8, shared by the DiT and the encoders ---------------------------------------------
def _shards(folder, order: list[str]) -> None:
    folder.mkdir()
    weight_map = {}
    for i, name in enumerate(order):
        save_file({f"t{i}": torch.full((2,), float(i))}, folder / name)
        weight_map[f"t{i}"] = name
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_both_loaders_list_shards_sorted_by_name(tmp_path):
    _shards(tmp_path / "m", ["model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors"])
    expected = [tmp_path / "m" / f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    assert resolve_files(tmp_path / "m") == expected
    assert scan_checkpoint(tmp_path / "m")[1].files == expected
    assert sorted(read_state_dict(tmp_path / "m")) == ["t0", "t1"]


def test_a_missing_shard_is_named_by_the_encoders_too(tmp_path):
    _shards(tmp_path / "m", ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    (tmp_path / "m" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"1 of 2 shards are missing beside the index"):
        read_state_dict(tmp_path / "m")


def test_two_indexes_in_one_folder_are_ambiguous(tmp_path):
    _shards(tmp_path / "m", ["model.safetensors"])
    (tmp_path / "m" / "other.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(CheckpointError, match="2 shard indexes"):
        resolve_files(tmp_path / "m")


def test_encoders_read_safetensors_through_the_validating_reader(tmp_path):
    path = _write(tmp_path / "alias.safetensors", _entries(b={"data_offsets": [0, 8]}), DATA[:8])
    with pytest.raises(CheckpointError, match="overlaps tensor 'a'"):
        read_state_dict(path)


def test_fp8_dequantization_takes_a_per_tensor_or_per_row_scale():
    w = torch.tensor([[1.0, -2.0], [0.5, 4.0], [3.0, 1.0]]).to(torch.float8_e4m3fn)
    assert torch.equal(dequantize_fp8("w", w, None), w.float())
    assert torch.equal(dequantize_fp8("w", w, torch.tensor([2.0])), w.float() * 2)
    rows = torch.tensor([1.0, 2.0, 4.0])
    assert torch.equal(dequantize_fp8("w", w, rows), w.float() * rows[:, None])
    with pytest.raises(CheckpointError, match=r"x\.safetensors: w: fp8 scale of shape \(2,\) fits neither"):
        dequantize_fp8("w", w, torch.ones(2), source="x.safetensors")


def test_the_dit_loader_refuses_an_fp8_scale_of_the_wrong_shape(tmp_path):
    sd = _tiny_state()
    w = sd["text_embedding.0.weight"]  # keep-listed: dequantized by _real_tensor
    sd["text_embedding.0.weight"] = w.to(torch.float8_e4m3fn)
    sd["text_embedding.0.scale_weight"] = torch.ones(w.shape[0] - 1)  # was a broadcast RuntimeError
    save_file(sd, tmp_path / "dit.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"dit\.safetensors: scale 'text_embedding\.0\.scale_weight' has shape \[255\], but "
        r"float8_e4m3fn weight 'text_embedding\.0\.weight' of shape \[256, 64\] needs one value "
        r"\(per tensor\) or 256 \(one per output row\)",
    ):
        load_model(tmp_path / "dit.safetensors", quantization="fp8_e4m3fn_scaled")


def _no_reads(monkeypatch):
    """Make any tensor read fail: the refusals below come from the headers alone."""

    def read(*args, **kwargs):
        raise AssertionError("a tensor was read before the refusal")

    monkeypatch.setattr("wanstudio.checkpoints.read_tensor", read)


@pytest.mark.parametrize("rows", [255, 257])
def test_a_layer_scale_of_the_wrong_shape_is_refused_before_any_tensor_is_read(tmp_path, monkeypatch, rows):
    sd = _tiny_state()  # a quantizable layer, stored scaled-fp8 (was refused after streaming 39 tensors)
    sd["blocks.1.ffn.2.weight"] = sd["blocks.1.ffn.2.weight"].to(torch.float8_e4m3fn)
    sd["blocks.1.ffn.2.scale_weight"] = torch.ones(rows)
    save_file(sd, tmp_path / "dit.safetensors")
    _no_reads(monkeypatch)
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "dit.safetensors")
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'dit.safetensors'}: scale 'blocks.1.ffn.2.scale_weight' has shape")
    assert (
        "weight 'blocks.1.ffn.2.weight' of shape [256, 512]" in msg and "or 256 (one per output row)" in msg
    )


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.int8])
def test_an_integer_weight_is_refused_naming_file_and_key_not_truncated(tmp_path, monkeypatch, dtype):
    sd = _tiny_state()
    sd["model.diffusion_model.blocks.0.self_attn.k.weight"] = sd.pop("blocks.0.self_attn.k.weight").to(dtype)
    save_file(sd, tmp_path / "dit.safetensors")
    _no_reads(monkeypatch)
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "dit.safetensors")
    msg = str(err.value)
    kind = str(dtype).removeprefix("torch.")
    key = "'model.diffusion_model.blocks.0.self_attn.k.weight' (read as blocks.0.self_attn.k.weight)"
    assert msg.startswith(f"{tmp_path / 'dit.safetensors'}: tensor {key} is {kind}")
    assert "the model needs a floating-point tensor here" in msg
    assert (f"{kind} without a scale" in msg) == (dtype == torch.int8)


def test_model_fit_errors_name_the_file_that_holds_the_tensor(tmp_path):
    sd = _tiny_state()
    base = {k: v for k, v in sd.items() if not k.startswith("blocks.1.")}
    top = {k: v for k, v in sd.items() if k.startswith("blocks.1.")}
    save_file(base, tmp_path / "a.safetensors")
    top["blocks.1.ffn.0.bias"] = torch.zeros(3)  # inferred config: ffn_dim 512 from block 0
    save_file(top, tmp_path / "b.safetensors")
    files = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    with pytest.raises(CheckpointError) as err:
        load_model(files)
    msg = str(err.value)
    assert msg.startswith(f"{files[1]}: 1 tensors have the wrong shape for the inferred config")
    assert (
        f"blocks.1.ffn.0.bias: expected (512,), found (3,) (key 'blocks.1.ffn.0.bias' in {files[1]})" in msg
    )
    assert "corrupt or was edited" in msg

    top["blocks.1.ffn.0.bias"] = sd["blocks.1.ffn.0.bias"]
    top["blocks.7.norm3.weight"] = top.pop("blocks.1.norm3.weight")  # a stray block id
    save_file(top, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_model(files)
    assert str(err.value).startswith(f"{files[1]}: cannot infer the model config: blocks.7.norm3.weight")

    top["blocks.1.norm3.weight"] = top.pop("blocks.7.norm3.weight")
    top["blocks.1.ffn.0.biasx"] = top["blocks.1.ffn.0.bias"].clone()
    save_file(top, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_model(files, config="tiny-t2v")
    msg = str(err.value)
    assert msg.startswith(f"{files[1]}: the checkpoint does not match the t2v model (2 layers, dim 256):")
    assert "1 unexpected keys, e.g. blocks.1.ffn.0.biasx" in msg and "To fix: " in msg


def test_an_invalid_inferred_config_names_the_tensor_it_came_from(tmp_path):
    sd = _tiny_state()
    sd["time_embedding.0.weight"] = torch.zeros(256, 255)  # freq_dim 255: odd
    save_file(sd, tmp_path / "dit.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "dit.safetensors")
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'dit.safetensors'}: cannot infer the model config: invalid WanConfig")
    assert "freq_dim must be even, got 255 (read from time_embedding.0.weight [256, 255])" in msg
