"""A seeded structural fuzzer for safetensors checkpoints, with the ``safetensors`` library as oracle.

Each case starts from a valid file written by the library, applies 1-3 structural mutations
(header JSON: offsets, shapes, dtypes, value types, duplicated / deleted / extra fields and
keys, deep nesting, NaN, metadata, renamed keys; bytes: header length +/-, truncation,
appended bytes, padding, invalid UTF-8, number spellings) and checks the rule:

* the library refuses the file -> ``SafetensorsFile`` + ``read_tensor`` raise ``CheckpointError``;
* the library loads it -> ours loads the same keys, dtypes, shapes and bytes, or refuses it
  with ``CheckpointError`` for one of the documented stricter reasons (``STRICTER``);
* ``wanstudio.load_model`` (on the loader seeds) returns a model whose tensors are the
  library's, or raises ``CheckpointError``; nothing else may escape;
* every ``CheckpointError`` names the file by its path (a model-fit error too: a user with
  several shards must learn which one to replace).

Each case is timed on wanstudio's call alone (``SafetensorsFile`` + ``read_tensor``, or
``load_model`` on the loader cases), not on the oracle's work (the library's ``load_file``,
the comparisons); reports give the slowest refusal and the slowest load apart.

Used by ``tests/test_fuzz_checkpoints.py`` (a few hundred cases) and
``benchmarks/fuzz_checkpoints.py`` (thousands, counts by outcome).
"""

from __future__ import annotations

import json
import random
import re
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save

import wanstudio as ws
from wanstudio.checkpoints import load_model, scan_checkpoint
from wanstudio.errors import CheckpointError
from wanstudio.options import QuantMode
from wanstudio.weights import SafetensorsFile, read_tensor

# Refusals of files the library loads that wanstudio documents (weights.py's docstring).
STRICTER = (
    "appears twice",
    "duplicate field",
    "unexpected field",
    "is not supported by wanstudio",
    "exceeds 2**63 - 1",
)
# the dtype names the library knows (its error for an unknown one lists them)
LIBRARY_DTYPES = [
    *("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0"),
    *("F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32"),
    *("C64", "F64", "I64", "U64"),
]
_SAME_SIZE = (
    ("U8", "I8", "BOOL", "F8_E4M3", "F8_E5M2", "F8_E8M0"),
    ("F16", "BF16", "I16", "U16"),
    ("F32", "I32", "U32"),
    ("F64", "I64", "U64", "C64"),
)


