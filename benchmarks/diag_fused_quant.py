"""Where the fused per-token e4m3 quantization differs from eager torch, and why.

    python benchmarks/diag_fused_quant.py              # CUDA: the Triton kernel vs fp8.quantize_rows_eager
    python benchmarks/diag_fused_quant.py --emulate    # CPU: both paths emulated exactly (no GPU)

For each (K, dtype) of ``tests/gpu/test_quant_gpu.py::test_fused_activation_quantization_matches_eager``
(same inputs: 333 rows ~ N(0, 9), row 7 all zero) it prints: the fraction of e4m3 codes that
differ, how many of those are at ties (one code step apart, with the exact x / s within the
test's ``TIE_RTOL`` of the midpoint of the two values), the largest code-step difference, the
rows whose scales differ (by how many fp32 ulps), and whether every differing code sits in such
a row. The claim the test checks: differences are one-step ties caused by a last-bit difference
of the scale (eager CUDA computes ``amax / 448`` as ``amax * fl(1 / 448)``; the kernel divides).

``--emulate`` computes both paths in float64 and rounds like the GPU does: the kernel's scale
fl(amax / 448) and quotient fl(x / s); eager's scale fl(amax * fl(1 / 448)) and quotient
fl(x / s); torch's round-to-nearest-even e4m3 cast for both.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.gpu.test_quant_gpu import TIE_RTOL, fused_vs_eager_mismatches  # noqa: E402
from wanstudio.quant import fp8, kernels  # noqa: E402

KS = [256, 5120, 13824, 200]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
E4 = torch.float8_e4m3fn
ULP = 2.0**-23  # fp32 ulp at the bottom of a binade, relative


def _cast(q: torch.Tensor) -> torch.Tensor:
    return q.clamp(-448.0, 448.0).to(E4)


def emulated(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(q, s) of the kernel and (q_ref, s_ref) of eager CUDA torch, on the CPU."""
    xf = x.float()
    amax = xf.abs().amax(dim=1, keepdim=True)  # (M, 1)
    s = (amax.double() / 448.0).float().clamp(min=fp8._TINY)  # IEEE division
    inv = (torch.tensor(1.0, dtype=torch.float64) / 448.0).float()  # fl(1 / 448)
    s_ref = (amax.double() * inv.double()).float().clamp(min=fp8._TINY)  # exact product, one rounding
    q = _cast((xf.double() / s.double()).float())  # float64 / then one rounding: IEEE fp32 division
    q_ref = _cast((xf.double() / s_ref.double()).float())
    return q, s, q_ref, s_ref


def measured(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    q, s = kernels.quantize_rows_triton(x)
    q_ref, s_ref = fp8.quantize_rows_eager(x)
    return q, s, q_ref, s_ref


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--emulate", action="store_true", help="emulate both paths on the CPU")
    args = ap.parse_args()
    if args.emulate:
        device, run = torch.device("cpu"), emulated
        print("emulated on the CPU (kernel: IEEE division; eager: reciprocal multiply for the scale)")
    else:
        if not (torch.cuda.is_available() and kernels.HAS_TRITON):
            print("needs CUDA and Triton (or --emulate)", file=sys.stderr)
            return 2
        device, run = torch.device("cuda"), measured
        cap = torch.cuda.get_device_capability(device)
        print(f"{torch.cuda.get_device_name(device)} (sm_{cap[0]}{cap[1]}), torch {torch.__version__}")
    print(f"TIE_RTOL = {TIE_RTOL:.3e} ({TIE_RTOL / ULP:.2f} fp32 ulp)")
    print(
        f"{'K':>6} {'dtype':>9} {'differ':>9} {'count':>6} {'at ties':>7} {'max step':>8} "
        f"{'max dist/ulp':>12} {'rows s differ':>13} {'max s ulps':>10} {'all in them':>11}"
    )
    for dtype in DTYPES:
        for k in KS:
            g = torch.Generator(device=device).manual_seed(1)
            x = (torch.randn(333, k, device=device, generator=g) * 3).to(dtype)
            x[7] = 0
            q, s, q_ref, s_ref = run(x)
            bad, steps, dist = fused_vs_eager_mismatches(x, q, s, q_ref, s_ref)
            n = int(bad.sum())
            ties = int(((steps == 1) & (dist <= TIE_RTOL)).sum())
            s_rows = (s != s_ref).reshape(-1)
            s_ulps = (s.view(torch.int32) - s_ref.view(torch.int32)).abs().max().item()
            in_rows = bool(s_rows[bad.nonzero()[:, 0]].all()) if n else True
            print(
                f"{k:>6} {str(dtype)[6:]:>9} {n / bad.numel():>9.2e} {n:>6} {ties:>7} "
                f"{int(steps.max()) if n else 0:>8} "
                f"{(dist.max().item() / ULP) if n else 0.0:>12.2f} {int(s_rows.sum()):>13} "
                f"{s_ulps:>10} {'yes' if in_rows else 'NO':>11}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
