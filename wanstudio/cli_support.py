"""What the ``wanstudio`` command needs besides its parser: short errors, option types, and the
checks a newcomer's first run hits (where the weights come from, how long ``--tiny`` takes on a
CPU, whether a random-weight model fits in memory).

Nothing here spells a mode name: choices come from ``wanstudio.options``.
"""

from __future__ import annotations

import argparse
import os

from .errors import UnknownOptionError, WanstudioError
from .options import Option, VAETilingMode, parse_option

# --tiny on a CPU: 181 s measured on the shipped 3.8 s clip at 11 clips x 40 steps x 3 calls
TINY_CPU_SECONDS_PER_CALL = 181 / (11 * 40 * 3)
DEMO_SECONDS = 18  # `wanstudio demo` on the same CPU
WEIGHTS_HELP = """\
weights: the flags above win; a part not given comes from $WANSTUDIO_WEIGHTS (a download
folder laid out as in the README, or a wanstudio.toml / .json file), else from wanstudio.toml
or wanstudio.json in the current folder or in ~/.config/wanstudio/ (the first that is set
wins). What to download, and the `hf download` commands: README.md, section "Real weights".
`wanstudio doctor` shows what it finds.
"""
# CLI flag of each WeightPaths field; the optional parts follow the part they belong to
WEIGHT_FLAGS = {
    "dit": "--dit",
    "infinitetalk": "--infinitetalk",
    "vae": "--vae",
    "text_encoder": "--text-encoder",
    "tokenizer": "--tokenizer",
    "clip": "--clip",
    "wav2vec": "--wav2vec",
}
_FOLLOWS = {"infinitetalk": "dit", "tokenizer": "text_encoder"}


# --- argparse --------------------------------------------------------------------------------------
class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (unless its help already says it); keeps the epilog's lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default in (None, False, "", argparse.SUPPRESS):
            return text
        if "default" in text:
            return text
        return f"{text} (default: %(default)s)".lstrip()


class Parser(argparse.ArgumentParser):
    """argparse with a short error: one usage line and the message (``--help`` has the rest)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        """Exit with status 2 after one usage line (shortened when long) and ``message``."""
        usage = self.format_usage()
        if usage.count("\n") > 1:  # a long usage would bury the message
            usage = f"usage: {self.prog} [options]  (`{self.prog} --help` lists them)\n"
        self.exit(2, f"{usage}{self.prog}: error: {message}\n")


def option_type(kind: type[Option]):
    """An argparse ``type`` that parses a registry name; a typo gets parse_option's hint."""

    def parse(text: str) -> str:
        try:
            return parse_option(kind, text).value
        except UnknownOptionError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def add_option(group, flag: str, kind: type[Option], default, what: str, *, metavar: str, **extra) -> None:
    """A choice from the options registry; its help lists the names (short lists: and meanings).
    ``extra`` goes to ``add_argument`` (e.g. ``nargs="?", const=...``)."""
    if len(kind) <= 4:
        names = "; ".join(f"{m.value} = {m.description}" for m in kind)
    else:
        names = ", ".join(kind.names())
    group.add_argument(
        flag,
        type=option_type(kind),
        choices=kind.names(),
        default=default,
        metavar=metavar,
        help=f"{what}. One of: {names}".replace("%", "%%"),  # argparse formats help with %
        **extra,
    )


def block_count(text: str) -> int | str:
    """``--blocks-to-swap``: a count >= 0 (the upper bound is the model's, checked when it loads)
    or 'auto' (planned for the VRAM budget)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(
            f"expected 'auto' or a number of DiT blocks from 0 (none swapped) to the model's block "
            f"count (40 for Wan2.1-14B, 2 for --tiny), got {text!r}"
        )
    return n


def gib_amount(text: str) -> float:
    """``--vram-budget-gb``: a finite number of GiB > 0."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(
            f"expected a number of GiB > 0 (e.g. 11.5 for a 12 GB card), got {text!r}"
        )
    return value


