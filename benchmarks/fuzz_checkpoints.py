"""Fuzz the checkpoint reader and loader at length; print counts by outcome (CPU only).

    python benchmarks/fuzz_checkpoints.py                          # 5,000 reader cases + 500 loader
    python benchmarks/fuzz_checkpoints.py --cases 20000 --seed 3
    python benchmarks/fuzz_checkpoints.py --loader-cases 0         # the reader only

The fuzzer is ``tests/checkpoint_fuzzer.py`` (the one CI runs a few hundred cases of, in
``tests/test_fuzz_checkpoints.py``): structural mutations of a valid file written by the
``safetensors`` library, which is the oracle. ``--cases`` mutate a small file of many dtypes
(checked through ``SafetensorsFile`` + ``read_tensor``); ``--loader-cases`` mutate a whole tiny
Wan model (checked through the reader and ``wanstudio.load_model``). The first case that breaks
the rule stops the run with its seed, index and mutations, so it can be replayed. Every
``CheckpointError`` must name the file. Times are wanstudio's alone (the reader, or
``load_model`` on loader cases), not the oracle's; the header gives torch's thread count and the
load average, which decide them on a shared machine (torch splits each op of a tensor over
32K elements across its threads; with a busy core every such op waits for a time slice).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import safetensors
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import checkpoint_fuzzer as fuzz  # noqa: E402 (lives beside the tests that use it)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=5000, help="mutations of the small file")
    p.add_argument(
        "--loader-cases", type=int, default=None, help="mutations of a tiny model (default cases/10)"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    loader_cases = args.cases // 10 if args.loader_cases is None else args.loader_cases

    reader, loader = fuzz.Report(), fuzz.Report()
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        fuzz.run(fuzz.small_state(), Path(folder), args.cases, seed=args.seed, loader=False, report=reader)
        if loader_cases:
            state = fuzz.tiny_model_state()
            fuzz.run(state, Path(folder), loader_cases, seed=args.seed, loader=True, report=loader)
    total_s = time.perf_counter() - start

    print(
        f"# fuzz_checkpoints: seed {args.seed}; torch {torch.__version__}, safetensors "
        f"{safetensors.__version__}, Python {platform.python_version()}, {platform.machine()}; "
        f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}, load average "
        f"{load_before:.1f} before / {os.getloadavg()[0]:.1f} after"
    )
    print(
        f"cases run: {reader.cases + loader.cases}, rule broken: 0 (a broken case stops the run; "
        f"every CheckpointError named the file); {total_s:.1f} s"
    )
    for title, report in (
        ("small file of many dtypes: SafetensorsFile + read_tensor", reader),
        ("whole tiny-t2v model: SafetensorsFile + read_tensor, then load_model", loader),
    ):
        if not report.cases:
            continue
        print(f"\n## {report.cases} cases, {title}")
        for what, s, label in (
            ("refusal", report.slowest_refusal_s, report.slowest_refusal),
            ("load", report.slowest_load_s, report.slowest_load),
        ):
            print(f"slowest {what} {s * 1e3:.0f} ms (wanstudio's time): {label or 'none'}")
        for outcome, n in sorted(report.outcomes.items(), key=lambda kv: -kv[1]):
            print(f"  {outcome:<66} {n:>6}")
    mutations = reader.mutations + loader.mutations
    print("\n## mutations applied (1-3 per case)")
    for name, n in sorted(mutations.items()):
        print(f"  {name:<20}{n:>7}")


if __name__ == "__main__":
    main()
