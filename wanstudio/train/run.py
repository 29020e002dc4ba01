"""``python -m wanstudio.train``: the command line, and ``fit``: the stages in order, then the
output folder."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write
from ..pipeline.tiny_weights import WEIGHT_FILES, load_tiny_trained, save_tiny_trained, set_latent_stats
from . import dataset
from .evaluate import mouth_probe
from .train import PLANS, Budget, Log, build_pool, latent_stats, train_dit, train_vae, vae_curriculum


def _plan(args) -> dict:
    kind = "quick" if args.quick else ("gpu" if args.device.startswith("cuda") else "cpu")
    plan = {k: (list(v) if isinstance(v, tuple) else v) for k, v in PLANS[kind].items()}
    for stage in ("vae", "dit"):
        for i, name in enumerate(("steps", "seconds", "batch")):
            value = getattr(args, f"{stage}_{name}")
            if value is not None:
                plan[stage][i] = value
    if args.pool is not None:
        plan["pool"] = args.pool
    plan["kind"] = kind
    return plan


def build_parts(seed: int, device, data_folder: Path):
    """The tiny preset's parts as ``InfiniteTalkPipeline.tiny(seed)`` makes them, with the
    encoders' weights from the data folder (the ones the features were computed with)."""
    from safetensors.torch import load_file

    from ..config import WanConfig
    from ..encoders import VAE
    from ..model import WanModel

    cfg = WanConfig.preset("tiny-infinitetalk")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WanModel(cfg)
        vae = VAE.tiny(seed=seed)
    text, image, audio = dataset.tiny_encoders(seed=0)
    state = load_file(str(data_folder / dataset.ENCODERS_FILE))
    for prefix, part in (("text", text), ("image", image), ("audio", audio)):
        sub = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
        part.model.load_state_dict(sub, strict=False)
    vae.model.to(device)
    image.model.to(device)
    text.model.to(device)
    audio.model.to(device)
    vae.latents_mean, vae.latents_std = vae.latents_mean.to(device), vae.latents_std.to(device)
    return model.to(device), vae, text, image, audio