# --- weights ---------------------------------------------------------------------------------------
def resolve_weights(args) -> tuple[dict, str]:
    """``from_files`` keyword arguments for the weight flags, and a line saying where each came from.

    Flags win. When a required part has no flag, ``wanstudio.studio.find_weights()`` fills
    every part without one ($WANSTUDIO_WEIGHTS, else a wanstudio.toml); the InfiniteTalk
    weights follow the DiT's source and the tokenizer the text encoder's, so a flag's file is
    never merged with a configured one.
    """
    from .studio import WEIGHTS_ENV, WeightPaths, config_search_path, find_weights

    given = {name: getattr(args, name) for name in WEIGHT_FLAGS}
    from_flag = {name for name, value in given.items() if value}
    missing = [n for n in WeightPaths.REQUIRED if n not in from_flag]
    found, source = None, ""
    if missing:
        found = find_weights()
        named = os.environ.get(WEIGHTS_ENV, "").strip()
        if found is not None:
            source = f"${WEIGHTS_ENV}={named}" if named else str(found.source)
    if missing and found is None:
        flags = ", ".join(WEIGHT_FLAGS[n] for n in missing)
        looked = ", ".join(str(p) for p in config_search_path())
        raise WanstudioError(
            f"missing weights: {flags}. Pass them as flags, set ${WEIGHTS_ENV} to your download "
            f"folder (or to a wanstudio.toml), or write a wanstudio.toml (looked for: {looked}). "
            f"README.md, section 'Real weights', lists the files and how to download them; "
            f"--tiny runs a wiring check without weights."
        )
    kwargs, origin = {}, {}
    for name in WEIGHT_FLAGS:
        leader = _FOLLOWS.get(name, name)
        if leader in from_flag or found is None:
            kwargs[name], origin[name] = given[name], WEIGHT_FLAGS[name]
        else:
            kwargs[name], origin[name] = getattr(found, name), source
    kwargs["dit"] = list(kwargs["dit"]) if not isinstance(kwargs["dit"], str) else [kwargs["dit"]]
    by_source: dict[str, list[str]] = {}
    for name, where in origin.items():
        if kwargs[name]:
            by_source.setdefault(where, []).append(name)
    said = "; ".join(f"{', '.join(names)} from {where}" for where, names in by_source.items())
    return kwargs, f"weights: {said}"


def weights_report() -> list[str]:
    """``doctor``: the weights ``infinitetalk`` would use without flags, or where it looked."""
    from .studio import WEIGHTS_ENV, config_search_path, describe_weights, find_weights

    named = os.environ.get(WEIGHTS_ENV, "").strip()
    try:
        found = find_weights()
    except WanstudioError as e:
        return [f"error: {e}"]
    if found is not None:
        via = f"${WEIGHTS_ENV}={named}" if named else "a config file"
        return [f"found through {via}", *describe_weights(found).splitlines()]
    return [
        f"none configured: ${WEIGHTS_ENV} is not set, and none of these exists: "
        + ", ".join(str(p) for p in config_search_path()),
        f"set {WEIGHTS_ENV}=<your download folder> or write a wanstudio.toml; README.md, section "
        f"'Real weights', lists the files and the `hf download` commands",
    ]


# --- first-run checks ------------------------------------------------------------------------------
def tiny_cpu_note(args, *, frame_num: int = 17, motion_frame: int = 5) -> str | None:
    """A note before a long ``--tiny`` run on the CPU: its estimated time and how to shorten it.

    None when the estimate is under 30 s or cannot be made (unreadable audio: the pipeline's
    own checks say why).
    """
    from .media import VIDEO_FPS, probe_media
    from .pipeline import ClipPlan

    try:
        durations = [probe_media(a).get("duration") or 0.0 for a in (args.audio, args.audio2) if a]
    except WanstudioError:
        return None
    seconds = sum(durations) if args.speaker_mix == "add" else max(durations, default=0.0)
    frame_num = args.frame_num or frame_num
    motion = args.motion_frame or motion_frame
    if not durations or motion >= frame_num or args.max_frames < 1:
        return None
    plan = ClipPlan.make(int(seconds * VIDEO_FPS), frame_num, motion, args.max_frames)
    sampling = sampling_settings(args)
    steps, scales = sampling["steps"], (sampling["text_scale"], sampling["audio_scale"])
    per_step = 1 if scales == (1, 1) else 2 if scales[0] == 1 else 3
    estimate = plan.clips * steps * per_step * TINY_CPU_SECONDS_PER_CALL
    if estimate < 30:
        return None
    return (
        f"note: --tiny on the CPU runs {plan.clips} clips x {steps} steps x {per_step} model "
        f"calls here: about {estimate / 60:.0f} min (181 s measured for 11 clips x 40 steps x 3 calls; "
        f"`wanstudio demo` takes about {DEMO_SECONDS} s). Shorter: --max-frames 41 "
        f"--steps 8 --text-scale 1."
    )


