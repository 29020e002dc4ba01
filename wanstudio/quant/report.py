"""quant_report: measured accuracy and memory of a quantization mode on a model and inputs.

Per layer: the SQNR of the quantized layer's output against the unquantized layer's, on the
very activations the unquantized model feeds it (so each number is that layer's own error,
not the error accumulated upstream). Whole model: the SQNR of the quantized model's output
against the unquantized model's, on the same inputs. Both in dB, computed in fp64.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..options import QuantMode
from .apply import DEFAULT_KEEP, _set_submodule, quantizable_linears
from .linear import QuantizedLinear
from .spec import spec_for


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio of ``approx`` against ``reference``, in dB (fp64)."""
    ref = reference.detach().double()
    signal = ref.pow(2).sum().item()
    noise = (ref - approx.detach().double()).pow(2).sum().item()
    return _db(signal, noise)


def _db(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


@dataclass(frozen=True)
class LayerQuantStats:
    """One quantized layer's numbers."""

    name: str
    in_features: int
    out_features: int
    path: str  # 'dequantize' / 'scaled_mm' / 'fp4_native'
    detail: str  # how and why (e.g. why a fast layer fell back to dequantize)
    sqnr_db: float  # output SQNR on the unquantized model's activations (inf if never called)
    base_bytes: int  # weight bytes in base precision
    quant_bytes: int  # quantized weight + scales
    calls: int  # forward calls seen during the measurement

    @property
    def ratio(self) -> float:
        return self.quant_bytes / self.base_bytes if self.base_bytes else math.nan


@dataclass
class QuantReport:
    """Result of :func:`quant_report`; ``_repr_html_`` renders it in notebooks."""

    mode: QuantMode
    model_sqnr_db: float
    layers: list[LayerQuantStats]
    kept: list[str] = field(default_factory=list)  # Linear layers left in base precision
    device: str = ""
    dtype: str = ""

    @property
    def base_bytes(self) -> int:
        return sum(layer.base_bytes for layer in self.layers)

    @property
    def quant_bytes(self) -> int:
        return sum(layer.quant_bytes for layer in self.layers)

    def worst(self, n: int = 5) -> list[LayerQuantStats]:
        """The ``n`` layers with the lowest SQNR: the candidates for the keep-list."""
        return sorted(self.layers, key=lambda layer: layer.sqnr_db)[:n]

    def paths(self) -> dict[str, int]:
        """How many layers run each kernel path."""
        out: dict[str, int] = {}
        for layer in self.layers:
            out[layer.path] = out.get(layer.path, 0) + 1
        return out

    def summary(self) -> str:
        """One line: mode, whole-model SQNR, layers per path, and weight bytes before -> after."""
        ratio = self.quant_bytes / self.base_bytes if self.base_bytes else math.nan
        paths = ", ".join(f"{p} x{c}" for p, c in self.paths().items()) or "none"
        return (
            f"quantization {self.mode.value}: whole-model SQNR {_fmt_db(self.model_sqnr_db)}; "
            f"{len(self.layers)} layers quantized ({paths}), {len(self.kept)} kept; "
            f"weights {_fmt_bytes(self.base_bytes)} -> {_fmt_bytes(self.quant_bytes)} "
            f"({ratio:.2f}x) on {self.device} {self.dtype}"
        )

    def common_details(self) -> dict[str, str]:
        """The most frequent detail of each path (rows print only details that differ)."""
        counts: dict[tuple[str, str], int] = {}
        for layer in self.layers:
            counts[(layer.path, layer.detail)] = counts.get((layer.path, layer.detail), 0) + 1
        best: dict[str, tuple[int, str]] = {}
        for (path, detail), c in counts.items():
            if c > best.get(path, (0, ""))[0]:
                best[path] = (c, detail)
        return {path: detail for path, (_, detail) in best.items()}

    def to_text(self, limit: int | None = None) -> str:
        """The summary and a table of the first ``limit`` layers (all if None): shape, SQNR, bytes, path."""
        rows = self.layers if limit is None else self.layers[:limit]
        common = self.common_details()
        width = max([len("layer")] + [len(r.name) for r in rows])
        lines = [
            self.summary(),
            f"{'layer':<{width}}  {'K x N':>11}  {'SQNR dB':>7}  {'bytes':>10}  {'ratio':>5}  path",
        ]
        for r in rows:
            note = "" if r.detail == common.get(r.path) else f" ({r.detail})"
            lines.append(
                f"{r.name:<{width}}  {f'{r.in_features}x{r.out_features}':>11}  "
                f"{_fmt_db(r.sqnr_db, unit=False):>7}  {r.quant_bytes:>10}  {r.ratio:>5.2f}  "
                f"{r.path}{note}"
            )
        if limit is not None and len(self.layers) > limit:
            lines.append(f"... {len(self.layers) - limit} more layers")
        for path, detail in common.items():
            lines.append(f"{path}: {detail}")
        worst = self.worst(3)
        if worst:
            lines.append("worst layers: " + ", ".join(f"{r.name} ({_fmt_db(r.sqnr_db)})" for r in worst))
        if self.kept:
            lines.append(f"kept in base precision ({len(self.kept)}): " + ", ".join(self.kept))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()

    def _repr_html_(self) -> str:
        e = html.escape
        worst = {r.name for r in self.worst(3)}
        rows = []
        for r in self.layers:
            style = ' style="background:#fdecea"' if r.name in worst else ""
            rows.append(
                f"<tr{style}><td><code>{e(r.name)}</code></td><td>{r.in_features}&times;"
                f"{r.out_features}</td><td style='text-align:right'>{e(_fmt_db(r.sqnr_db, unit=False))}"
                f"</td><td style='text-align:right'>{e(_fmt_bytes(r.quant_bytes))}</td>"
                f"<td style='text-align:right'>{r.ratio:.2f}</td><td>{e(r.path)}</td>"
                f"<td>{e(r.detail)}</td></tr>"
            )
        kept = ", ".join(f"<code>{e(k)}</code>" for k in self.kept[:20])
        more = f" and {len(self.kept) - 20} more" if len(self.kept) > 20 else ""
        return (
            f"<div><p><b>{e(self.summary())}</b></p>"
            "<table><thead><tr><th>layer</th><th>K&times;N</th><th>SQNR dB</th><th>bytes</th>"
            "<th>ratio</th><th>path</th><th>how / why</th></tr></thead><tbody>"
            + "".join(rows)
            + "</tbody></table>"
            + (f"<p>kept in base precision: {kept}{more}</p>" if self.kept else "")
            + "<p>Rows shaded: the 3 lowest-SQNR layers (add them to <code>keep=</code> to trade "
            "memory for accuracy).</p></div>"
        )


def _fmt_db(v: float, unit: bool = True) -> str:
    s = "inf" if math.isinf(v) and v > 0 else f"{v:.1f}"
    return f"{s} dB" if unit else s


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, torch.Tensor):
                return item
    if isinstance(out, dict):
        for item in out.values():
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(f"the model returned {type(out).__name__}; quant_report needs a tensor output")


