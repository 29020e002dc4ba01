"""One rank of a real ``torchrun`` launch, for tests/test_parallel.py and tests/gpu/.

    python -m torch.distributed.run --nproc-per-node 2 tests/parallel_ranks.py \\
        --mode ulysses --out /tmp/result.pt [--preset tiny-infinitetalk --heads 2 --speakers 2]
        [--dtype bf16 --attention sdpa --latent 3 6 10 --fail-rank 1]

Every rank builds the same model (seed 0) on ``ctx.device``, computes the one-process result,
then the parallel one (under ``ctx.run``); rank 0 saves both. 'cfg' modes run InfiniteTalk's
guidance calls through ``ctx.predict_conditions``. ``--fail-rank r`` makes rank r raise a
ShapeError at the end of the parallel step (the error must be shown once, by rank 0).
"""

from __future__ import annotations

import argparse
import sys

import torch

import wanstudio as ws
from wanstudio.errors import ShapeError
from wanstudio.parallel import RankAborted, init_parallel
from wanstudio.pipeline.guidance import Guidance, GuidanceConfig


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="tiny-infinitetalk")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--dim", type=int, default=None)
    p.add_argument("--speakers", type=int, default=2)
    p.add_argument("--latent", type=int, nargs=3, default=(3, 6, 10))
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--attention", default="sdpa")
    p.add_argument("--fail-rank", type=int, default=-1)
    args = p.parse_args(argv)

    with init_parallel(args.mode, timeout_s=120, failure_grace_s=10) as ctx:
        device = ctx.device or torch.device("cpu")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        cfg = ws.WanConfig.preset(args.preset).replace(
            num_heads=args.heads, **({"dim": args.dim} if args.dim else {})
        )
        ctx.check_model(cfg)
        dtype = ws.BasePrecision.of(args.dtype).dtype
        torch.manual_seed(0)  # the same weights on every rank
        model = ws.WanModel(cfg).to(device=device, dtype=dtype).eval()
        ws.set_attention(model, args.attention)
        frames, height, width = args.latent
        inputs = ws.ModelInputs.example(
            cfg, frames=frames, height=height, width=width, speakers=args.speakers, device=device, dtype=dtype
        )
        guidance = Guidance(GuidanceConfig())
        null = dict(context=torch.zeros_like(inputs.context))
        if inputs.audio is not None:
            null["audio"] = torch.zeros_like(inputs.audio)

        def predict(c) -> torch.Tensor:
            kw = inputs.as_kwargs()
            if not c.text:
                kw["context"] = null["context"]
            if not c.audio and "audio" in null:
                kw["audio"] = null["audio"]
            with torch.no_grad():
                return model(**kw).float()

        def velocities(split) -> torch.Tensor:
            v = torch.stack(list(split(predict, guidance.conditions).values()))
            if ctx.rank == args.fail_rank:  # after the collectives: the ranks agree on it
                raise ShapeError(f"rank {ctx.rank} was told to fail")
            return v

        reference = velocities(lambda f, cs: {c: f(c) for c in cs}) if args.fail_rank < 0 else None
        ctx.prepare_model(model)
        try:
            parallel = ctx.run(velocities, ctx.predict_conditions)
        except RankAborted:
            return 1  # rank 0 shows the error
        except ws.WanstudioError as e:  # rank 0: shown inside the with, before the others leave
            print(f"error: {e}", file=sys.stderr)
            return 1
        if ctx.is_writer:
            torch.save({"reference": reference.cpu(), "parallel": parallel.cpu()}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