def check_model_memory(cfg, dtype, device, what: str) -> None:
    """Refuse to build a random-weight model that cannot fit, before allocating anything.

    The weights' bytes are counted on the meta device (parameter count x dtype size) and a
    margin is added for the forward and the quantization copies (15% + 1 GiB).
    """
    import torch

    from .model import WanModel

    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        return
    tensors = WanModel(cfg, device="meta", dtype=dtype).state_dict().values()
    params = sum(t.numel() for t in tensors)
    weights = sum(t.numel() * t.element_size() for t in tensors)
    need = int(weights * 1.15) + 2**30
    if device.type == "cuda":
        available, where = torch.cuda.mem_get_info(device)[0], f"is free on {device}"
    else:
        import psutil

        available, where = psutil.virtual_memory().available, "of host memory is available"
    if need <= available:
        return
    gib = 2**30
    half = ""
    if torch.tensor([], dtype=dtype).element_size() > 2:
        half = f", --dtype bf16 (about {(params * 2 * 1.15 + gib) / gib:.1f} GiB)"
    raise WanstudioError(
        f"{what} needs about {need / gib:.1f} GiB ({params / 1e9:.2f} B parameters x "
        f"{weights // max(params, 1)} bytes + margin) but only {available / gib:.1f} GiB {where}. "
        f"Use a smaller preset (--preset t2v-1.3b or tiny-i2v){half}, or inspect real weights "
        f"with --dit (they stream in, quantized as they load)."
    )


def lora_arg(text: str):
    """``--lora PATH[:STRENGTH]`` -> a :class:`~wanstudio.LoRA` (the file is checked now)."""
    from .errors import WanstudioError
    from .lora import LoRA

    path, strength = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            path, strength = head, float(tail)
        except ValueError:
            path = text  # a ':' in the path itself (e.g. C:\...): no strength given
    try:
        return LoRA(path, strength)
    except WanstudioError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def sampling_settings(args) -> dict:
    """Steps, shift, guidance scales and sampler: ``--preset``'s, each overridden when given."""
    from .options import GenerationPreset, parse_option

    preset = parse_option(GenerationPreset, args.preset).settings.as_kwargs()
    given = dict(
        steps=args.steps,
        shift=args.shift,
        text_scale=args.text_scale,
        audio_scale=args.audio_scale,
        scheduler=args.scheduler,
        timesteps=args.timesteps,
    )
    if args.timesteps is not None and args.steps is None:  # the list says how many steps
        given["steps"] = len(args.timesteps)
    return {**preset, **{k: v for k, v in given.items() if v is not None}}


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 832x480, got {text!r}") from None
    return w, h


def add_generation_args(p: argparse.ArgumentParser, *, steps: int, prompt: str) -> None:
    """The generation options shared by ``demo`` and ``infinitetalk``."""
    from .options import CacheMode, GenerationPreset, Scheduler, SizeClass

    g = p.add_argument_group("generation")
    g.add_argument("--prompt", default=prompt, help="text prompt")
    g.add_argument("--negative-prompt", default=None, help="negative prompt (default: Wan's)")
    add_option(
        g,
        "--size-class",
        SizeClass,
        None,
        "bucket family for the output size (default 480; the tiny preset: 64x64)",
        metavar="CLASS",
    )
    g.add_argument(
        "--size",
        type=_size,
        default=None,
        metavar="WxH",
        help="exact output size instead of a bucket (multiples of 16)",
    )
    g.add_argument(
        "--frame-num",
        type=int,
        default=None,
        help="frames per clip, 4k + 1 (default 81; the tiny preset: 17)",
    )
    add_option(
        g,
        "--preset",
        GenerationPreset,
        GenerationPreset.STANDARD.value,
        "sampling settings by name; --steps, --shift, --text-scale, --audio-scale and --scheduler "
        "override single values",
        metavar="NAME",
    )
    g.add_argument("--steps", type=int, default=steps, help="sampling steps per clip (default: the preset's)")
    g.add_argument(
        "--shift",
        type=float,
        default=None,
        help="timestep shift (default: the preset's, or 7 at 480, 11 at 720)",
    )
    g.add_argument(
        "--text-scale",
        type=float,
        default=None,
        help="text guidance scale (default: the preset's; 1 and --audio-scale 1: one DiT call per step)",
    )
    g.add_argument(
        "--audio-scale", type=float, default=None, help="audio guidance scale (default: the preset's)"
    )
    g.add_argument("--seed", type=int, default=42, help="noise seed")
    g.add_argument(
        "--motion-frame",
        type=int,
        default=None,
        help="frames carried from clip to clip (4k + 1; default 9, the tiny preset 5)",
    )
    g.add_argument("--max-frames", type=int, default=1000, help="cap on the output length in frames")
    g.add_argument(
        "--color-correction",
        type=float,
        default=None,
        help="Lab colour match strength, 0..1 (default 1; the trained tiny preset 0)",
    )
    add_option(g, "--scheduler", Scheduler, None, "sampler (default: the preset's)", metavar="NAME")
    g.add_argument(
        "--timesteps",
        type=float,
        nargs="+",
        default=None,
        metavar="T",
        help="euler_distill only: the distill LoRA's unshifted timesteps, e.g. 999 750 500 250 "
        "(sets --steps to their count)",
    )
    g.add_argument("--apg", action="store_true", help="adaptive projected guidance")
    add_option(g, "--cache", CacheMode, CacheMode.NONE.value, "step cache over the DiT calls", metavar="MODE")
    g.add_argument(
        "--cache-threshold",
        type=float,
        default=None,
        help="skip threshold of --cache (default: the mode's: teacache 0.2, magcache 0.12)",
    )
    g.add_argument("--work-dir", default=None, help="folder for finished clips (default <out>.work)")
    g.add_argument("--resume", action="store_true", help="continue a broken run at its next clip")
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the finished clips of an earlier run in the work folder and start again",
    )
    add_option(
        g,
        "--tiled-vae",
        VAETilingMode,
        VAETilingMode.AUTO.value,
        "VAE encode / decode in spatial tiles (a bare --tiled-vae is 'on')",
        metavar="WHEN",
        nargs="?",
        const=VAETilingMode.ON.value,
    )
    g.add_argument("--quiet", action="store_true", help="no progress bar")


