"""Layout contracts, strict mode and the layout inspector (issue 5), on the CPU.

The four incidents of the issue are reproduced here: (a) an fp8 weight one element off
16-byte alignment, (b) a row-major mat2 for the fp8 matmul, (c) a non-contiguous q reaching
an attention backend that needs stride(-1) == 1, (d) block-swapped weights.
"""

from __future__ import annotations

import copy
import re
import statistics
import threading
import time

import pytest
import torch
from conftest import call, make_inputs
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import wanstudio as ws
from wanstudio import layout
from wanstudio.attention import attention
from wanstudio.errors import LayoutError, ShapeError
from wanstudio.inspector import ROLES, LayoutReport, LayoutRow, inspect_layout
from wanstudio.layout import (
    COPY_COUNTS,
    LayoutContract,
    Operand,
    StrideRule,
    is_strict_layout,
    layout_name,
    set_strict_layout,
    strict_enabled,
    strict_layout,
)
from wanstudio.options import QuantMode

quant = pytest.importorskip("wanstudio.quant")
QuantizedLinear = quant.QuantizedLinear

FP8 = torch.float8_e4m3fn
FAST_MODES = [m for m in QuantMode if m.is_fast and m.is_fp8]
SMALL = dict(frames=3, height=4, width=6)  # 3 x 2 x 3 = 18 tokens: odd frames, non-square


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster, and far steadier on shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def no_strict_leak():
    assert not strict_enabled()
    yield
    assert not strict_enabled(), "a test left strict mode on"
    assert not layout._LISTENERS, "a test left a layout listener installed"


def tiny(preset: str = "tiny-infinitetalk", mode: QuantMode | str | None = None) -> ws.WanModel:
    torch.manual_seed(0)
    model = ws.WanModel(ws.WanConfig.preset(preset)).eval()
    if mode is not None:
        quant.quantize(model, mode)
    return model


def hooks_of(model: nn.Module) -> dict[str, int]:
    """Number of forward / backward hooks on every module (nonzero entries only)."""
    out = {}
    for name, m in model.named_modules():
        n = (
            len(m._forward_hooks)
            + len(m._forward_pre_hooks)
            + len(m._backward_hooks)
            + len(m._backward_pre_hooks)
        )
        if n:
            out[name or "(model)"] = n
    return out


def misaligned_copy(t: torch.Tensor, elements: int = 1) -> torch.Tensor:
    """A contiguous copy of ``t`` whose storage starts ``elements`` elements past an aligned one."""
    raw = torch.empty(t.numel() + elements, dtype=t.dtype)
    assert raw.data_ptr() % 16 == 0
    view = raw[elements:].view(t.shape)
    view.copy_(t)
    return view


class ScaledMMRecorder:
    """Stands in for torch._scaled_mm: records every launch, then runs the real one."""

    def __init__(self):
        self.real = torch._scaled_mm
        self.calls: list[tuple] = []

    def __call__(self, a, b, *args, **kwargs):
        self.calls.append((tuple(a.shape), tuple(b.shape), tuple(b.stride())))
        return self.real(a, b, *args, **kwargs)


# --- contracts ----------------------------------------------------------------------------------
MM = LayoutContract(
    "test_mm",
    (
        Operand(
            "a", dtypes=(torch.float32,), ndim=2, stride=StrideRule.ROW_MAJOR, align=16, divisible=((1, 16),)
        ),
        Operand("b", ndim=2, stride=StrideRule.COL_MAJOR, align=16, divisible=((0, 16), (-1, 16))),
        Operand("q", stride=StrideRule.LAST_DIM_CONTIGUOUS, divisible=((-1, 2), (2, 4))),
        Operand("c", stride=StrideRule.CONTIGUOUS, optional=True),
        Operand("r", dtypes=(torch.float32, torch.float64), stride=StrideRule.ROW_MAJOR),
        Operand("s", ndim=3, stride=StrideRule.COL_MAJOR, align=8),
        Operand("z", ndim=0, stride=StrideRule.LAST_DIM_CONTIGUOUS),
    ),
)


def _layouts() -> list[torch.Tensor]:
    base = torch.randn(32, 48)
    return [
        base,
        base.t(),
        base[:, :32],
        base[1:],
        base[:, 1:],
        base[::2],
        base.t()[:, 1:],
        misaligned_copy(base),
        misaligned_copy(base, 4),
        base.double(),
        base[None],
        torch.randn(4, 3, 2).transpose(1, 2),
        torch.randn(5, 1),
        torch.randn(1, 5).t(),
        torch.randn(0, 16),
        torch.randn(()),
        torch.empty(32, 48, device="meta"),
        torch.randn(2, 3, 8),
        torch.randn(2, 3, 8).transpose(0, 2),
        torch.randn(3, 5, 6)[:, :, ::2],
        torch.randn(7),
        torch.empty(48, 32, device="meta").t(),
    ]


