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
from ..errors import WanstudioError
from ..pipeline.tiny_weights import (
    DIT_FILE,
    VAE_FILE,
    WEIGHT_FILES,
    load_tiny_dit,
    load_tiny_trained,
    load_tiny_vae,
    save_tiny_trained,
    set_latent_stats,
)
from . import dataset
from .evaluate import motion_fidelity, mouth_probe, round_trip_fade
from .train import (
    PLANS,
    Budget,
    Log,
    build_pool,
    latent_stats,
    train_decoder,
    train_dit,
    train_vae,
    vae_curriculum,
)


def _plan(args) -> dict:
    kind = "quick" if args.quick else ("gpu" if args.device.startswith("cuda") else "cpu")
    plan = {k: (list(v) if isinstance(v, tuple) else v) for k, v in PLANS[kind].items()}
    for stage in ("vae", "decoder", "dit"):
        for i, name in enumerate(("steps", "seconds", "batch", "lr")):
            value = getattr(args, f"{stage}_{name}")
            if value is not None:
                plan[stage][i] = value
    if args.pool is not None:
        plan["pool"] = args.pool
    plan["kind"] = kind
    return plan


def _device(args) -> torch.device:
    """The training device (``--device``, else cuda when there is one), threads and TF32 set."""
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return device


def _start(args, stream: int):
    """(device, output folder, data folder, its SpeechData, a numpy rng seeded with
    ``[seed, stream]``); torch seeded with ``--seed``. The output folder is made once the
    inputs have loaded: a wrong input leaves nothing behind."""
    device = _device(args)
    out = Path(args.out)
    data_folder = Path(args.data)
    data = dataset.SpeechData.load(data_folder)
    torch.manual_seed(args.seed)
    return device, out, data_folder, data, np.random.default_rng([args.seed, stream])


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
    device, out, data_folder, data, rng = _start(args, stream=1)
    plan = _plan(args)
    model, vae, text, image, audio = build_parts(args.seed, device, data_folder)
    if args.vae_from:  # a VAE trained before: train the DiT on its latents
        load_tiny_vae(vae, Path(args.vae_from) / VAE_FILE)
    if args.dit_from:  # a DiT trained before (on this VAE's latents): train it further
        load_tiny_dit(model, Path(args.dit_from) / DIT_FILE)
    out.mkdir(parents=True, exist_ok=True)  # before training: an unwritable folder fails now
    sampler = dataset.ClipSampler(data, device=device)
    log = Log(every_s=2.0 if plan["kind"] != "gpu" else 10.0)
    print(
        f"fit: {plan['kind']} plan on {device}; {len(data.lengths)} utterances, {int(data.lengths.sum())} frames",
        flush=True,
    )

    if args.vae_from:
        vae_steps = 0
        print(f"vae: loaded from {args.vae_from}", flush=True)
    else:
        vae_budget = Budget(*plan["vae"])
        vae_steps = train_vae(
            vae,
            vae_curriculum(data, plan, device),
            rng,
            vae_budget,
            log,
            readout_weight=args.readout_weight,
            motion_weight=args.motion_weight,
        )
    probe = mouth_probe(
        lambda v: vae.model.encode(v).latent_dist.mean,
        sampler,
        np.random.default_rng([args.seed, 2]),
        data.mouth[:, 0],
        batches=2 if plan["kind"] == "quick" else 16,
    )
    print(f"vae: mouth probe r {probe} (the DiT can only learn lips the latents hold)", flush=True)
    if not args.vae_from:
        mean, std = latent_stats(vae, sampler, rng, batches=4, batch=max(2, plan["pool_batch"] // 4))
        set_latent_stats(vae, mean, std)
    checks = 1 if plan["kind"] == "quick" else 4
    decoder_metrics = _decoder_stage(vae, sampler, rng, Budget(*plan["decoder"]), log, args, checks)
    t_pool = time.perf_counter()
    pool = build_pool(vae, image, sampler, rng, plan["pool"], plan["pool_batch"])
    contexts = torch.from_numpy(data.context).to(device)
    print(f"pool: {len(pool)} clips in {time.perf_counter() - t_pool:.1f} s", flush=True)
    dit_budget = Budget(*plan["dit"])
    if args.deadline:  # leave time to save and evaluate (about a minute on a GPU)
        left = args.deadline - (time.perf_counter() - t_start) - (30 if args.no_eval else 75)
        dit_budget.seconds = max(10.0, min(dit_budget.seconds, left))
    dit_steps = train_dit(model, pool, contexts, dit_budget, log, seed=args.seed, round_trip=args.round_trip)
    del pool
    paths = save_tiny_trained(out, model, vae, text, image, audio)
    atomic_write(out / "loss.csv", lambda f: f.write(log.csv().encode()))

    metrics = dict(
        vae=dict(steps=vae_steps, final_loss=_tail(log, "vae"), mouth_probe=probe),
        decoder=decoder_metrics,
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


def decoder(args) -> int:
    """``decoder``: fine-tune the decoder of an earlier ``fit``'s VAE (the encoder, the DiT and
    the encoders stay), evaluate, and write a complete output folder."""
    t_start = time.perf_counter()
    device, out, data_folder, data, rng = _start(args, stream=3)
    source = Path(args.source)
    model, vae, text, image, audio = build_parts(args.seed, device, data_folder)
    load_tiny_trained(model, vae, text, image, audio, source)  # in place: the parts stay on device
    out.mkdir(parents=True, exist_ok=True)
    sampler = dataset.ClipSampler(data, device=device)
    log = Log(every_s=10.0 if device.type == "cuda" else 2.0)
    budget = Budget(args.steps, args.seconds, args.batch, args.lr)
    decoder_metrics = _decoder_stage(vae, sampler, rng, budget, log, args, args.checks)
    paths = save_tiny_trained(out, model, vae, text, image, audio)
    atomic_write(out / "loss.csv", lambda f: f.write(log.csv().encode()))
    metrics = dict(
        decoder=decoder_metrics,
        source=str(source),
        train_seconds=round(time.perf_counter() - t_start, 1),
    )
    if not args.no_eval:
        metrics["pipeline"] = _evaluate(out, data, device, quick=False)
    atomic_write(out / "metrics.json", lambda f: f.write(json.dumps(metrics, indent=2).encode()))
    provenance = _decoder_provenance(args, data, data_folder, metrics, paths)
    atomic_write(out / "PROVENANCE.md", lambda f: f.write(provenance.encode()))
    print(json.dumps(metrics, indent=2), flush=True)
    return 0


def _decoder_stage(vae, sampler, rng, budget: Budget, log: Log, args, checks: int = 4) -> dict:
    """:func:`train_decoder` within ``budget`` (none when its steps are 0), with the mouth
    motion fidelity of the reconstruction before and after (``checks`` batches of 16 clips)."""
    if budget.steps <= 0:
        return dict(steps=0)
    check = lambda: motion_fidelity(vae, sampler, np.random.default_rng([args.seed, 4]), batches=checks)  # noqa: E731
    fade = lambda: round_trip_fade(vae, sampler, np.random.default_rng([args.seed, 5]))  # noqa: E731
    before, fade_before = check(), fade()
    print(f"decoder: mouth motion r {before}, round trips {fade_before} dB before", flush=True)
    steps = train_decoder(
        vae, sampler, rng, budget, log, mouth_weight=args.mouth_weight, cycle_weight=args.cycle_weight
    )
    after, fade_after = check(), fade()
    print(f"decoder: mouth motion r {after}, round trips {fade_after} dB after {steps} steps", flush=True)
    return dict(
        steps=steps,
        final_loss=_tail(log, "decoder"),
        motion_r_before=before,
        motion_r_after=after,
        round_trips_db_before=fade_before,
        round_trips_db_after=fade_after,
    )


def _evaluate(folder: Path, data, device, quick: bool) -> dict:
    """Reload the written weights into fresh tiny parts and run the pipeline on held-out speech."""
    from ..pipeline import InfiniteTalkPipeline
    from .evaluate import evaluate, heldout_speech, preview

    t0 = time.perf_counter()
    pipe = InfiniteTalkPipeline.tiny(device=device, trained=folder)  # the shipped preset's defaults
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


def _head(log: Log, stage: str, n: int = 20) -> float | None:
    values = [r[3] for r in log.rows if r[0] == stage][:n]
    return round(float(np.mean(values)), 5) if values else None


def _tail(log: Log, stage: str, n: int = 50) -> float | None:
    values = [r[3] for r in log.rows if r[0] == stage][-n:]
    return round(float(np.mean(values)), 5) if values else None


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
    lines = [
        "# Provenance of the tiny-infinitetalk trained weights",
        "",
        "Trained by wanstudio's own code (`wanstudio/train/`) on procedurally drawn faces and",
        "eSpeak NG speech; no photograph, recording or third-party model weights are involved.",
        "The tiny umT5 / CLIP / wav2vec2 are seeded random weights (not trained), stored as used.",
        "",
    ]
    stage = (
        f"plan: {plan['kind']} (vae {plan['vae']}, stages {plan['vae_stages']}, decoder {plan['decoder']}, "
        f"dit {plan['dit']}, pool {plan['pool']})"
    )
    return "\n".join(lines + _stage_lines(args, stage, data, data_folder, metrics, paths))


def _decoder_provenance(args, data, data_folder: Path, metrics: dict, paths) -> str:
    """The source folder's provenance, then this stage's."""
    earlier = Path(args.source) / "PROVENANCE.md"
    head = (
        earlier.read_text().rstrip()
        if earlier.is_file()
        else f"# Provenance\n\n(no PROVENANCE.md in {args.source})"
    )
    stage = (
        f"stage: `decoder` of {args.source}: the VAE's decoder fine-tuned (mouth weight {args.mouth_weight}, "
        f"cycle weight {args.cycle_weight}, lr {args.lr}, {args.batch} clips per step); encoder, DiT and "
        "encoders unchanged"
    )
    lines = ["", "", "## Then: the decoder fine-tuned", ""]
    return head + "\n".join(lines + _stage_lines(args, stage, data, data_folder, metrics, paths))


def _stage_lines(args, stage: str, data, data_folder: Path, metrics: dict, paths) -> list[str]:
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
    assert len(paths) == len(WEIGHT_FILES)
    return [
        f"- command: `python -m wanstudio.train {' '.join(sys.argv[1:]) or args.command}`",
        f"- commit: {_commit()}",
        f"- seed: {args.seed}; {stage}",
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
        "### Metrics",
        "",
        "```json",
        json.dumps(metrics, indent=2),
        "```",
        "",
    ]


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
    f.add_argument("--vae-lr", type=float, default=None)
    f.add_argument("--decoder-steps", type=int, default=None, help="0: no decoder stage")
    f.add_argument("--decoder-seconds", type=float, default=None)
    f.add_argument("--decoder-batch", type=int, default=None)
    f.add_argument("--decoder-lr", type=float, default=None)
    f.add_argument("--mouth-weight", type=float, default=10.0, help="the decoder stage's mouth weight")
    f.add_argument("--cycle-weight", type=float, default=1.0, help="the decoder stage's round-trip weight")
    f.add_argument("--dit-steps", type=int, default=None)
    f.add_argument("--dit-seconds", type=float, default=None)
    f.add_argument("--dit-batch", type=int, default=None)
    f.add_argument("--dit-lr", type=float, default=None)
    f.add_argument("--pool", type=int, default=None, help="encoded clips the DiT trains on")
    f.add_argument("--dit-from", default=None, help="a fit output folder whose DiT to train further")
    f.add_argument(
        "--round-trip",
        type=float,
        default=0.5,
        help="share of later clips whose head latents went through decode + encode, as in the pipeline",
    )
    f.add_argument(
        "--vae-from", default=None, help="an earlier fit's folder: take its VAE, train the DiT only"
    )
    f.add_argument("--readout-weight", type=float, default=1.0, help="weight of the VAE's mouth readout loss")
    f.add_argument("--motion-weight", type=float, default=1.0, help="weight of the VAE's mouth-motion loss")
    f.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    f.add_argument("--no-eval", action="store_true", help="skip the pipeline evaluation")
    f.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds the whole fit may take: the DiT stage ends early enough to leave time to save and evaluate",
    )
    q = sub.add_parser("quant-table", help="the trained tiny model's scores under every quantization mode")
    q.add_argument("--trained", default=None, help="a fit output folder (default: the shipped weights)")
    q.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    c = sub.add_parser(
        "decoder", help="fine-tune the decoder of a fit's VAE (encoder and DiT kept), evaluate"
    )
    c.add_argument("source", help="a folder written by `fit` (or by `decoder`)")
    c.add_argument("--data", default=".traindata", help="folder made by `data`")
    c.add_argument("--out", required=True, help="output folder (all weights, loss.csv, metrics)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default=None, help="default: cuda when available")
    c.add_argument("--steps", type=int, default=100000)
    c.add_argument("--seconds", type=float, default=300.0)
    c.add_argument("--batch", type=int, default=48, help="17-frame clips per step")
    c.add_argument("--lr", type=float, default=2e-3)
    c.add_argument("--mouth-weight", type=float, default=10.0)
    c.add_argument("--cycle-weight", type=float, default=1.0, help="weight of the encode(decode) round trip")
    c.add_argument("--checks", type=int, default=4, help="batches of 16 clips for the mouth motion r")
    c.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    c.add_argument("--no-eval", action="store_true", help="skip the pipeline evaluation")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Entry point of ``python -m wanstudio.train``."""
    args = parse_args(argv)
    try:
        return _run(args)
    except WanstudioError as e:  # a wrong input: one line, no traceback
        print(f"python -m wanstudio.train {args.command}: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.command == "data":
        dataset.build_dataset(
            args.out, seed=args.seed, utterances=args.utterances, use_espeak=False if args.babble else None
        )
        print(f"wrote {args.out}/{dataset.SPEECH_FILE} and {dataset.ENCODERS_FILE}")
        return 0
    if args.command == "quant-table":
        return quant_table(args)
    return decoder(args) if args.command == "decoder" else fit(args)


def quant_table(args) -> int:
    """``quant-table``: print the README's table (Markdown) of scores per quantization mode."""
    from .evaluate import quant_mode_scores

    if args.threads:
        torch.set_num_threads(args.threads)
    scores = quant_mode_scores(trained=args.trained or True)
    base = scores["disabled"]["sync"]
    print("| quantization | lip sync | vs bf16 | pause ratio | identity (dB) |")
    print("|---|---|---|---|---|")
    for mode, r in scores.items():
        name = "bf16 (disabled)" if mode == "disabled" else f"`{mode}`"
        print(
            f"| {name} | {r['sync']:.3f} | {r['sync'] - base:+.3f} | {r['pause']:.2f} | {r['identity_db']:.1f} |"
        )
    return 0
