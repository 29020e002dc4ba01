"""What merging a LoRA at load costs for the 14B DiT (issue 16: target < 30 s).

Writes a random-weight infinitetalk-14b checkpoint (bf16, one safetensors file) and a random
rank-64 kijai-format LoRA on every Linear of every block (as lightx2v's distill LoRA), then
times ``ws.load_model`` to the GPU three ways in one process: bf16, ``fp8_e4m3fn_scaled``, and
the LoRA merged then ``fp8_e4m3fn_scaled`` (what the distilled setting loads). The file is read
once before timing (page cache warm), so the figures are the loader's, not the disk's.

    python benchmarks/lora_load.py [--folder /tmp]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch
from clip_e2e import random_lora
from safetensors.torch import save_file

import wanstudio as ws


def random_checkpoint(model: ws.WanModel, path: str) -> int:
    """Every tensor of ``model`` (a meta model) as random bf16 weights in one file; its bytes."""
    g = torch.Generator(device="cuda").manual_seed(0)
    tensors = {
        name: (torch.randn(t.shape, device="cuda", generator=g) * 0.02).bfloat16().cpu()
        for name, t in model.state_dict().items()
    }
    save_file(tensors, path)
    return os.path.getsize(path)


def timed_load(path: str, **kw) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    model = ws.load_model(path, device="cuda", dtype=torch.bfloat16, **kw)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", default="/tmp")
    p.add_argument("--rank", type=int, default=64)
    args = p.parse_args()
    with torch.device("meta"):
        model = ws.WanModel(ws.WanConfig.preset("infinitetalk-14b"))
    dit = os.path.join(args.folder, "lora_load_dit.safetensors")
    t0 = time.perf_counter()
    size = random_checkpoint(model, dit)
    lora = random_lora(model, args.rank, os.path.join(args.folder, "lora_load_lora.safetensors"))
    print(f"wrote {size / 2**30:.1f} GiB DiT + LoRA in {time.perf_counter() - t0:.0f} s", flush=True)
    with open(dit, "rb") as f:  # warm the page cache
        while f.read(1 << 28):
            pass
    fp8 = "fp8_e4m3fn_scaled"
    rows = [
        ("bf16", timed_load(dit)),
        (fp8, timed_load(dit, quantization=fp8)),
        (f"{fp8} + rank-{args.rank} LoRA", timed_load(dit, loras=[lora], quantization=fp8)),
    ]
    print(
        f"\nCard: {torch.cuda.get_device_name()}, torch {torch.__version__}; infinitetalk-14b, random weights, "
    )
    print("one bf16 safetensors file in the page cache; LoRA on every block Linear (kijai format)\n")
    print("| load_model to cuda | seconds |")
    print("|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} |")
    print(f"\nLoRA merge at load ({fp8}): +{rows[2][1] - rows[1][1]:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
