"""The ``wanstudio`` command: ``demo``, ``infinitetalk``, ``inspect``, ``bench`` and ``doctor``.

Every choice list (quantization, attention, precision, scheduler, size class, speaker mix)
comes from ``wanstudio.options``; nothing here spells a mode name.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import shlex
import signal
import sys
import time
from pathlib import Path

from .cli_support import (
    WEIGHTS_HELP,
    Parser,
    add_generation_args,
    add_option,
    block_count,
    gib_amount,
    infinitetalk_inputs,
    lora_arg,
    sampling_settings,
    speaker_strength,
)
from .errors import WanstudioError
from .options import (
    AttentionMode,
    BasePrecision,
    EncoderOffload,
    QuantMode,
    SpeakerMix,
    TextEncoderDevice,
)

DEMO_PROMPT = "a person talking to the camera"


# --- argument parsing ----------------------------------------------------------------------------
def _bbox(text: str) -> tuple[float, float, float, float]:
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise argparse.ArgumentTypeError(f"expected x0,y0,x1,y1 in image pixels, got {text!r}")
    return box


def build_parser() -> argparse.ArgumentParser:
    """The ``wanstudio`` argument parser: every subcommand and its flags (``bench`` passes its own)."""
    parser = Parser(prog="wanstudio", description="Wan2.1 / InfiniteTalk talking-video generation.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="tiny preset + shipped portrait and speech -> demo.mp4",
        description="Run the whole InfiniteTalk pipeline at toy size (its DiT and VAE trained in this "
        "repository on drawn faces) on the shipped portrait and speech clip, and score the lip sync.",
    )
    demo.add_argument("-o", "--out", default="demo.mp4", help="output mp4")
    demo.add_argument("--image", default=None, help="portrait (default: the shipped one)")
    demo.add_argument("--audio", default=None, help="speech (default: the shipped clip)")
    demo.add_argument("--device", default="cpu", help="torch device")
    add_generation_args(demo, steps=8, prompt=DEMO_PROMPT)

    it = sub.add_parser(
        "infinitetalk",
        help="image or video + speech -> talking video (real weights)",
        description="Generate a talking video from one image (or dub a source video) and one or "
        "two speech tracks with Wan2.1-I2V-14B + InfiniteTalk weights from local files.",
        epilog=WEIGHTS_HELP,
    )
    io = it.add_argument_group("inputs and output")
    io.add_argument("--image", default=None, help="reference image (or a video file, taken as --video)")
    io.add_argument(
        "--video",
        default=None,
        help="dubbing: a source video; clip k follows its frame at the clip's start; the output "
        "lasts as long as the audio",
    )
    io.add_argument("--audio", default=None, help="speech of speaker 1 (any format ffmpeg reads)")
    io.add_argument("--audio2", default=None, help="speech of speaker 2")
    io.add_argument(
        "--input-json",
        default=None,
        metavar="PATH",
        help="the official InfiniteTalk input file (prompt, cond_video, cond_audio, audio_type, "
        "bbox; paths relative to the file) instead of --image/--video/--audio/--audio2/--bbox",
    )
    add_option(io, "--speaker-mix", SpeakerMix, None, "two speakers (default: para)", metavar="MIX")
    io.add_argument(
        "--bbox",
        type=_bbox,
        action="append",
        default=None,
        metavar="X0,Y0,X1,Y1",
        help="a speaker's box in image pixels, x to the right (twice: speaker 1, then speaker 2; "
        "default: the left and right halves)",
    )
    io.add_argument(
        "--mask",
        action="append",
        default=None,
        metavar="PATH",
        help="a speaker's mask image, the size of --image (twice)",
    )
    io.add_argument(
        "--speaker-strength",
        type=speaker_strength,
        nargs="+",
        default=None,
        metavar="S",
        help="a factor on each speaker's audio features (one per speaker, speaker 1 first; default 1)",
    )
    io.add_argument("-o", "--out", default="infinitetalk.mp4", help="output mp4")
    w = it.add_argument_group("weights", "each flag wins over $WANSTUDIO_WEIGHTS / wanstudio.toml (below)")
    w.add_argument(
        "--dit",
        nargs="+",
        default=None,
        help="Wan2.1-I2V-14B DiT file(s) / index / folder: safetensors bf16/fp16 or fp8 (plain, scaled, kijai "
        "mixed), GGUF .gguf (Q8_0, Q4_0, K-quants, F16), quanto int8/fp8 safetensors + its .json map",
    )
    w.add_argument("--infinitetalk", default=None, help="InfiniteTalk audio weights, merged on top")
    w.add_argument("--vae", default=None, help="Wan2.1 VAE")
    w.add_argument("--text-encoder", default=None, help="umT5-XXL encoder")
    w.add_argument("--tokenizer", default=None, help="umT5 tokenizer folder")
    w.add_argument("--clip", default=None, help="CLIP ViT-H/14 image encoder")
    w.add_argument("--wav2vec", default=None, help="chinese-wav2vec2-base folder or file")
    w.add_argument(
        "--tiny",
        action="store_true",
        help="use the tiny random-weight preset instead of files (a wiring check)",
    )
    r = it.add_argument_group(
        "runtime", "README 'Options' explains each mode; `wanstudio doctor` says which run here"
    )
    _add_runtime_args(r)
    r.add_argument(
        "--blocks-to-swap",
        type=block_count,
        default=0,
        metavar="N",
        help="DiT blocks kept in host memory and streamed to the GPU (0 to the block count: 40 for "
        "14B), or 'auto': as many as --vram-budget-gb needs",
    )
    m = it.add_argument_group(
        "memory", "where the parts of a pipeline loaded from files live (README 'Small cards')"
    )
    m.add_argument(
        "--vram-budget-gb",
        type=gib_amount,
        default=None,
        metavar="GIB",
        help="device memory the whole pipeline may use (default: the free memory); "
        "--blocks-to-swap auto plans the DiT for it",
    )
    add_option(m, "--offload-encoders", EncoderOffload, EncoderOffload.AUTO.value, "encoders", metavar="WHEN")
    add_option(
        m, "--text-encoder-device", TextEncoderDevice, TextEncoderDevice.AUTO.value, "umT5", metavar="WHERE"
    )
    add_option(
        m,
        "--text-encoder-quantization",
        QuantMode,
        QuantMode.DISABLED.value,
        "umT5's block Linears (fp8_e4m3fn_scaled: 11.4 -> 7.7 GB)",
        metavar="MODE",
    )
    r.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the DiT blocks (faster on a GPU after a one-off compile)",
    )
    r.add_argument(
        "--lora",
        type=lora_arg,
        action="append",
        default=None,
        metavar="PATH[:STRENGTH]",
        help="a LoRA merged into the DiT before quantization (repeatable; strength default 1). "
        "With --preset distill_4step: lightx2v's cfg_step_distill LoRA (README 'LoRAs')",
    )
    r.add_argument("--device", default=None, help="torch device; default cuda if available, else cpu")
    add_option(
        r, "--dtype", BasePrecision, None, "base precision (default bf16; with --tiny fp32)", metavar="DTYPE"
    )
    add_generation_args(it, steps=None, prompt="")

    ins = sub.add_parser(
        "inspect",
        help="layout of every tensor reaching every kernel (one forward)",
        description="Run one DiT forward under the layout inspector and print its "
        "summary; exit status 1 when a kernel's layout contract is violated.",
    )
    ins.add_argument(
        "--preset", default="tiny-infinitetalk", help="config of a random-weight model (ignored with --dit)"
    )
    ins.add_argument("--dit", nargs="+", default=None, help="checkpoint file(s) instead of random weights")
    _add_runtime_args(ins)
    ins.add_argument(
        "--latent",
        type=int,
        nargs=3,
        default=(3, 8, 8),
        metavar=("F", "H", "W"),
        help="latent frames, height, width of the random input (default 3 8 8)",
    )
    ins.add_argument("--speakers", type=int, choices=(1, 2), default=1, help="audio streams")
    ins.add_argument("--strict", action="store_true", help="raise at the first violated contract")
    ins.add_argument("--csv", default=None, help="also write every row here")
    ins.add_argument("--device", default="cpu", help="torch device")
    add_option(ins, "--dtype", BasePrecision, BasePrecision.FP32.value, "base precision", metavar="DTYPE")

    bench = sub.add_parser(
        "bench", help="GPU benchmark of one DiT forward (wanstudio bench --help)", add_help=False
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)

    doctor = sub.add_parser("doctor", help="what works on this machine and why not")
    doctor.add_argument("--device", default=None, help="device to check (default: cuda if any)")
    doctor.add_argument("--file", default=None, help="describe a checkpoint file: format, storage, model")
    return parser


def _add_runtime_args(group) -> None:
    add_option(
        group, "--quantization", QuantMode, QuantMode.DISABLED.value, "DiT Linear layers", metavar="MODE"
    )
    add_option(
        group, "--attention", AttentionMode, AttentionMode.SDPA.value, "attention kernel", metavar="MODE"
    )


# --- commands --------------------------------------------------------------------------------------
def _progress(args):
    return False if args.quiet else None


def _generation_kwargs(args) -> dict:
    sampling = sampling_settings(args)
    kw = dict(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        size_class=args.size_class,
        size=args.size,
        frame_num=args.frame_num,
        seed=args.seed,
        max_frames=args.max_frames,
        apg=args.apg,
        out=args.out,
        work_dir=args.work_dir,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=_progress(args),
        tiled_vae=args.tiled_vae,
        cache=args.cache,
        cache_threshold=args.cache_threshold,
        **sampling,
        keep_frames=False,  # the mp4 is the result: memory stays flat however long the audio
    )
    for name in ("motion_frame", "color_correction"):  # None: the pipeline's own default
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    return kw


def _work_dir(args) -> Path:
    return Path(args.work_dir) if args.work_dir else Path(f"{args.out}.work")


def _check_output(args) -> None:
    """An unwritable --out, or a work folder in use or holding clips: refused before any weights load."""
    from .media import check_output_path
    from .pipeline.resume import check_work_folder

    check_output_path(args.out)
    check_work_folder(_work_dir(args), resume=args.resume, overwrite=args.overwrite)


def cmd_demo(args) -> int:
    """``wanstudio demo``: the tiny pipeline (trained weights when shipped) on the shipped
    portrait and speech; prints the lip-sync and identity scores of :mod:`wanstudio.eval`."""
    from . import eval as scores
    from .media import asset_path, load_audio, load_image, probe_media
    from .pipeline import InfiniteTalkPipeline
    from .pipeline.tiny_weights import tiny_weights_available

    _check_output(args)
    t0 = time.perf_counter()
    pipe = InfiniteTalkPipeline.tiny(seed=0, device=args.device)
    t_load = time.perf_counter() - t0
    image = args.image or asset_path("portrait.png")
    audio = args.audio or asset_path("speech.wav")
    kw = _generation_kwargs(args)
    kw["keep_frames"] = True  # 64x64: the frames are scored below
    result = pipe(image, audio, **kw)
    info = probe_media(result.path)
    sound = "yes" if info.get("has_audio") else "NO"
    print(f"wanstudio demo: {result.summary()}")
    print(
        f"  mp4: {info.get('frames')} frames at {info.get('fps')} fps, {info.get('duration'):.2f} s, audio {sound}"
    )
    print(f"  pipeline: {pipe!r}; built in {t_load:.1f} s, total {time.perf_counter() - t0:.1f} s")
    print(f"  scores: {scores.describe(result.frames.numpy(), load_audio(audio), load_image(image))}")
    if not tiny_weights_available():
        print(
            "  The picture is noise: the tiny preset has random weights. Real weights: `wanstudio infinitetalk --help`."
        )
    return 0


def cmd_infinitetalk(args) -> int:
    """``wanstudio infinitetalk``: check paths, load the pipeline (files or ``--tiny``), generate."""
    from .cli_support import resolve_weights, tiny_cpu_note
    from .pipeline import InfiniteTalkPipeline

    if not args.tiny:
        weights, said = resolve_weights(args)
        for name, value in weights.items():
            for path in value if isinstance(value, list) else [value]:
                if path and not Path(path).exists():
                    flag = "--" + name.replace("_", "-")
                    raise WanstudioError(f"{flag}: no such file or folder {path!r} ({said})")
    # the inputs before any weights load: a wrong path should not cost minutes
    inputs = infinitetalk_inputs(args)  # --input-json or the flags; their files exist
    _check_output(args)

    from .modes import RuntimeModes

    modes = RuntimeModes(
        quantization=args.quantization,
        attention=args.attention,
        precision=args.dtype or (BasePrecision.FP32 if args.tiny else BasePrecision.BF16).value,
        blocks_to_swap=args.blocks_to_swap,
        compile=args.compile,
        loras=args.lora or (),
    )
    if args.tiny:
        device = args.device or "cpu"
        modes.check_device(device)
        note = tiny_cpu_note(args) if device == "cpu" else None
        if note:
            print(f"wanstudio infinitetalk: {note}", flush=True)
        pipe = InfiniteTalkPipeline.tiny(seed=0, device=device, modes=modes)
    else:
        print(f"wanstudio infinitetalk: {said}", flush=True)
        pipe = InfiniteTalkPipeline.from_files(
            **weights,
            device=args.device,
            modes=modes,
            vram_budget_gb=args.vram_budget_gb,
            offload_encoders=args.offload_encoders,
            text_encoder_device=args.text_encoder_device,
            text_encoder_quantization=None
            if args.text_encoder_quantization == QuantMode.DISABLED.value
            else args.text_encoder_quantization,
        )
    kw = _generation_kwargs(args)
    if inputs.get("prompt") is not None and not args.prompt:  # the JSON's prompt unless --prompt
        kw["prompt"] = inputs["prompt"]
    inputs.pop("prompt", None)
    result = pipe(**inputs, **kw)
    print(f"wanstudio infinitetalk: {result.summary()}")
    for note in result.notes:
        print(f"wanstudio infinitetalk: note: {note}")
    return 0


def cmd_doctor(args) -> int:
    """``wanstudio doctor``: versions, GPUs, which modes run on the device (and why not), weights."""
    import torch

    from . import __version__
    from .cli_support import weights_report

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lines = [
        f"wanstudio {__version__}, Python {platform.python_version()} on {platform.platform()}",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'}), "
        f"CUDA available: {torch.cuda.is_available()}",
    ]
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        lines.append(
            f"  cuda:{i} {props.name}, compute capability {props.major}.{props.minor}, "
            f"{free / 2**30:.1f} / {total / 2**30:.1f} GiB free"
        )
    lines.append(f"CPU threads: {torch.get_num_threads()}")
    lines += _package_versions()
    lines.append(f"checking modes on: {device}")
    lines.append("quantization:")
    lines += [f"  {line}" for line in _quant_report(device)]
    lines.append("attention:")
    lines += [f"  {line}" for line in _attention_report(device)]
    swap = "available" if device.type == "cuda" else "not available: it streams blocks to a CUDA GPU"
    lines.append(f"block swap (--blocks-to-swap): {swap}")
    from .pipeline.memory import memory_report

    lines.append("memory (README 'Small cards'):")
    lines += [f"  {line}" for line in memory_report(device)]
    lines.append("weights (what `wanstudio infinitetalk` uses for parts given no flag):")
    lines += [f"  {line}" for line in weights_report()]
    if args.file:
        from .checkpoints import describe_checkpoint

        lines += ["checkpoint:", *(f"  {line}" for line in describe_checkpoint(args.file).splitlines())]
    print("\n".join(lines))
    return 0


def _package_versions() -> list[str]:
    from importlib import metadata

    out = []
    for name in ("diffusers", "transformers", "safetensors", "imageio-ffmpeg"):
        try:
            out.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(f"{name}: not installed")
    try:
        import imageio_ffmpeg

        out.append(f"ffmpeg: {imageio_ffmpeg.get_ffmpeg_exe()} ({imageio_ffmpeg.get_ffmpeg_version()})")
    except Exception as e:  # no binary for this platform
        out.append(f"ffmpeg: NOT FOUND ({e})")
    return out


def _quant_report(device) -> list[str]:
    try:
        from .quant.spec import check_device, spec_for
    except ImportError as e:
        return [f"{m.value}: unknown (quantization support missing from this build: {e})" for m in QuantMode]
    out = []
    for mode in QuantMode:
        try:
            spec_for(mode)
            check_device(mode, device)
            out.append(f"{mode.value:<24} ok      {mode.description}")
        except WanstudioError as e:
            out.append(f"{mode.value:<24} no      {e}")
    return out


def _attention_report(device) -> list[str]:
    try:
        from .attention import available_attention_modes
    except ImportError:
        return [f"{m.value}: unknown (attention registry missing from this build)" for m in AttentionMode]
    out = []
    for mode, found in available_attention_modes(device).items():
        if found.available:
            kernel = getattr(found, "kernel", "") or ""
            out.append(f"{mode.value:<16} ok      {kernel}".rstrip())
        else:
            out.append(f"{mode.value:<16} no      {found.reason}")
    return out


def cmd_inspect(args) -> int:
    """``wanstudio inspect``: one DiT forward under the layout inspector; 1 if a contract is violated."""
    import torch

    from . import layout
    from .checkpoints import load_model, parse_dtype
    from .cli_support import random_inputs
    from .config import WanConfig
    from .inspector import inspect_layout
    from .model import WanModel

    if args.dit:
        model = load_model(
            args.dit,
            device=args.device,
            dtype=args.dtype,
            quantization=args.quantization,
            attention=args.attention,
        )
    else:
        from .attention import set_attention
        from .cli_support import check_model_memory
        from .quant import quantize

        cfg, dtype = WanConfig.preset(args.preset), parse_dtype(args.dtype)
        check_model_memory(cfg, dtype, args.device, f"the {args.preset} preset in {args.dtype}")
        torch.manual_seed(0)
        model = WanModel(cfg, device=args.device, dtype=dtype)
        quantize(model, args.quantization)
        set_attention(model, args.attention)
    inputs = random_inputs(model.config, *args.latent, speakers=args.speakers, device=args.device)
    with layout.strict_layout(args.strict):
        report = inspect_layout(model.eval(), inputs)
    print(report.summary())
    if args.csv:
        report.to_csv(args.csv)
        print(f"wanstudio inspect: {len(report)} rows written to {args.csv}")
    return 1 if report.violations() else 0


def cmd_bench(args) -> int:
    """``wanstudio bench`` reached through the parser: hands its arguments to :func:`wanstudio.bench.main`."""
    from .bench import main as bench_main

    return bench_main(args.bench_args)


COMMANDS = {
    "demo": cmd_demo,
    "infinitetalk": cmd_infinitetalk,
    "inspect": cmd_inspect,
    "bench": cmd_bench,
    "doctor": cmd_doctor,
}


def main(argv: list[str] | None = None) -> int:
    """The ``wanstudio`` command on ``argv``; the exit status (2: an error, 128 + N: signal N)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own parser: `wanstudio bench --help` lists the benchmark's options
        from .bench import main as bench_main

        return bench_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    terminated: list[int] = []
    try:
        with _sigterm_as_interrupt(terminated):
            return COMMANDS[args.command](args)
    except WanstudioError as e:
        if args.debug:
            raise
        print(f"wanstudio {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(_interrupted_message(args, argv, bool(terminated)), file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)


@contextlib.contextmanager
def _sigterm_as_interrupt(caught: list):
    """SIGTERM (kill, a job scheduler) stops a command like Ctrl-C: KeyboardInterrupt in the main
    thread, so finished clips are kept and temp files removed. The old handler is restored after."""

    def handler(signum, frame):
        caught.append(signum)
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: signals are not ours to handle
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _interrupted_message(args, argv: list[str], terminated: bool) -> str:
    """What was kept and the exact command that continues the run."""
    what = f"{args.command}: {'stopped by SIGTERM' if terminated else 'interrupted'}"
    if getattr(args, "out", None) is None or not hasattr(args, "resume"):
        return f"wanstudio {what}"
    from .pipeline.resume import finished_clips

    work = _work_dir(args)
    # the same command minus --overwrite (or its abbreviation), plus --resume
    again = [a for a in argv if not ("--overwrite".startswith(a) and a.startswith("--ov"))]
    if not args.resume:
        again.append("--resume")
    return (
        f"wanstudio {what}; {finished_clips(work)} finished clip(s) are kept in the work folder "
        f"{work}. Continue with: {shlex.join(['wanstudio', *again])}"
    )


if __name__ == "__main__":
    sys.exit(main())