# --- seeds -----------------------------------------------------------------------------------------
def small_state() -> dict[str, torch.Tensor]:
    """A few tensors of many dtypes and shapes, with blocks.N.* keys, a scalar and an empty one."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 8, generator=g)
    return {
        "blocks.0.self_attn.q.weight": torch.randn(4, 4, generator=g),
        "blocks.0.self_attn.q.bias": torch.randn(4, generator=g).bfloat16(),
        "blocks.0.norm3.weight": torch.randn(4, generator=g).half(),
        "blocks.1.ffn.0.weight": (w / 2).to(torch.float8_e4m3fn),
        "blocks.1.ffn.0.scale_weight": torch.full((4,), 2.0),
        "head.modulation": torch.randn(1, 2, 4, generator=g),
        "step": torch.tensor(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "ids": torch.arange(4, dtype=torch.int32).reshape(2, 2),
    }


def tiny_model_state(preset: str = "tiny-t2v") -> dict[str, torch.Tensor]:
    """A whole tiny model in bf16 (the loader seed): load_model infers its config."""
    torch.manual_seed(0)
    model = ws.WanModel(ws.WanConfig.preset(preset))
    return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}


# --- a header we can break -------------------------------------------------------------------------
class Obj(list):
    """A JSON object as a list of [key, value] pairs (so keys may repeat)."""


class Raw(str):
    """JSON text written as is (NaN, -0, deep nesting, escaped keys)."""


def _dump(v) -> str:
    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, Obj):
        return "{" + ",".join(_dump(k if isinstance(k, Raw) else str(k)) + ":" + _dump(x) for k, x in v) + "}"
    if isinstance(v, list):
        return "[" + ",".join(_dump(x) for x in v) + "]"
    return json.dumps(v)


@dataclass
class Case:
    header: object  # an Obj, or anything else when the top level itself is mutated
    data: bytes
    byte_ops: list[Callable[[bytes, int], bytes]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def build(self) -> bytes:
        text = _dump(self.header).encode("utf-8", "surrogatepass")
        text += b" " * (-len(text) % 8)  # the library pads its headers to 8 bytes
        blob = struct.pack("<Q", len(text)) + text + self.data
        for op in self.byte_ops:
            blob = op(blob, len(text))
        return blob


def parse_seed(blob: bytes) -> Case:
    (hlen,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + hlen], object_pairs_hook=lambda p: Obj([list(x) for x in p]))
    return Case(header, blob[8 + hlen :])


def _tensors(case: Case) -> list[list]:
    h = case.header
    return [p for p in h if p[0] != "__metadata__" and isinstance(p[1], Obj)] if isinstance(h, Obj) else []


def _field(entry: Obj, name: str):
    return next((v for k, v in entry if k == name), None)


def _set(entry: Obj, name: str, value) -> None:
    for pair in entry:
        if pair[0] == name:
            pair[1] = value
            return
    entry.append([name, value])


def _ints(value) -> list[int]:
    """``value`` when it is a list of ints (an intact shape / offsets), else []."""
    return list(value) if isinstance(value, list) and all(type(x) is int for x in value) else []


def _offsets(entry: Obj) -> tuple[int, int]:
    offs = _ints(_field(entry, "data_offsets"))
    return (offs[0], offs[1]) if len(offs) == 2 else (0, 0)


def _pick(rng: random.Random, case: Case):
    pairs = _tensors(case)
    return rng.choice(pairs) if pairs else None


# --- header mutations ------------------------------------------------------------------------------
def m_offsets(rng, case):
    pair = _pick(rng, case)
    if pair is None:
        return
    b, e = _offsets(pair[1])
    other = _offsets(_pick(rng, case)[1])
    n = len(case.data)
    nums = [
        0,
        b,
        e,
        b - 1,
        b + 1,
        e - 1,
        e + 1,
        -1,
        -8,
        -(10**6),
        n,
        n + 1,
        2**62,
        2**63,
        2**64 - 1,
        2**64,
        *other,
    ]
    special = [
        [b, e, e],
        [b],
        [],
        [[b], e],
        [Raw("NaN"), e],
        [b, Raw("Infinity")],
        [Raw("-Infinity"), e],
        [Raw("-0"), e],
        [float(b), e],
        [str(b), e],
        [True, e],
        None,
        f"{b},{e}",
        Obj([["begin", b]]),
    ]
    value = rng.choice(special) if rng.random() < 0.4 else [rng.choice(nums), rng.choice(nums)]
    _set(pair[1], "data_offsets", value)


def m_swap_offsets(rng, case):
    if (pair := _pick(rng, case)) is not None:
        _set(pair[1], "data_offsets", list(_offsets(pair[1]))[::-1])


def m_alias(rng, case):
    """Two keys point at the same bytes (the second keeps or copies the first's dtype/shape)."""
    a, b = _pick(rng, case), _pick(rng, case)
    if a is None or a is b:
        return
    _set(b[1], "data_offsets", _field(a[1], "data_offsets"))
    if rng.random() < 0.7:
        _set(b[1], "dtype", _field(a[1], "dtype"))
        _set(b[1], "shape", _field(a[1], "shape"))


def m_shift(rng, case):
    k = rng.choice([-8, -4, -1, 1, 2, 4, 8])
    for _, entry in _tensors(case):
        if offs := _ints(_field(entry, "data_offsets")):
            _set(entry, "data_offsets", [o + k for o in offs])


def m_shape(rng, case):
    pair = _pick(rng, case)
    if pair is None:
        return
    s = _ints(_field(pair[1], "shape"))
    i = rng.randrange(len(s)) if s else 0
    grown = [d * 2 if j == i else d for j, d in enumerate(s)] or [2]
    values = [
        [],
        [s],
        [-1, *s[1:]],
        [2**62],
        [2**62, 4],
        [2**64],
        [True] * max(1, len(s)),
        [str(d) for d in s] or ["1"],
        [float(d) for d in s] or [1.0],
        None,
        "2",
        Obj([]),
        [0],
        [0, 2**62],
        [0, 2**63],
        [2**32, 2**32, 0],
        [*s, 1],  # valid: same bytes
        s[::-1],  # valid when the bytes agree
        [max(1, len(case.data))],
        grown,
        [1] * 70 + s,
        [Raw("NaN")],
    ]
    _set(pair[1], "shape", rng.choice(values))


def m_reshape(rng, case):
    """Valid changes of a shape that keep its byte count (the library loads them)."""
    pair = _pick(rng, case)
    if pair is None or not (s := _ints(_field(pair[1], "shape"))):
        return
    count = 1
    for d in s:
        count *= d
    _set(pair[1], "shape", rng.choice([[count], [1, *s], s[::-1], [*s, 1]]))


def m_dtype(rng, case):
    if (pair := _pick(rng, case)) is None:
        return
    weird = ["f32", "F31", "", "F32 ", "float32", ["F32"], 32, None, True, Obj([["a", "F32"]])]
    _set(pair[1], "dtype", rng.choice(LIBRARY_DTYPES + weird))


def m_dtype_same_size(rng, case):
    if (pair := _pick(rng, case)) is None:
        return
    group = next((g for g in _SAME_SIZE if _field(pair[1], "dtype") in g), None)
    if group:
        _set(pair[1], "dtype", rng.choice(group))


def m_entry_type(rng, case):
    if (pair := _pick(rng, case)) is not None:
        pair[1] = rng.choice([1, "x", [1, 2], None, True, Raw("NaN"), Obj([]), 2.5])


def m_delete_field(rng, case):
    if (pair := _pick(rng, case)) is not None and pair[1]:
        pair[1].pop(rng.randrange(len(pair[1])))


def m_extra_field(rng, case):
    if (pair := _pick(rng, case)) is not None:
        pair[1].append([rng.choice(["x", "offsets", "Dtype"]), rng.choice([1, "y", None, Obj([])])])


def m_dup_field(rng, case):
    if (pair := _pick(rng, case)) is not None and pair[1]:
        k, v = rng.choice(pair[1])
        pair[1].append([k, v if rng.random() < 0.5 else rng.choice([[0, 0], "F32", [1]])])


def m_dup_key(rng, case):
    if (pair := _pick(rng, case)) is None:
        return
    key, entry = pair
    twin = Obj([list(p) for p in entry])
    if rng.random() < 0.5:  # the next bytes instead of the same ones
        b, e = _offsets(twin)
        _set(twin, "data_offsets", [e, 2 * e - b])
    spelled = Raw(f'"\\u{ord(key[0]):04x}' + json.dumps(key[1:])[1:]) if key and rng.random() < 0.3 else key
    case.header.insert(rng.randrange(len(case.header) + 1), [spelled, twin])


def m_delete_entry(rng, case):
    if (pair := _pick(rng, case)) is not None:
        case.header.remove(pair)


def m_nest(rng, case):
    if (pair := _pick(rng, case)) is None:
        return
    depth = rng.choice([3, 64, 129, 500, 10_000])
    value = (
        Raw("[" * depth + "1" + "]" * depth)
        if rng.random() < 0.7
        else Raw('{"a":' * depth + "1" + "}" * depth)
    )
    if rng.random() < 0.5:
        pair[1] = value
    else:
        _set(pair[1], rng.choice(["dtype", "shape", "data_offsets"]), value)


def m_metadata(rng, case):
    if not isinstance(case.header, Obj):
        return
    value = rng.choice(
        [
            Obj([["format", "pt"]]),
            Obj([["a", 1]]),
            [],
            None,
            "x",
            Obj([["a", "b"], ["a", "c"]]),
            Obj([["a", Obj([])]]),
            Obj([["a", Raw('"\\udc00"')]]),
        ]
    )
    if rng.random() < 0.3:
        case.header.append(["__metadata__", value])  # possibly a second one
    else:
        case.header[:] = [p for p in case.header if p[0] != "__metadata__"] + [["__metadata__", value]]


def m_rename(rng, case):
    if (pair := _pick(rng, case)) is None:
        return
    key = pair[0]
    if key.startswith("blocks.") and rng.random() < 0.6:
        block = rng.choice(["1", "2", "3", "9999", "10000000", "01", "\u0663", "-1", "99999999999"])
        pair[0] = re.sub(r"^blocks\.\d+\.", f"blocks.{block}.", key)
        return
    others = [p[0] for p in _tensors(case) if p is not pair]
    pair[0] = rng.choice(
        [
            "model.diffusion_model." + key,
            Raw('"\\ud800' + json.dumps(key)[1:]),
            "",
            key + "x",
            "__metadata__",
            rng.choice(others) if others else key,
        ]
    )


def m_top(rng, case):
    case.header = rng.choice([[], Raw('"x"'), 1, Raw("null"), Raw("NaN"), [case.header]])


def m_reorder(rng, case):
    if isinstance(case.header, Obj):
        rng.shuffle(case.header)


def m_add_empty(rng, case):
    if not isinstance(case.header, Obj):
        return
    n = len(case.data)
    k = rng.choice([0, n, n + 4, 2, rng.randrange(n + 1)])
    case.header.append(["zz.empty", Obj([["dtype", "F32"], ["shape", [0, 3]], ["data_offsets", [k, k]]])])


# --- model-level mutations: valid files (re-saved by the library) that do not fit the DiT ------
def s_rename(rng, state):
    key = rng.choice(sorted(state))
    block = rng.choice(["2", "3", "9999", "01", "10000000"])
    new = re.sub(r"^blocks\.\d+\.", f"blocks.{block}.", key) if key.startswith("blocks.") else key + "x"
    state[new] = state.pop(key)


def s_scalar(rng, state):
    state[rng.choice(sorted(state))] = torch.tensor(0.5, dtype=torch.bfloat16)


def s_reshape(rng, state):
    key = rng.choice(sorted(state))
    t = state[key]
    state[key] = rng.choice(
        [t.reshape(-1), t.unsqueeze(0), t.reshape(-1, 1), t.mT if t.dim() >= 2 else t[None]]
    )
    state[key] = state[key].contiguous()


def s_empty(rng, state):
    key = rng.choice(sorted(state))
    state[key] = torch.zeros(0, *state[key].shape[1:], dtype=torch.bfloat16)


def s_drop(rng, state):
    state.pop(rng.choice(sorted(state)))


def s_dtype(rng, state):
    key = rng.choice(sorted(state))
    dtype = rng.choice([torch.float8_e4m3fn, torch.float8_e5m2, torch.int32, torch.float64, torch.bool])
    state[key] = state[key].to(dtype)
    if dtype.is_floating_point and dtype.itemsize == 1 and key.endswith(".weight") and rng.random() < 0.6:
        rows = state[key].shape[0] if state[key].dim() else 1
        state[key.removesuffix("weight") + "scale_weight"] = torch.rand(rng.choice([rows, 1, rows + 1]))


def s_twin(rng, state):
    key = rng.choice(sorted(state))
    state["model.diffusion_model." + key] = state[key].clone()


STATE_MUTATIONS: dict[str, Callable] = {
    "rename": s_rename,
    "scalar": s_scalar,
    "reshape": s_reshape,
    "empty": s_empty,
    "drop": s_drop,
    "dtype": s_dtype,
    "twin": s_twin,
}


# --- byte mutations (applied to the written file; ``hlen`` is the header's real length) -------------
def _with_hlen(blob: bytes, hlen: int) -> bytes:
    return struct.pack("<Q", hlen % 2**64) + blob[8:]


def b_hlen(rng, case):
    delta = rng.choice([*range(-16, 0), *range(1, 17), 2**32, 2**63, -(2**20)])
    case.byte_ops.append(lambda blob, hlen: _with_hlen(blob, max(0, hlen + delta)))


def b_truncate(rng, case):
    frac = rng.random()
    tail = rng.choice([None, 1, 2, 7, 8, 16])
    case.byte_ops.append(
        lambda blob, hlen: blob[: len(blob) - tail] if tail else blob[: int(len(blob) * frac)]
    )


def b_append(rng, case):
    extra = rng.choice([b"\0", b"\0" * 8, b" ", bytes(rng.randrange(256) for _ in range(5))])
    case.byte_ops.append(lambda blob, hlen: blob + extra)


def b_pad(rng, case):
    kind = rng.choice(["spaces", "spaces-unfixed", "short-by-padding", "nul", "formfeed", "leading"])
    k = rng.choice([1, 3, 8])

    def op(blob: bytes, hlen: int) -> bytes:
        head, data = blob[8 : 8 + hlen], blob[8 + hlen :]
        if kind == "short-by-padding":  # the header length given without its trailing spaces
            return _with_hlen(blob, len(head.rstrip(b" ")))
        if kind == "spaces-unfixed":
            return blob[:8] + head + b" " * k + data
        pad = {"spaces": b" ", "nul": b"\0", "formfeed": b"\x0c"}.get(kind, b" ") * k
        head = pad + head if kind == "leading" else head + pad
        return struct.pack("<Q", len(head)) + head + data

    case.byte_ops.append(op)


def b_flip(rng, case):
    pos, value = rng.random(), rng.randrange(256)

    def op(blob: bytes, hlen: int) -> bytes:
        if not hlen:
            return blob
        i = 8 + int(pos * hlen)
        return blob[:i] + bytes([value]) + blob[i + 1 :]

    case.byte_ops.append(op)


def b_bad_utf8(rng, case):
    bad = rng.choice([b"\xff", b"\xed\xa0\x80", b"\xc0\xaf", b"\xe2\x82"])
    pos = rng.random()

    def op(blob: bytes, hlen: int) -> bytes:
        head = blob[8 : 8 + hlen]
        quotes = [m.start() + 1 for m in re.finditer(rb'"', head)] or [0]
        i = quotes[int(pos * len(quotes))]
        head = head[:i] + bad + head[i:]
        return struct.pack("<Q", len(head)) + head + blob[8 + hlen :]

    case.byte_ops.append(op)


def b_number(rng, case):
    spelling = rng.choice(
        ["-0", "NaN", "Infinity", "-1", "1e0", "8.0", "00", "0x10", "99999999999999999999999", "1" * 5000]
    )
    pos = rng.random()

    def op(blob: bytes, hlen: int) -> bytes:
        head = blob[8 : 8 + hlen]
        numbers = list(re.finditer(rb"(?<=[\[,])\d+(?=[\],])", head))
        if not numbers:
            return blob
        m = numbers[int(pos * len(numbers))]
        head = head[: m.start()] + spelling.encode() + head[m.end() :]
        return struct.pack("<Q", len(head)) + head + blob[8 + hlen :]

    case.byte_ops.append(op)


MUTATIONS: dict[str, Callable] = {
    name[2:]: fn for name, fn in sorted(globals().items()) if name.startswith(("m_", "b_")) and callable(fn)
}


def mutate(seed_blob: bytes, rng: random.Random, state: dict[str, torch.Tensor] | None = None) -> Case:
    """1-3 structural mutations of ``seed_blob``; with ``state`` (the seed's tensors), half the
    cases first change the model itself (key, shape, dtype) and re-save it with the library."""
    names = []
    if state is not None and rng.random() < 0.5:
        state = dict(state)
        name = rng.choice(sorted(STATE_MUTATIONS))
        STATE_MUTATIONS[name](rng, state)
        names.append("model-" + name)
        seed_blob = save(state, metadata={"format": "pt"})
    case = parse_seed(seed_blob)
    case.names += names
    if names and rng.random() < 0.5:
        return case  # the valid file alone
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3])):
        name = rng.choice(sorted(MUTATIONS))
        MUTATIONS[name](rng, case)
        case.names.append(name)
    return case