def fit(args) -> int:
    """Train, evaluate and write the output folder (see wanstudio/train/train.py)."""
    t_start = time.perf_counter()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    plan = _plan(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_folder = Path(args.data)
    data = dataset.SpeechData.load(data_folder)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng([args.seed, 1])
    model, vae, text, image, audio = build_parts(args.seed, device, data_folder)
    sampler = dataset.ClipSampler(data, device=device)
    log = Log(every_s=2.0 if plan["kind"] != "gpu" else 10.0)
    print(
        f"fit: {plan['kind']} plan on {device}; {len(data.lengths)} utterances, {int(data.lengths.sum())} frames",
        flush=True,
    )

    vae_budget = Budget(*plan["vae"])
    vae_steps = train_vae(vae, vae_curriculum(data, plan, device), rng, vae_budget, log)
    probe = mouth_probe(
        lambda v: vae.model.encode(v).latent_dist.mean,
        sampler,
        np.random.default_rng([args.seed, 2]),
        data.mouth[:, 0],
        batches=2 if plan["kind"] == "quick" else 16,
    )
    print(f"vae: mouth probe r {probe} (the DiT can only learn lips the latents hold)", flush=True)
    mean, std = latent_stats(vae, sampler, rng, batches=4, batch=max(2, plan["pool_batch"] // 4))
    set_latent_stats(vae, mean, std)
    t_pool = time.perf_counter()
    pool = build_pool(vae, image, sampler, rng, plan["pool"], plan["pool_batch"])
    contexts = torch.from_numpy(data.context).to(device)
    print(f"pool: {len(pool)} clips in {time.perf_counter() - t_pool:.1f} s", flush=True)
    dit_budget = Budget(*plan["dit"])
    if args.deadline:  # leave time to save and evaluate (about a minute on a GPU)
        left = args.deadline - (time.perf_counter() - t_start) - (30 if args.no_eval else 75)
        dit_budget.seconds = max(10.0, min(dit_budget.seconds, left))
    dit_steps = train_dit(model, pool, contexts, dit_budget, log, seed=args.seed)
    del pool
    paths = save_tiny_trained(out, model, vae, text, image, audio)
    atomic_write(out / "loss.csv", lambda f: f.write(log.csv().encode()))

    metrics = dict(
        vae=dict(steps=vae_steps, final_loss=_tail(log, "vae"), mouth_probe=probe),
        dit=dict(steps=dit_steps, first_loss=_head(log, "dit"), final_loss=_tail(log, "dit")),
        train_seconds=round(time.perf_counter() - t_start, 1),
    )
    if not args.no_eval:
        metrics["pipeline"] = _evaluate(out, data, device, quick=args.quick)
    metrics["total_seconds"] = round(time.perf_counter() - t_start, 1)
    atomic_write(out / "metrics.json", lambda f: f.write(json.dumps(metrics, indent=2).encode()))
    provenance = _provenance(args, plan, data, data_folder, metrics, paths)
    atomic_write(out / "PROVENANCE.md", lambda f: f.write(provenance.encode()))
    print(json.dumps(metrics, indent=2), flush=True)
    return 0


def _evaluate(folder: Path, data, device, quick: bool) -> dict:
    """Reload the written weights into fresh tiny parts and run the pipeline on held-out speech."""
    from ..pipeline import InfiniteTalkPipeline
    from .evaluate import evaluate, heldout_speech, preview

    t0 = time.perf_counter()
    pipe = InfiniteTalkPipeline.tiny(seed=0, device=device)
    load_tiny_trained(pipe.model, pipe.vae, pipe.text_encoder, pipe.image_encoder, pipe.audio_encoder, folder)
    for part in (pipe.vae, pipe.image_encoder, pipe.audio_encoder, pipe.text_encoder):
        part.model.to(device)
    pipe.vae.latents_mean = pipe.vae.latents_mean.to(device)
    pipe.vae.latents_std = pipe.vae.latents_std.to(device)
    tracks = {"speech_wav": heldout_speech(), "espeak": (data.heldout_wave, data.heldout_pause)}
    kw = {}
    if quick:  # one short piece and 2 steps: the wiring, not the quality
        wave, pause = tracks["speech_wav"]
        tracks = {"speech_wav": (wave[: int((pause[1] + 0.6) * 16000)], pause)}
        kw = dict(steps=2, guidance={"default": (5.0, 4.0)})
    metrics, keep = {}, None
    for track, (wave, pause) in tracks.items():
        m, frames = evaluate(pipe, wave, pause, loudness=None, **kw)
        metrics.update({f"{track}/{k}": v for k, v in m.items()})
        if keep is None:
            keep = (frames, wave)
        print(f"eval {track}: {json.dumps(m)}", flush=True)
    preview(*keep, folder / "preview.png")
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    return metrics


def _head(log: Log, stage: str, n: int = 20) -> float:
    values = [r[3] for r in log.rows if r[0] == stage][:n]
    return round(float(np.mean(values)), 5) if values else float("nan")


def _tail(log: Log, stage: str, n: int = 50) -> float:
    values = [r[3] for r in log.rows if r[0] == stage][-n:]
    return round(float(np.mean(values)), 5) if values else float("nan")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _commit() -> str:
    if os.environ.get("WANSTUDIO_COMMIT"):
        return os.environ["WANSTUDIO_COMMIT"]
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return done.stdout.strip() or "unknown (no git here)"
    except OSError:
        return "unknown (no git here)"


def _provenance(args, plan, data, data_folder: Path, metrics: dict, paths) -> str:
    here = Path(__file__).resolve().parent
    sources = sorted(here.glob("*.py")) + [here.parent / "eval.py"]
    device = args.device
    if device.startswith("cuda"):
        device = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("diffusers", "transformers", "numpy"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "absent"
    lines = [
        "# Provenance of the tiny-infinitetalk trained weights",
        "",
        "Trained by wanstudio's own code (`wanstudio/train/`) on procedurally drawn faces and",
        "eSpeak NG speech; no photograph, recording or third-party model weights are involved.",
        "The tiny umT5 / CLIP / wav2vec2 are seeded random weights (not trained), stored as used.",
        "",
        f"- command: `python -m wanstudio.train {' '.join(sys.argv[1:]) or 'fit'}`",
        f"- commit: {_commit()}",
        f"- seed: {args.seed}; plan: {plan['kind']} (vae {plan['vae']}, stages {plan['vae_stages']}, dit {plan['dit']}, pool {plan['pool']})",
        f"- device: {device}; {platform.platform()}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in versions.items())}",
        f"- data: {json.dumps({k: data.meta[k] for k in ('seed', 'utterances', 'frames', 'minutes', 'speech', 'espeak')})}",
        "- data files: "
        + ", ".join(
            f"{n} sha256 {_sha256(data_folder / n)[:16]}"
            for n in (dataset.SPEECH_FILE, dataset.ENCODERS_FILE)
        ),
        "- training sources: " + ", ".join(f"{p.name} {_sha256(p)[:12]}" for p in sources),
        "- weights: " + ", ".join(f"{Path(p).name} sha256 {_sha256(Path(p))[:16]}" for p in paths),
        "",
        "## Metrics",
        "",
        "```json",
        json.dumps(metrics, indent=2),
        "```",
        "",
    ]
    assert len(paths) == len(WEIGHT_FILES)
    return "\n".join(lines)


# --- the command line -----------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    """The ``python -m wanstudio.train`` command line: ``data`` (make the speech data) or ``fit``."""
    p = argparse.ArgumentParser(
        prog="python -m wanstudio.train",
        description="Train the tiny InfiniteTalk preset (see wanstudio/train/train.py).",
    )
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="make the speech half of the training set (CPU, espeak-ng)")
    d.add_argument("--out", default=".traindata", help="folder (default .traindata)")
    d.add_argument("--utterances", type=int, default=400)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--babble", action="store_true", help="synthetic babble instead of espeak-ng")
    f = sub.add_parser("fit", help="train the VAE and the DiT, evaluate, write the weights")
    f.add_argument("--data", default=".traindata", help="folder made by `data`")
    f.add_argument("--out", required=True, help="output folder (weights, loss.csv, metrics, provenance)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--device", default=None, help="default: cuda when available")
    f.add_argument("--quick", action="store_true", help="a 1-2 minute CPU smoke run (tiny budgets)")
    f.add_argument("--vae-steps", type=int, default=None)
    f.add_argument("--vae-seconds", type=float, default=None)
    f.add_argument("--vae-batch", type=int, default=None)
    f.add_argument("--dit-steps", type=int, default=None)
    f.add_argument("--dit-seconds", type=float, default=None)
    f.add_argument("--dit-batch", type=int, default=None)
    f.add_argument("--pool", type=int, default=None, help="encoded clips the DiT trains on")
    f.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    f.add_argument("--no-eval", action="store_true", help="skip the pipeline evaluation")
    f.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds the whole fit may take: the DiT stage ends early enough to leave time to save and evaluate",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Entry point of ``python -m wanstudio.train``."""
    args = parse_args(argv)
    if args.command == "data":
        dataset.build_dataset(
            args.out, seed=args.seed, utterances=args.utterances, use_espeak=False if args.babble else None
        )
        print(f"wrote {args.out}/{dataset.SPEECH_FILE} and {dataset.ENCODERS_FILE}")
        return 0
    return fit(args)