@pytest.mark.parametrize("op", MM.operands, ids=lambda o: o.name)
def test_fast_check_agrees_with_the_detailed_check(op):
    for t in _layouts():
        assert op._ok(t) == (not layout._check_operand(op, t)), (op.name, t.shape, t.stride())


def test_a_satisfied_contract_returns_the_same_tensors_and_launches_no_op():
    a = torch.randn(8, 32)
    b = torch.randn(16, 32).t()
    before = sum(COPY_COUNTS.values())

    class Recorder(TorchDispatchMode):
        ops: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    with Recorder() as rec, strict_layout():
        out = MM.enforce("here", a=a, b=b, q=a, c=None)
    assert out["a"] is a and out["b"] is b and out["q"] is a and out["c"] is None
    assert rec.ops == []  # metadata only: no aten op, so no device work, no sync
    assert sum(COPY_COUNTS.values()) == before


def test_checks_work_on_meta_tensors():
    # nothing to read on the meta device: the checks never touch data
    a = torch.empty(8, 32, device="meta")
    assert MM.enforce("here", a=a)["a"] is a
    with pytest.raises(LayoutError, match="stride"), strict_layout():
        MM.enforce("here", b=torch.empty(16, 32, device="meta"))


def test_outside_strict_mode_a_copy_fixes_stride_and_alignment_and_is_counted():
    b_bad = misaligned_copy(torch.randn(32, 16))  # row-major AND misaligned; needs col-major
    q_bad = torch.randn(2, 8, 4).transpose(1, 2)
    events = []
    before = COPY_COUNTS[("blocks.7.ffn.0", "test_mm", "b")]
    with layout.listen(events.append):
        out = MM.enforce("blocks.7.ffn.0", b=b_bad, q=q_bad)
    assert not layout._check_operand(MM.operand("b"), out["b"])
    assert torch.equal(out["b"], b_bad) and torch.equal(out["q"], q_bad)
    assert out["q"].stride(-1) == 1
    assert COPY_COUNTS[("blocks.7.ffn.0", "test_mm", "b")] == before + 1
    assert [(e.operand.name, e.copied, {v.rule for v in e.violations}) for e in events] == [
        ("b", True, {"stride", "align"}),
        ("q", True, {"stride"}),
    ]
    assert events[0].result is out["b"] and events[0].tensor is b_bad


def test_violations_no_copy_can_fix_raise_even_outside_strict_mode():
    with pytest.raises(LayoutError, match="dtype") as err:
        MM.enforce("blocks.0.x", a=torch.randn(8, 32, dtype=torch.float64))
    assert "no copy can fix this" in str(err.value)
    with pytest.raises(LayoutError, match=r"shape\[1\] % 16 == 0"):
        MM.enforce("blocks.0.x", a=torch.randn(8, 30))
    with pytest.raises(KeyError, match="no operand 'w'"):
        MM.enforce("blocks.0.x", w=torch.randn(2))


def test_the_error_names_module_kernel_operand_requirement_finding_and_cause():
    w = misaligned_copy(torch.randn(64, 32))
    with strict_layout(), pytest.raises(LayoutError) as err:
        MM.enforce("blocks.3.cross_attn.o", b=w.t())
    text = str(err.value)
    assert text.startswith("blocks.3.cross_attn.o: kernel test_mm, operand 'b'")
    assert "strict layout mode: raised before the launch" in text
    assert "required: 2-D, column-major" in text and "data_ptr % 16 == 0" in text
    assert "found:    shape (32, 64), stride (1, 32)" in text
    assert "storage offset 1 (4 bytes)" in text and "NOT 16-byte aligned" in text
    assert "likely cause: the view starts 4 bytes into its storage" in text
    assert "would copy it (8.0 KiB)" in text


def test_strict_layout_covers_worker_threads_and_nests():
    seen = []
    with strict_layout():
        t = threading.Thread(target=lambda: seen.append(strict_enabled()))
        t.start()
        t.join()
        with strict_layout():
            pass
        with strict_layout(False):
            assert strict_enabled()
        assert strict_enabled()
    assert seen == [True]