# --- the oracle ------------------------------------------------------------------------------------
class FuzzFailure(AssertionError):
    """A case broke the rule; the message says which case, which mutations and what happened."""


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.numel():
        return True
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _names_the_file(err: CheckpointError, path: Path) -> None:
    if str(path) not in str(err):
        raise FuzzFailure(f"{type(err).__name__} does not name the file {path}: {err}") from None


def check_reader(path: Path) -> tuple[str, dict[str, torch.Tensor] | None, float]:
    """(outcome, the library's tensors when it loads the file, seconds wanstudio took);
    raises FuzzFailure."""
    try:
        expected = load_file(path)
    except Exception:  # any refusal by the library, whatever its type
        expected = None
    start = time.perf_counter()
    try:
        st = SafetensorsFile(path)
        got = {k: read_tensor(e) for k, e in st.entries.items()}
    except CheckpointError as err:
        took = time.perf_counter() - start
        _names_the_file(err, path)
        if expected is None:
            return "refused by both", None, took
        reason = next((r for r in STRICTER if r in str(err)), None)
        if reason is None:
            raise FuzzFailure(f"the library loads it but wanstudio refuses it: {err}") from None
        return f"refused by wanstudio only ({reason})", expected, took
    except Exception as err:
        raise FuzzFailure(f"{type(err).__name__} escaped the reader: {err}") from err
    took = time.perf_counter() - start
    if expected is None:
        raise FuzzFailure(f"the library refuses it but wanstudio loads {sorted(got)[:5]}")
    if set(got) != set(expected):
        raise FuzzFailure(f"keys differ: {sorted(set(got) ^ set(expected))[:5]}")
    if bad := [k for k in got if not _same_bytes(got[k], expected[k])]:
        raise FuzzFailure(f"tensors differ from the library's: {bad[:5]}")
    if sum(e.nbytes for e in st.entries.values()) > path.stat().st_size:
        raise FuzzFailure("tensors claim more bytes than the file holds")
    return "loaded by both, same tensors", expected, took


