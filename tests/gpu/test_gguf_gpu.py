"""GGUF Q8_0 (``gguf_q8_0``) on a CUDA GPU: the fused Triton dequantization against the eager
reference bit for bit, the layer's path and layout, and a Q8_0 GGUF file loaded onto the GPU.

    python -m pytest tests/gpu/test_gguf_gpu.py -m gpu -rs -s

The file test needs the ``gguf`` package (pure Python: carry its wheel); the kernel tests do not.
"""

from __future__ import annotations

import pytest
import torch

import wanstudio as ws
from wanstudio.layout import COPY_COUNTS, listen, strict_layout
from wanstudio.options import QuantMode
from wanstudio.quant import QuantizedLinear, kernels, q8_0, sqnr_db

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
CUDA = torch.device("cuda")


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(5120, 5120), (13824, 5120), (5120, 13824), (37, 100)], ids=str)
def test_fused_q8_0_dequantization_is_bit_exact(shape, dtype):
    n, k = shape
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) * 0.02
    w[: min(n, 3), :64] = 0  # all-zero blocks
    q, d = q8_0.quantize_q8_0(w)  # on the CPU: GGML's rounding, bit for bit
    ref = q8_0.dequantize_q8_0(q, d, k, dtype)
    out = kernels.dequantize_q8_0(q.to(CUDA), d.to(CUDA), k, dtype)
    assert out.dtype == dtype and out.shape == (n, k)
    assert torch.equal(out.cpu(), ref)


def test_q8_0_quantization_on_the_gpu_matches_the_cpu():
    w = torch.randn(512, 1024, generator=torch.Generator().manual_seed(1)) * 0.02
    q, d = q8_0.quantize_q8_0(w)
    qc, dc = q8_0.quantize_q8_0(w.to(CUDA))
    assert torch.equal(qc.cpu(), q) and torch.equal(dc.cpu(), d)


def test_q8_0_layer_path_layout_and_accuracy():
    torch.manual_seed(0)
    lin = torch.nn.Linear(5120, 5120, device=CUDA)
    layer = QuantizedLinear.from_linear(lin, QuantMode.GGUF_Q8_0)
    path, detail = layer.path_for(CUDA, torch.bfloat16)
    assert path == "dequantize"
    if kernels.HAS_TRITON:
        assert "fused Triton kernel" in detail, detail
    x = torch.randn(4096, 5120, device=CUDA).to(torch.bfloat16)
    layer._layout_name = "test.layer"
    events, copies = [], sum(COPY_COUNTS.values())
    with strict_layout(), listen(events.append):
        out = layer(x)
    assert events and not any(e.copied for e in events)  # the kernel's contract checked, no copy
    assert sum(COPY_COUNTS.values()) == copies
    ref = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
    assert sqnr_db(ref, out) >= 43.5  # the CPU bar (44 dB) less bf16 activations


def test_a_q8_0_gguf_file_loads_onto_the_gpu(tmp_path):
    pytest.importorskip("gguf")
    from test_gguf import Q, _seeded, write_gguf

    from wanstudio.gguf_file import GGUFFile, read_blocks

    model = _seeded("tiny-infinitetalk")
    write_gguf(model, tmp_path / "q8.gguf", Q.Q8_0)
    gpu = ws.load_model(tmp_path / "q8.gguf", device="cuda", dtype=torch.bfloat16)
    cpu = ws.load_model(tmp_path / "q8.gguf", dtype=torch.float32)
    layer = gpu.blocks[1].ffn[2]
    assert layer.weight_q8.is_cuda and layer.mode is QuantMode.GGUF_Q8_0
    raw = read_blocks(GGUFFile(tmp_path / "q8.gguf").entries["blocks.1.ffn.2.weight"])
    assert torch.equal(q8_0.to_gguf_blocks(layer.weight_q8, layer.weight_scale).cpu(), raw)
    inputs = ws.ModelInputs.example(model.config, frames=3, height=6, width=10)
    with torch.no_grad():
        ref = cpu(**inputs.as_kwargs())
        out = gpu(**inputs.to(device="cuda", dtype=torch.bfloat16).as_kwargs())
    assert sqnr_db(ref, out.float().cpu()) > 30  # bf16 compute of the same weights