# --- strict mode on a model ---------------------------------------------------------------------
class Permuted(nn.Module):
    """Feeds attention a q whose last dim is not innermost (same values as x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, L, H, D)
        q = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # (B, L, H, D), stride(-1) == H
        return attention(q, x, x, mode="sdpa", where=layout_name(self))


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Permuted()
        layout.assign_layout_names(self)

    def forward(self, x):
        return self.inner(x)


def test_set_strict_layout_makes_every_forward_strict_and_is_reversible():
    model = Wrapper()
    x = torch.randn(1, 6, 2, 16)
    model(x)  # outside strict mode: copied
    assert set_strict_layout(model) is model and is_strict_layout(model)
    set_strict_layout(model)  # idempotent
    assert hooks_of(model) == {"(model)": 2}
    with pytest.raises(LayoutError, match=r"^inner: kernel torch.sdpa, operand 'q'"):
        model(x)
    assert not strict_enabled()  # the always-called hook undid it although forward raised
    with pytest.raises(LayoutError):
        model(x)
    set_strict_layout(model, False)
    assert hooks_of(model) == {} and not is_strict_layout(model)
    model(x)


def test_is_strict_layout_sees_the_strict_block_and_the_model_flag():
    model = Wrapper()
    assert not is_strict_layout() and not is_strict_layout(model)
    with strict_layout():
        # checks are active for this model's forwards, though set_strict_layout is off for it
        assert is_strict_layout() and is_strict_layout(model) and is_strict_layout(None)
        with pytest.raises(LayoutError):
            model(torch.randn(1, 6, 2, 16))
    assert not is_strict_layout() and not is_strict_layout(model)
    set_strict_layout(model)
    assert is_strict_layout(model) and not is_strict_layout()  # on for the model, not process-wide
    assert not is_strict_layout(Wrapper())
    set_strict_layout(model, False)
    assert not is_strict_layout(model)


def test_set_strict_layout_covers_a_forward_in_another_thread():
    model = set_strict_layout(Wrapper())
    errors = []

    def run():
        try:
            model(torch.randn(1, 6, 2, 16))
        except LayoutError as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert len(errors) == 1 and not strict_enabled()


# --- the inspector ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def talk_report() -> tuple[ws.WanModel, LayoutReport]:
    model = tiny("tiny-infinitetalk")
    return model, inspect_layout(model, make_inputs(model.config, speakers=2, **SMALL))


def test_report_has_a_row_per_module_call_and_role_with_every_field(talk_report):
    model, report = talk_report
    assert {r.role for r in report} == set(ROLES)
    assert len(report) == len(report.rows) > 100
    top_in = {r.tensor: r for r in report.rows if r.call == 0 and r.role == "input"}
    assert set(top_in) == {"x", "t", "context", "clip_fea", "y", "audio", "ref_target_masks"}
    assert top_in["x"].shape == (1, 16, 3, 4, 6) and top_in["x"].module_type == "WanModel"
    out = [r for r in report.rows if r.call == 0 and r.role == "output"]
    assert [o.shape for o in out] == [(1, 16, 3, 4, 6)]
    w = next(r for r in report.rows if r.module == "blocks.1.self_attn.q" and r.tensor == "weight")
    assert (w.role, w.module_type, w.shape, w.dtype, w.device) == (
        "parameter",
        "Linear",
        (256, 256),
        "float32",
        "cpu",
    )
    assert (w.stride, w.contiguous, w.storage_offset, w.aligned16, w.majorness) == (
        (256, 1),
        True,
        0,
        True,
        "row",
    )
    assert w.nbytes == 256 * 256 * 4 and w.status == "n/a" and w.kernel == ""
    # rows name modules by their qualified names; children nest deeper than parents
    names = {n for n, _ in model.named_modules()}
    assert {r.module for r in report.rows} <= names
    assert {"blocks.0", "blocks.1.ffn.2", "audio_proj", "img_emb.proj.4", "head"} <= {
        r.module for r in report.rows
    }
    assert w.depth == 3
    # rope's (cos, sin) pair is walked into its elements
    assert {r.tensor for r in report.rows if r.module == "blocks.0.self_attn" and r.role == "input"} == {
        "x",
        "rope[0]",
        "rope[1]",
        "ref_masks",
    }


def test_a_shared_quantization_shows_as_its_named_parts():
    """q, k and v of an fp8 `_fast` model read one quantization of their input (SharedRows):
    the inspector names its fields, and all three layers are handed the same parts; the FFN's
    first layer reads its input as rows too."""
    torch.manual_seed(0)
    cfg = ws.WanConfig.preset("tiny-t2v")
    model = ws.quantize(ws.WanModel(cfg).eval(), "fp8_e4m3fn_fast")
    report = inspect_layout(model, make_inputs(cfg, **SMALL))
    seen = {}
    for name in ("self_attn.q", "self_attn.k", "self_attn.v", "ffn.0"):
        rows = [r for r in report.rows if r.module == f"blocks.0.{name}" and r.role == "input"]
        seen[name] = {(r.tensor, r.dtype, r.shape) for r in rows}
    assert seen["self_attn.q"] == seen["self_attn.k"] == seen["self_attn.v"] == seen["ffn.0"]
    assert seen["ffn.0"] == {("x.q", "float8_e4m3fn", (1, 18, 256)), ("x.scale", "float32", (1, 18, 1))}


def test_kernel_operand_rows_carry_the_contract_verdict(talk_report):
    _, report = talk_report
    ops = report.filter(role="kernel operand")
    # per block: self-attention, text + image cross-attention, audio cross-attention; q, k, v each
    assert len(ops) == 2 * 4 * 3
    assert {(r.kernel, r.status, r.copies) for r in ops} == {("torch.sdpa", "ok", 0)}
    q = next(r for r in ops if r.module == "blocks.0.audio_cross_attn" and r.tensor == "q")
    assert q.module_type == "AudioCrossAttention" and q.shape == (3, 6, 2, 128)
    assert q.required == "4-D, dtype in {float16, bfloat16, float32, float64}, stride(-1) == 1"
    assert report.violations() == [] and report.copies() == [] and report.copy_counts == {}


def test_no_hooks_before_or_after_inspection(talk_report):
    model, _ = talk_report
    globals_before = (
        dict(torch.nn.modules.module._global_forward_hooks),
        dict(torch.nn.modules.module._global_forward_pre_hooks),
    )
    assert hooks_of(model) == {}
    inspect_layout(model, make_inputs(model.config, **SMALL))
    assert hooks_of(model) == {}
    assert (
        dict(torch.nn.modules.module._global_forward_hooks),
        dict(torch.nn.modules.module._global_forward_pre_hooks),
    ) == globals_before
    assert layout._LISTENERS == []


def test_hooks_are_removed_when_the_forward_raises_early():
    model = tiny("tiny-t2v")
    inputs = make_inputs(model.config, **SMALL)
    inputs["x"] = inputs["x"][:, :3]  # 3 channels instead of 16
    with pytest.raises(ShapeError) as err:
        inspect_layout(model, inputs)
    assert hooks_of(model) == {} and layout._LISTENERS == []
    partial = err.value.layout_report
    assert "partial" in partial.title and {r.call for r in partial.rows} == {0}


def test_hooks_are_removed_when_a_deep_module_raises(monkeypatch):
    model = tiny("tiny-t2v")

    def boom(x):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(model.blocks[1].ffn[1], "forward", boom)
    with pytest.raises(RuntimeError, match="kernel exploded") as err:
        inspect_layout(model, make_inputs(model.config, **SMALL))
    assert hooks_of(model) == {} and layout._LISTENERS == []
    rows = err.value.layout_report.rows
    assert rows[-1].module == "blocks.1.ffn.1" and rows[-1].role == "input"
    # the model still runs normally afterwards, and a second inspection works
    monkeypatch.undo()
    assert len(inspect_layout(model, make_inputs(model.config, **SMALL))) > len(rows)


def test_a_forward_in_another_thread_during_inspection_is_not_recorded():
    model = Wrapper()
    x = torch.randn(1, 6, 2, 16)
    other = threading.Thread(target=lambda: model(x))

    class Starter(nn.Module):  # starts and joins the other thread from inside the inspected forward
        def __init__(self):
            super().__init__()
            self.wrapped = model

        def forward(self, x):
            other.start()
            other.join()
            return self.wrapped(x)

    report = inspect_layout(Starter(), x)
    assert len(report.filter(role="kernel operand")) == 3  # our forward's q, k, v; not the other's
    assert [r.call for r in report.rows if r.role == "input"] == [0, 1, 2]


def test_positional_and_keyword_inputs_give_the_same_rows():
    model = tiny("tiny-i2v")
    inputs = make_inputs(model.config, **SMALL)
    by_dict = inspect_layout(model, inputs)
    by_args = inspect_layout(
        model, inputs["x"], inputs["t"], inputs["context"], clip_fea=inputs["clip_fea"], y=inputs["y"]
    )
    assert by_dict.rows == by_args.rows


def test_filter(talk_report):
    _, report = talk_report
    self_attn = report.filter(module="self_attn")
    assert self_attn.rows and all("self_attn" in r.module for r in self_attn)
    exact = report.filter(module=re.compile(r"^blocks\.\d+\.self_attn$"), role="kernel operand")
    assert {(r.module, r.tensor) for r in exact} == {
        (f"blocks.{i}.self_attn", n) for i in (0, 1) for n in "qkv"
    }
    assert len(report.filter(role=("input", "output"))) == sum(r.role in ("input", "output") for r in report)
    assert len(report.filter(kernel="sdpa")) == 24 and len(report.filter(kernel="_scaled_mm")) == 0
    nc = report.filter(only_non_contiguous=True)
    assert nc.rows and not any(r.contiguous for r in nc)
    assert len(report.filter(only_violations=True)) == 0
    assert len(report.filter(role="parameter", module="blocks.0.", only_non_contiguous=True)) == 0
    with pytest.raises(ValueError, match="unknown role"):
        report.filter(role="weights")


def test_summary_counts_roles_checks_violations_and_copies(talk_report):
    _, report = talk_report
    text = report.summary()
    counts = {role: sum(r.role == role for r in report) for role in ROLES}
    assert f"{len(report)} rows from {report.calls} module calls" in text
    assert ", ".join(f"{role} {counts[role]}" for role in ROLES) in text
    assert "contract checks: 24 (torch.sdpa 24)" in text
    assert "violations: 0" in text and "hidden copies: 0 (0 B)" in text
    assert repr(report) == text


def test_to_csv_writes_every_row_atomically(tmp_path, talk_report, monkeypatch):
    import csv

    _, report = talk_report
    path = report.to_csv(tmp_path / "layout.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(report)
    assert rows[0]["module"] == "" and rows[0]["role"] == "input" and rows[0]["shape"] == "[1, 16, 3, 4, 6]"
    assert list(tmp_path.iterdir()) == [path]
    # a failure mid-write leaves the previous file untouched and no temp file behind
    original = path.read_bytes()

    def broken(values):
        raise OSError("disk full")

    monkeypatch.setattr("wanstudio.inspector._row_values", broken)
    with pytest.raises(OSError, match="disk full"):
        report.to_csv(path)
    assert path.read_bytes() == original and list(tmp_path.iterdir()) == [path]


def test_to_pandas_or_a_clear_import_error(talk_report):
    _, report = talk_report
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="to_csv"):
            report.to_pandas()
    else:
        df = report.to_pandas()
        assert len(df) == len(report) and "aligned16" in df.columns


def _row(i: int, **kw) -> LayoutRow:
    base = dict(
        call=i,
        depth=1,
        module=f"blocks.{i}.ffn.0",
        module_type="Linear",
        role="input",
        tensor="x",
        shape=(2, 3),
        dtype="float32",
        device="cpu",
        stride=(3, 1),
        contiguous=True,
        storage_offset=0,
        aligned16=True,
        majorness="row",
        nbytes=24,
    )
    base.update(kw)
    return LayoutRow(**base)


def test_html_highlights_violations_red_and_copies_amber_and_truncates():
    rows = [_row(i) for i in range(1000)]
    rows[500] = _row(
        500,
        role="kernel operand",
        kernel="k",
        status="violation",
        rule="stride: <bad>",
        copies=1,
        copy_bytes=24,
    )
    rows[900] = _row(900, role="kernel operand", kernel="k", status="ok", copies=1, copy_bytes=24)
    report = LayoutReport(rows, title="Toy")
    report.html_max_rows = 50
    page = report._repr_html_()
    assert len(re.findall(r"<tr[^>]* title=", page)) == 50  # data rows
    assert "Showing 50 of 1000 rows" in page
    # the first 48 rows, the two flagged ones, and a count for each gap between them
    assert [int(n) for n in re.findall(r"(\d+) rows not shown", page)] == [452, 399, 99]
    assert 'style="background:#f8d0d0" title="stride: &lt;bad&gt;"' in page  # escaped, red
    assert 'style="background:#ffe3a8" title="hidden copy: 24 B"' in page  # amber
    assert "blocks.500.ffn.0" in page and "blocks.900.ffn.0" in page and "blocks.800.ffn.0" not in page
    small = LayoutReport(rows[:10])
    assert "Showing" not in small._repr_html_() and small._repr_html_().count("blocks.") == 10


# --- incident (a): an fp8 weight one element off 16-byte alignment -----------------------------
@pytest.mark.parametrize("mode", FAST_MODES, ids=str)
def test_a_misaligned_fp8_weight_raises_before_any_matmul_in_strict_mode(mode, monkeypatch):
    model = tiny("tiny-t2v", mode)
    inputs = make_inputs(model.config, **SMALL)
    with torch.no_grad():
        reference = call(model, inputs)  # warm: matmul plans probed, paths chosen
    layer = model.blocks[0].self_attn.q  # the first quantized layer the forward reaches
    assert isinstance(layer, QuantizedLinear) and layer.path == "scaled_mm"
    bad = misaligned_copy(layer.weight)
    assert bad.data_ptr() % 16 == 1 and bad.is_contiguous()
    layer.weight = bad
    launches = ScaledMMRecorder()
    monkeypatch.setattr(torch, "_scaled_mm", launches)
    with strict_layout(), pytest.raises(LayoutError) as err, torch.no_grad():
        call(model, inputs)
    assert launches.calls == []  # raised before ANY _scaled_mm launch
    text = str(err.value)
    assert text.startswith("blocks.0.self_attn.q: kernel torch._scaled_mm")
    assert "operand 'mat2'" in text and "align: required data_ptr % 16 == 0" in text
    assert "storage offset 1 (1 bytes)" in text and "NOT 16-byte aligned" in text
    assert "likely cause: the view starts 1 bytes into its storage" in text
    # inspected in strict mode: the same error, with the rows up to the violating operand
    with strict_layout(), pytest.raises(LayoutError) as err:
        inspect_layout(model, inputs)
    (row,) = err.value.layout_report.violations()
    assert (row.module, row.tensor, row.aligned16, row.copies) == ("blocks.0.self_attn.q", "mat2", False, 0)
    assert launches.calls == []
    # outside strict mode: fixed by one copy per call, visible in the report, same result
    report = inspect_layout(model, inputs)
    assert launches.calls  # now the kernels ran
    (row,) = report.filter(module="blocks.0.self_attn.q", only_violations=True)
    assert (row.tensor, row.aligned16, row.storage_offset, row.copies) == ("mat2", False, 1, 1)
    assert row.copy_bytes == 256 * 256 and "align" in row.rule
    assert report.copy_counts == {("blocks.0.self_attn.q", row.kernel, "mat2"): 1}
    assert "hidden copies: 1 (64.0 KiB)" in report.summary()
    with torch.no_grad():
        assert torch.equal(call(model, inputs), reference)


# --- incident (b): a row-major mat2 for the fp8 matmul ------------------------------------------
def test_b_a_row_major_mat2_raises_before_the_matmul_in_strict_mode(monkeypatch):
    model = tiny("tiny-t2v", QuantMode.FP8_E4M3FN_FAST)
    inputs = make_inputs(model.config, **SMALL)
    with torch.no_grad():
        reference = call(model, inputs)
    layer = model.blocks[0].self_attn.q
    # a weight stored transposed ([N, K] column-major), so weight.t() is a row-major [K, N]
    layer.weight = layer.weight.t().contiguous().t()
    assert layer.weight.t().stride() == (256, 1)
    launches = ScaledMMRecorder()
    monkeypatch.setattr(torch, "_scaled_mm", launches)
    with strict_layout(), pytest.raises(LayoutError) as err, torch.no_grad():
        call(model, inputs)
    assert launches.calls == []
    text = str(err.value)
    assert text.startswith("blocks.0.self_attn.q: kernel torch._scaled_mm")
    assert "operand 'mat2'" in text and "stride: required column-major 2-D" in text
    assert "found stride (256, 1)" in text and "row-major" in text
    assert "store the weight row-major [N, K] and pass weight.t()" in text
    report = inspect_layout(model, inputs)
    (row,) = report.violations()
    assert (row.module, row.tensor, row.majorness, row.copies) == ("blocks.0.self_attn.q", "mat2", "row", 1)
    # the copy handed to _scaled_mm was column-major: the launch after it saw stride (1, K)
    assert (launches.calls[0][1], launches.calls[0][2]) == ((256, 256), (1, 256))
    with torch.no_grad():
        assert torch.equal(call(model, inputs), reference)


def test_b_the_fp8_matmul_contract_itself_rejects_a_row_major_mat2():
    contract = quant.linear.SCALED_MM_CONTRACT
    mat2 = torch.zeros(64, 32, dtype=FP8)  # [K, N] row-major
    with strict_layout(), pytest.raises(LayoutError, match="column-major"):
        contract.enforce("blocks.0.ffn.2", mat2=mat2)
    assert contract.enforce("blocks.0.ffn.2", mat2=torch.zeros(32, 64, dtype=FP8).t())["mat2"].stride() == (
        1,
        64,
    )


# --- incident (c): a non-contiguous q reaching a backend that needs stride(-1) == 1 --------------
def test_c_a_non_contiguous_q_is_copied_and_the_report_shows_it():
    model = Wrapper()
    x = torch.randn(1, 6, 2, 16)
    report = inspect_layout(model, x)
    rows = {r.tensor: r for r in report.filter(role="kernel operand")}
    assert rows["q"].module == "inner" and rows["q"].stride == (192, 32, 1, 2)
    assert (rows["q"].status, rows["q"].copies, rows["q"].copy_bytes) == ("violation", 1, x.numel() * 4)
    assert "stride(-1) == 1" in rows["q"].rule
    assert (rows["k"].status, rows["k"].copies) == ("ok", 0)
    assert "hidden copies: 1 (768 B)" in report.summary()
    assert "#f8d0d0" in report._repr_html_()
    out = model(x)
    ref = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2),) * 3).transpose(1, 2)
    torch.testing.assert_close(out, ref)
    with strict_layout(), pytest.raises(LayoutError, match=r"^inner: kernel torch.sdpa, operand 'q'"):
        model(x)


def test_c_in_the_model_a_transposed_q_shows_up_at_its_module(monkeypatch):
    import wanstudio.model.blocks as blocks

    model = tiny("tiny-t2v")
    inputs = make_inputs(model.config, **SMALL)
    with torch.no_grad():
        reference = call(model, inputs)
    real = blocks.apply_rope

    def transposed_rope(x, cos, sin):  # a patch that hands back [B, L, H, D] with D not innermost
        return real(x, cos, sin).transpose(-1, -2).contiguous().transpose(-1, -2)

    monkeypatch.setattr(blocks, "apply_rope", transposed_rope)
    report = inspect_layout(model, inputs)
    bad = report.violations()
    assert {(r.module, r.tensor) for r in bad} == {(f"blocks.{i}.self_attn", n) for i in (0, 1) for n in "qk"}
    assert all(r.copies == 1 and r.copy_bytes == 18 * 256 * 4 for r in bad)
    with torch.no_grad():
        torch.testing.assert_close(call(model, inputs), reference)
    with (
        strict_layout(),
        torch.no_grad(),
        pytest.raises(LayoutError, match=r"^blocks\.0\.self_attn: kernel torch.sdpa, operand 'q'"),
    ):
        call(model, inputs)


# --- incident (d): block-swapped weights keep their contracts -----------------------------------
def test_d_block_swapped_weights_keep_their_contracts():
    offload = pytest.importorskip("wanstudio.offload")
    resident = tiny("tiny-infinitetalk", QuantMode.FP8_E4M3FN_SCALED_FAST)
    model = copy.deepcopy(resident)
    inputs = make_inputs(model.config, speakers=2, **SMALL)
    with torch.no_grad():
        reference = call(resident, inputs)
    fb = offload.FakeTransferBackend()
    offload.enable_block_swap(model, 1, prefetch=1, offload_txt_emb=True, backend=fb)
    hooks_before = hooks_of(model)
    with strict_layout():  # any violated contract would raise here
        report = inspect_layout(model, inputs)
    assert hooks_of(model) == hooks_before  # swap hooks intact, ours gone
    assert fb.copies()  # blocks.1 really came through a slot
    assert report.violations() == [] and report.copies() == []
    swap_rows = report.filter(kernel="block_swap_copy")
    assert {r.module.split(".")[0] + "." + r.module.split(".")[1] for r in swap_rows} >= {"blocks.1"}
    assert all(r.aligned16 and r.status == "ok" for r in swap_rows)

    # the fp8 weights and scales reach _scaled_mm in their resident layout, from the slot
    def block1(rep: LayoutReport) -> list[LayoutRow]:
        return [
            r
            for r in rep.rows
            if r.module.startswith("blocks.1")
            and r.kernel != "block_swap_copy"
            and r.role in ("parameter", "kernel operand")
        ]

    swapped, ref_rows = block1(report), block1(inspect_layout(resident, inputs))
    assert any(r.tensor == "mat2" for r in swapped) and any(r.tensor == "scale_weight" for r in swapped)
    assert [(r.module, r.tensor) for r in swapped] == [(r.module, r.tensor) for r in ref_rows]
    for r, ref in zip(swapped, ref_rows):
        assert (r.shape, r.stride, r.dtype, r.majorness, r.aligned16) == (
            ref.shape,
            ref.stride,
            ref.dtype,
            ref.majorness,
            True,
        ), (r.module, r.tensor)
    with torch.no_grad():
        assert torch.equal(call(model, inputs), reference)
    offload.disable_block_swap(model)
    assert hooks_of(model) == {}


# --- the whole tiny InfiniteTalk model in every quantization mode --------------------------------
@pytest.fixture(scope="module")
def talk_base() -> ws.WanModel:
    return tiny("tiny-infinitetalk")


@pytest.mark.parametrize("mode", list(QuantMode), ids=str)
def test_full_tiny_infinitetalk_inspection_has_no_violations_in_every_mode(talk_base, mode):
    model = quant.quantize(copy.deepcopy(talk_base), mode)
    for speakers in (1, 2):
        with strict_layout():  # a violation would raise; the report must also show none
            report = inspect_layout(model, make_inputs(model.config, speakers=speakers, **SMALL))
        assert report.violations() == [] and report.copies() == [] and report.copy_counts == {}
        kernels = {r.kernel for r in report.filter(role="kernel operand")}
        assert "torch.sdpa" in kernels
        if mode.is_fast and mode.is_fp8:
            mm = report.filter(kernel="_scaled_mm", role="kernel operand")
            assert {r.tensor for r in mm} >= {"mat1", "mat2", "scale_a", "scale_b"}
            assert {r.majorness for r in mm if r.tensor == "mat2"} == {"col"}
            assert all(r.aligned16 for r in mm if r.tensor in ("mat1", "mat2"))
        if mode is not QuantMode.DISABLED:
            quantized = report.filter(role="parameter", module=re.compile(r"^blocks\.\d\.self_attn\.q$"))
            assert quantized.rows and all(r.module_type == "QuantizedLinear" for r in quantized)
            assert all(r.contiguous and r.aligned16 and r.storage_offset == 0 for r in quantized)
    assert hooks_of(model) == {}


# --- cost -------------------------------------------------------------------------------------------
def _passthrough(self, where, **tensors):
    return tensors


def _strict_cost(model, inputs, rounds: int) -> dict[str, float]:
    """What strict mode's checks cost per forward, two ways, interleaved (alternating order).

    * ``direct``: time spent inside ``LayoutContract.enforce`` during strict forwards, less the
      timer's own cost (the same timer around a pass-through), over the CPU time of a forward
      without any check. Medians over ``rounds``. Stable on a loaded machine.
    * ``ab``: CPU time of a strict forward over that of a forward without checks, minus 1 (the
      direct comparison; on 2 shared cores its resolution is a few percent).

    Forward times are per-thread CPU time (one intra-op thread): other processes on the
    machine barely move them.
    """
    real = LayoutContract.enforce
    spent = [0.0]

    def timed(inner):
        def enforce(self, where, **tensors):
            t0 = time.perf_counter()
            try:
                return inner(self, where, **tensors)
            finally:
                spent[0] += time.perf_counter() - t0

        return enforce

    arms = {
        "off": (_passthrough, False),
        "strict": (real, True),
        "strict_timed": (timed(real), True),
        "off_timed": (timed(_passthrough), False),
    }
    results: dict[str, list[tuple[float, float]]] = {a: [] for a in arms}
    mp = pytest.MonkeyPatch()
    try:
        with torch.no_grad():
            for i in range(rounds):
                for arm in list(arms) if i % 2 == 0 else list(arms)[::-1]:
                    enforce, strict = arms[arm]
                    mp.setattr(LayoutContract, "enforce", enforce)
                    set_strict_layout(model, strict)
                    spent[0] = 0.0
                    t0 = time.thread_time()
                    call(model, inputs)
                    results[arm].append((time.thread_time() - t0, spent[0]))
    finally:
        mp.undo()
        set_strict_layout(model, False)

    def med(arm: str, i: int) -> float:
        return statistics.median(r[i] for r in results[arm])

    forward = med("off", 0)
    return dict(
        forward=forward,
        direct=(med("strict_timed", 1) - med("off_timed", 1)) / forward,
        ab=med("strict", 0) / forward - 1,
    )


@pytest.mark.parametrize("mode", [QuantMode.DISABLED, QuantMode.FP8_E4M3FN_FAST], ids=str)
def test_strict_mode_checks_cost_under_2_percent_of_a_tiny_forward(talk_base, mode):
    model = quant.quantize(copy.deepcopy(talk_base), mode)
    inputs = make_inputs(model.config, speakers=2)
    checks = []
    with torch.no_grad():
        for _ in range(2):
            call(model, inputs)  # warm-up: caches, allocator
        with layout.listen(checks.append):
            call(model, inputs)
    attempts = []
    for _ in range(3):  # a noisy machine gets two more tries; a real 2 % cost fails all three
        attempts.append(_strict_cost(model, inputs, rounds=15))
        if attempts[-1]["direct"] < 0.02:
            break
    best = min(attempts, key=lambda a: a["direct"])
    print(
        f"\n{mode}: {len(checks)} operand checks per forward; forward {best['forward'] * 1e3:.2f} ms "
        f"CPU; strict-mode checks {best['direct']:.2%} of it (strict on vs off: {best['ab']:+.2%})"
    )
    assert best["direct"] < 0.02, f"checks cost {[format(a['direct'], '.2%') for a in attempts]} of a forward"
    assert best["ab"] < 0.10  # the A/B comparison agrees within its resolution