def check_loader(path: Path, expected: dict[str, torch.Tensor] | None) -> tuple[str, float]:
    """load_model on a mutated whole-model file: the library's tensors, or a CheckpointError
    naming the file (the model-fit errors raised after the header too); (outcome, seconds)."""
    start = time.perf_counter()
    try:
        model = load_model(path, dtype=torch.float32)
    except CheckpointError as err:
        took = time.perf_counter() - start
        _names_the_file(err, path)
        return "load_model: CheckpointError", took
    except Exception as err:
        raise FuzzFailure(f"{type(err).__name__} escaped load_model: {err}") from err
    took = time.perf_counter() - start
    if expected is None:
        raise FuzzFailure("load_model loaded a file the library refuses")
    if model.quantization is not QuantMode.DISABLED:  # an fp8 tensor made it run quantized
        return "load_model: loaded in an fp8 storage mode (not compared)", took
    entries, _ = scan_checkpoint(path)
    for name, tensor in model.state_dict().items():
        reference = expected[entries[name].key].to(torch.float32)
        if not torch.equal(tensor, reference):
            raise FuzzFailure(f"load_model's {name} differs from the library's tensor")
    return "load_model: loaded, same tensors", took


@dataclass
class Report:
    """Counts by outcome and mutation; the slowest case by wanstudio's time (the reader's, or
    load_model's on loader cases), overall and split into refusals and loads."""

    outcomes: Counter = field(default_factory=Counter)
    mutations: Counter = field(default_factory=Counter)
    cases: int = 0
    slowest_s: float = 0.0
    slowest_case: str = ""
    slowest_refusal_s: float = 0.0
    slowest_refusal: str = ""
    slowest_load_s: float = 0.0
    slowest_load: str = ""

    def time(self, seconds: float, label: str, refused: bool) -> None:
        """Record one case's wanstudio time."""
        if seconds > self.slowest_s:
            self.slowest_s, self.slowest_case = seconds, label
        if refused and seconds > self.slowest_refusal_s:
            self.slowest_refusal_s, self.slowest_refusal = seconds, label
        if not refused and seconds > self.slowest_load_s:
            self.slowest_load_s, self.slowest_load = seconds, label


def run(
    state: dict[str, torch.Tensor], folder: Path, cases: int, *, seed: int, loader: bool, report: Report
) -> Report:
    """``cases`` mutations of the file holding ``state``, through the reader, and through
    load_model too when ``loader`` (``state`` is then a whole model)."""
    path = folder / ("dit.safetensors" if loader else "small.safetensors")
    seed_blob = save(state, metadata={"format": "pt"})
    for i in range(cases):
        rng = random.Random(f"{seed}-{loader}-{i}")
        case = mutate(seed_blob, rng, state if loader else None)
        path.write_bytes(case.build())
        label = f"case {i} (seed {seed}, loader={loader}, mutations {'+'.join(case.names)})"
        try:
            outcome, expected, took = check_reader(path)
            report.outcomes[outcome] += 1
            if loader:
                outcome, took = check_loader(path, expected)  # what a user of load_model waits
                report.outcomes[outcome] += 1
        except FuzzFailure as err:
            raise FuzzFailure(f"{label}: {err}") from None
        report.time(took, label, refused="refused" in outcome or "Error" in outcome)
        report.mutations.update(case.names)
        report.cases += 1
    return report