# --- infinitetalk inputs -----------------------------------------------------------------------------
def speaker_strength(text: str) -> float:
    """``--speaker-strength``: a finite factor >= 0 on one speaker's audio features."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0 (1 = as recorded), got {text!r}")
    return value


def infinitetalk_inputs(args) -> dict:
    """The pipeline call's inputs from ``--input-json`` or from the flags, checked before any
    weights load: which flags go together, and that every named file exists.

    Returns keyword arguments of ``InfiniteTalkPipeline.__call__`` (``image`` or ``video``,
    ``audio``, ``audio2``, ``speaker_mix``, ``bboxes`` / ``masks``, ``speaker_strengths``, and
    ``prompt`` from a JSON file).
    """
    from .media import check_input_file, is_video_file

    flags = {
        "--image": args.image,
        "--video": args.video,
        "--audio": args.audio,
        "--audio2": args.audio2,
        "--speaker-mix": args.speaker_mix,
        "--bbox": args.bbox,
        "--mask": args.mask,
    }
    if args.input_json is not None:
        given = [flag for flag, value in flags.items() if value is not None]
        if given:
            raise WanstudioError(
                f"--input-json gives the inputs (cond_video, cond_audio, audio_type, bbox); "
                f"drop {', '.join(given)}"
            )
        from .pipeline import read_input_json

        kw = read_input_json(args.input_json)
    else:
        if args.image is not None and args.video is not None:
            raise WanstudioError(
                "pass --image (a still reference) or --video (a source video to dub), not both"
            )
        if args.image is None and args.video is None:
            raise WanstudioError("no reference: pass --image or --video (or --input-json)")
        if args.audio is None:
            raise WanstudioError("no speech: pass --audio (or --input-json)")
        source = args.video if args.video is not None else args.image
        video = args.video is not None or is_video_file(source)
        kw = {"video" if video else "image": source, "audio": args.audio}
        if args.audio2 is not None:
            kw["audio2"] = args.audio2
            if args.speaker_mix is not None:
                kw["speaker_mix"] = args.speaker_mix
        elif args.bbox or args.mask:
            raise WanstudioError(
                "more speakers than speech tracks: --bbox / --mask locate two speakers; pass --audio2 as well"
            )
        for flag, given in (("--bbox", args.bbox), ("--mask", args.mask)):
            if given is not None and len(given) != 2:
                raise WanstudioError(f"{flag} must be given exactly twice (speaker 1, speaker 2)")
        if args.bbox and args.mask:
            raise WanstudioError("pass --bbox or --mask, not both")
        for kind, path in [
            ("video" if video else "image", source),
            ("audio", args.audio),
            ("audio", args.audio2),
        ]:
            if path is not None:  # a wrong path should not cost minutes of loading
                check_input_file(path, kind)
        if args.bbox:
            kw["bboxes"] = args.bbox
        if args.mask:
            import numpy as np
            from PIL import Image

            for path in args.mask:
                check_input_file(path, "mask image")
            kw["masks"] = [np.asarray(Image.open(p).convert("L")) > 127 for p in args.mask]
    if args.speaker_strength is not None:
        kw["speaker_strengths"] = tuple(args.speaker_strength)
    return kw


def random_inputs(cfg, frames: int, height: int, width: int, *, speakers: int, device) -> dict:
    """Seeded random inputs of the model's shapes at the given latent size, by name."""
    from .model import ModelInputs

    inputs = ModelInputs.example(
        cfg,
        frames=frames,
        height=height,
        width=width,
        speakers=speakers,
        text_tokens=16,
        clip_tokens=257,
        t=500.0,
        device=device,
    )
    return inputs.as_kwargs()