def _call(model: nn.Module, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


@torch.no_grad()
def quant_report(
    model: nn.Module,
    mode: QuantMode | str,
    inputs: dict | tuple,
    *,
    keep: Sequence[str] = DEFAULT_KEEP,
    only_under: str = "blocks.",
) -> QuantReport:
    """Measure ``mode`` on an unquantized ``model``: per-layer and whole-model SQNR, bytes, paths.

    Args:
        model: an unquantized model; it is left exactly as it was (quantized layers are swapped
            in for the second forward pass and swapped back out).
        mode: the quantization mode to measure.
        inputs: forward arguments: a dict (keyword arguments) or a tuple (positional).
        keep, only_under: as for :func:`quantize`.

    Runs the model twice and holds one quantized copy of the quantized layers meanwhile.
    """
    spec = spec_for(mode)
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise ValueError("quant_report measures an unquantized model; this one is already quantized")
    keep = tuple(keep)
    targets = dict(quantizable_linears(model, keep=keep, only_under=only_under))
    kept = [n for n, m in model.named_modules() if type(m) is nn.Linear and n not in targets]
    quantized: dict[str, QuantizedLinear] = {}
    if spec.storage is not None:
        for name, lin in targets.items():
            q = QuantizedLinear.from_linear(lin, spec.mode)
            q._layout_name = name
            quantized[name] = q
    sums = {name: [0.0, 0.0, 0] for name in quantized}  # signal, noise, calls
    act_dtypes: dict[str, torch.dtype] = {}

    def hook(name):
        def fn(module, args, output):
            approx = quantized[name](args[0])
            ref = output.detach().double()
            s = sums[name]
            s[0] += ref.pow(2).sum().item()
            s[1] += (ref - approx.double()).pow(2).sum().item()
            s[2] += 1
            act_dtypes[name] = args[0].dtype

        return fn

    handles = [targets[name].register_forward_hook(hook(name)) for name in quantized]
    try:
        reference = _first_tensor(_call(model, inputs))
    finally:
        for h in handles:
            h.remove()
    try:
        for name, q in quantized.items():
            _set_submodule(model, name, q)
        approx = _first_tensor(_call(model, inputs))
    finally:
        for name, lin in targets.items():
            _set_submodule(model, name, lin)

    layers = []
    for name, q in quantized.items():
        lin = targets[name]
        signal, noise, calls = sums[name]
        path, detail = q.path_for(lin.weight.device, act_dtypes.get(name, q.compute_dtype))
        layers.append(
            LayerQuantStats(
                name=name,
                in_features=q.in_features,
                out_features=q.out_features,
                path=path,
                detail=detail,
                sqnr_db=_db(signal, noise) if calls else math.inf,
                base_bytes=lin.weight.nbytes,
                quant_bytes=q.weight_nbytes,
                calls=calls,
            )
        )
    some = next(iter(targets.values()), None)
    return QuantReport(
        mode=spec.mode,
        model_sqnr_db=sqnr_db(reference, approx),
        layers=layers,
        kept=kept,
        device=str(some.weight.device) if some is not None else "",
        dtype=str(some.weight.dtype).replace("torch.", "") if some is not None else "",
    )
