"""The ``wanstudio`` command line: demo end to end, choices from options.py, doctor, errors."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

import wanstudio as ws
from wanstudio.cli import build_parser, main
from wanstudio.errors import ConfigError
from wanstudio.options import SCHEDULERS, BasePrecision, SizeClass, SpeakerMix


def choices(subcommand: str, dest: str) -> tuple:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[subcommand]
    return tuple(next(a for a in sub._actions if a.dest == dest).choices)


def test_demo_writes_an_mp4_with_video_and_audio(tmp_path, capsys):
    from wanstudio.media import asset_path, load_audio, probe_media
    from wanstudio.pipeline.tiny_weights import tiny_weights_available

    out = tmp_path / "demo.mp4"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    info = probe_media(out)
    seconds = load_audio(asset_path("speech.wav")).size / 16000
    assert info["has_video"] and info["has_audio"]
    assert info["frames"] == int(seconds * 25) and info["fps"] == 25
    assert info["duration"] == pytest.approx(seconds, abs=0.1)
    text = capsys.readouterr().out
    assert "wanstudio demo:" in text and "audio yes" in text
    assert ("The picture is noise" in text) == (not tiny_weights_available())
    assert "scores: lip sync" in text and "dB PSNR" in text
    assert not (tmp_path / "demo.mp4.work").exists()


def test_choices_come_from_the_options_registry():
    assert choices("infinitetalk", "quantization") == ws.QUANT_MODES
    assert choices("infinitetalk", "attention") == ws.ATTENTION_MODES
    assert choices("infinitetalk", "dtype") == BasePrecision.names()
    assert choices("infinitetalk", "scheduler") == SCHEDULERS
    assert choices("infinitetalk", "size_class") == SizeClass.names()
    assert choices("infinitetalk", "speaker_mix") == SpeakerMix.names()
    assert choices("demo", "scheduler") == SCHEDULERS


def test_doctor_reports_every_mode(capsys):
    assert main(["doctor", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "torch " in text and "CUDA available" in text and "ffmpeg" in text
    for mode in ws.QUANT_MODES + ws.ATTENTION_MODES:
        assert f"\n  {mode} " in text
    assert "needs a CUDA GPU" in text or "ok" in text.split("attention:")[1]
    assert "memory (README 'Small cards'):\n  cpu: no CUDA device" in text


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--image", "a.png", "--audio", "a.wav"], "missing weights: --dit, --vae, --text-encoder"),
        (
            [
                "--image",
                "a.png",
                "--audio",
                "a.wav",
                "--dit",
                "nope.safetensors",
                "--vae",
                "v",
                "--text-encoder",
                "t",
                "--clip",
                "c",
                "--wav2vec",
                "w",
            ],
            "--dit: no such file",
        ),
        # two speakers without boxes use the default halves (tests/test_dubbing.py); one box is refused
        (
            ["--image", "a.png", "--audio", "a.wav", "--audio2", "b.wav", "--bbox", "0,0,4,4", "--tiny"],
            "--bbox must be given exactly twice",
        ),
        (
            ["--image", "a.png", "--audio", "a.wav", "--bbox", "0,0,4,4", "--tiny"],
            "more speakers than speech",
        ),
        (["--image", "a.png", "--video", "v.mp4", "--audio", "a.wav", "--tiny"], "not both"),
        (["--audio", "a.wav", "--tiny"], "pass --image or --video"),
        (["--input-json", "x.json", "--audio", "a.wav", "--tiny"], "--input-json gives the inputs"),
        (["--video", "v.mp4", "--audio", "a.wav", "--tiny"], "video file not found: v.mp4"),
        (["--image", "v.mov", "--audio", "a.wav", "--tiny"], "video file not found: v.mov"),
        (["--image", "a.png", "--audio", "a.wav", "--tiny"], "image file not found: a.png"),
    ],
)
def test_infinitetalk_errors_are_one_line_and_exit_2(argv, match, capsys):
    assert main(["infinitetalk", *argv]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_unknown_choice_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["infinitetalk", "--image", "a", "--audio", "b", "--quantization", "int8"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "argument --quantization: QuantMode: 'int8' is not a known mode" in err
    assert "Valid: " + ", ".join(ws.QUANT_MODES) in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--quantization", "fp8_e4m3_fast"], "Did you mean 'fp8_e4m3fn_fast'?"),
        (["--attention", "sagattn"], "Did you mean 'sageattn'?"),
        (["--dtype", "bf17"], "Did you mean 'bf16'?"),
        (["--scheduler", "eular"], "Did you mean 'euler'?"),
    ],
)
def test_a_typo_gets_the_apis_suggestion_in_a_short_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["infinitetalk", "--image", "a", "--audio", "b", *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err
    from wanstudio.options import parse_option

    kind = {"--quantization": ws.QuantMode, "--attention": ws.AttentionMode, "--dtype": BasePrecision}
    kind = kind.get(argv[0], ws.options.Scheduler)
    with pytest.raises(ws.errors.UnknownOptionError) as api:
        parse_option(kind, argv[1])
    assert str(api.value) in err  # the same words as the Python API
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("usage: wanstudio infinitetalk")


def test_typed_choices_are_case_insensitive_like_the_api():
    args = build_parser().parse_args(["infinitetalk", "--image", "a", "--audio", "b", "--attention", "SDPA"])
    assert args.attention == "sdpa"


def test_negative_blocks_to_swap_is_refused_at_parse_time_with_the_range(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["infinitetalk", "--tiny", "--image", "a", "--audio", "b", "--blocks-to-swap", "-1"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "--blocks-to-swap: expected 'auto' or a number of DiT blocks from 0" in err and "got '-1'" in err


def _help(subcommand: str, capsys) -> str:
    with pytest.raises(SystemExit):
        main([subcommand, "--help"])
    return " ".join(capsys.readouterr().out.split())  # unwrapped


def test_infinitetalk_help_shows_defaults_modes_and_where_weights_come_from(capsys):
    text = _help("infinitetalk", capsys)
    for default in ("(default: standard)", "(default: disabled)", "(default: sdpa)"):
        assert default in text
    assert "(default: infinitetalk.mp4)" in text and "One of: standard = " in text
    assert "sampling steps per clip (default: the preset's)" in text
    assert "One of: " + ", ".join(ws.QUANT_MODES) in text
    assert "One of: " + ", ".join(ws.ATTENTION_MODES) in text
    assert f"bf16 = {BasePrecision.BF16.description}" in text
    assert "$WANSTUDIO_WEIGHTS" in text and "wanstudio.toml" in text
    assert 'README.md, section "Real weights"' in text and "hf download" in text


@pytest.mark.slow
def test_infinitetalk_tiny_wiring(tmp_path, capsys):
    from wanstudio.media import asset_path, probe_media

    out = tmp_path / "talk.mp4"
    argv = [
        "infinitetalk",
        "--tiny",
        "--image",
        str(asset_path("portrait.png")),
        "--audio",
        str(asset_path("speech.wav")),
        "--out",
        str(out),
        "--steps",
        "1",
        "--max-frames",
        "20",
        "--text-scale",
        "1",
        "--scheduler",
        "unipc",
        "--quiet",
    ]
    assert main(argv) == 0
    assert probe_media(out)["frames"] == 20
    assert "20 frames" in capsys.readouterr().out


@pytest.mark.slow
def test_module_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "wanstudio.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    for command in ("demo", "infinitetalk", "doctor"):
        assert command in result.stdout


def test_inspect_reports_layouts_and_exits_nonzero_on_violations(tmp_path, capsys, monkeypatch):
    from wanstudio.cli import main

    csv = tmp_path / "rows.csv"
    assert main(["inspect", "--speakers", "2", "--quantization", "fp8_e4m3fn_fast", "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "violations: 0" in out and "torch._scaled_mm" in out
    assert csv.read_text().count("\n") > 100

    class ReportWithViolation:
        def summary(self):
            return "violations: 1"

        def violations(self):
            return ["blocks.0.self_attn.q mat2 align"]

        def __len__(self):
            return 1

    monkeypatch.setattr("wanstudio.inspector.inspect_layout", lambda model, inputs: ReportWithViolation())
    assert main(["inspect", "--preset", "tiny-t2v"]) == 1


def test_bench_refuses_to_run_without_a_gpu(capsys):
    from wanstudio.cli import main

    if __import__("torch").cuda.is_available():
        pytest.skip("has a GPU")
    assert main(["bench", "--suite", "roofline"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_forward_flops_match_the_published_wan_14b_figures():
    from wanstudio.bench import forward_flops

    flops = forward_flops(__import__("wanstudio").WanConfig.preset("i2v-14b"), 81, 832, 480)
    assert flops["tokens"] == 32760
    # issue 10: "Linear 0.78 PFLOP + attention 0.90 PFLOP per forward"
    assert flops["linear"] / 1e15 == pytest.approx(0.786, abs=0.005)
    assert flops["attention"] / 1e15 == pytest.approx(0.900, abs=0.005)


# --- stopping and the work folder ------------------------------------------------------------------
def folder_with_a_finished_clip(path) -> None:
    from wanstudio.pipeline.resume import ClipRecord, WorkFolder

    work = WorkFolder(path, {}, 2)
    frames, motion = torch.zeros(1, 2, 2, 3, dtype=torch.uint8), torch.zeros(3, 1, 2, 2)
    work.save(ClipRecord(0, frames, motion, torch.zeros(1), frames_done=1))
    work.release()


def interrupted_run(monkeypatch, how):
    """Run generation as `how` (no model work) and record that the pipeline was called."""
    from wanstudio.pipeline import InfiniteTalkPipeline

    called = []

    def call(self, *args, **kwargs):
        called.append(kwargs)
        how()

    monkeypatch.setattr(InfiniteTalkPipeline, "__call__", call)
    monkeypatch.setattr(InfiniteTalkPipeline, "tiny", classmethod(lambda cls, **kw: object.__new__(cls)))
    return called


def test_ctrl_c_names_the_work_folder_and_the_exact_resume_command(tmp_path, monkeypatch, capsys):
    def stop():
        raise KeyboardInterrupt

    called = interrupted_run(monkeypatch, stop)
    out = tmp_path / "my talk.mp4"
    argv = ["demo", "--out", str(out), "--seed", "7", "--quiet"]
    assert main(argv) == 130
    assert called and called[0]["overwrite"] is False
    err = capsys.readouterr().err
    work = f"{out}.work"
    assert f"wanstudio demo: interrupted; 0 finished clip(s) are kept in the work folder {work}." in err
    assert f"Continue with: wanstudio demo --out '{out}' --seed 7 --quiet --resume" in err
    # a folder with a finished clip, interrupted again under --resume: the same command continues
    folder_with_a_finished_clip(work)
    assert main([*argv, "--resume"]) == 130
    again = f"wanstudio demo --out '{out}' --seed 7 --quiet --resume\n"  # --resume not doubled
    assert (
        f"1 finished clip(s) are kept in the work folder {work}. Continue with: {again}"
        in capsys.readouterr().err
    )


def test_sigterm_stops_like_ctrl_c_and_the_handler_is_restored(tmp_path, monkeypatch, capsys):
    import os
    import signal
    import time

    def terminate():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler raises KeyboardInterrupt here

    def unhandled(signum, frame):  # where SIGTERM lands unless the CLI handles it (not: kill pytest)
        raise RuntimeError("SIGTERM reached the previous handler")

    original = signal.signal(signal.SIGTERM, unhandled)
    try:
        interrupted_run(monkeypatch, terminate)
        out = tmp_path / "talk.mp4"
        t0 = time.perf_counter()
        assert main(["demo", "--out", str(out), "--quiet", "--overwrite"]) == 128 + signal.SIGTERM
        assert time.perf_counter() - t0 < 20
        assert signal.getsignal(signal.SIGTERM) is unhandled
    finally:
        signal.signal(signal.SIGTERM, original)
    err = capsys.readouterr().err
    assert "wanstudio demo: stopped by SIGTERM; 0 finished clip(s) are kept in the work folder" in err
    assert f"Continue with: wanstudio demo --out {out} --quiet --resume" in err  # --overwrite dropped


@pytest.mark.parametrize(
    "setup, extra, match",
    [
        ("folder", [], "it is a folder"),
        ("clips", [], r"holds 1 finished clip\(s\) of an earlier run: pass resume=True / --resume"),
        ("clips", ["--resume", "--overwrite"], "pass one of them"),
        ("lock", ["--resume"], r"is in use by another run \(pid "),
    ],
)
def test_output_and_work_folder_problems_are_refused_before_loading(
    tmp_path, monkeypatch, capsys, setup, extra, match
):
    from wanstudio.pipeline import InfiniteTalkPipeline
    from wanstudio.pipeline.resume import WorkFolder

    out = tmp_path / "talk.mp4"
    holder = None
    if setup == "folder":
        out.mkdir()
    elif setup == "clips":
        folder_with_a_finished_clip(f"{out}.work")
    else:
        holder = WorkFolder(f"{out}.work", {}, 2)

    def no_loading(*args, **kwargs):
        raise AssertionError("weights loaded before the output was checked")

    monkeypatch.setattr(InfiniteTalkPipeline, "tiny", no_loading)
    monkeypatch.setattr(InfiniteTalkPipeline, "from_files", no_loading)
    from wanstudio.media import asset_path

    media = ["--image", str(asset_path("portrait.png")), "--audio", str(asset_path("speech.wav"))]
    for command in (["demo"], ["infinitetalk", "--tiny", *media]):
        assert main([*command, "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert re.search(match, err) and "Traceback" not in err
    if holder is not None:
        holder.release()


# --- a newcomer's first hour -------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def no_weights_configured(monkeypatch, tmp_path_factory):
    """No $WANSTUDIO_WEIGHTS and an empty ~/.config: tests see no configured weights."""
    monkeypatch.delenv("WANSTUDIO_WEIGHTS", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("xdg")))


class _Stop(ws.errors.WanstudioError):
    pass


def _weights_folder(tmp_path):
    """A folder with a wanstudio.toml naming one (empty) file per part."""
    folder = tmp_path / "weights"
    folder.mkdir()
    for name in ("dit.safetensors", "it.safetensors", "vae.pth", "t5.pth", "clip.pth"):
        (folder / name).write_bytes(b"")
    for name in ("tokenizer", "wav2vec"):
        (folder / name).mkdir()
    (folder / "wanstudio.toml").write_text(
        "[weights]\n"
        'dit = ["dit.safetensors"]\ninfinitetalk = "it.safetensors"\nvae = "vae.pth"\n'
        'text_encoder = "t5.pth"\ntokenizer = "tokenizer"\nclip = "clip.pth"\nwav2vec = "wav2vec"\n'
    )
    return folder


def _capture_from_files(monkeypatch) -> dict:
    from wanstudio.pipeline import InfiniteTalkPipeline

    seen = {}

    def from_files(**kw):
        seen.update(kw)
        raise _Stop("stopped before loading")

    monkeypatch.setattr(InfiniteTalkPipeline, "from_files", staticmethod(from_files))
    return seen


def _media_args():
    from wanstudio.media import asset_path

    return ["--image", str(asset_path("portrait.png")), "--audio", str(asset_path("speech.wav"))]


def test_infinitetalk_uses_the_weights_env_var_and_says_so(tmp_path, monkeypatch, capsys):
    folder = _weights_folder(tmp_path)
    monkeypatch.setenv("WANSTUDIO_WEIGHTS", str(folder))
    seen = _capture_from_files(monkeypatch)
    assert main(["infinitetalk", *_media_args(), "--quantization", "fp8_e4m3fn"]) == 2
    assert seen["dit"] == [str(folder / "dit.safetensors")] and seen["vae"] == str(folder / "vae.pth")
    assert seen["infinitetalk"] == str(folder / "it.safetensors")
    assert seen["tokenizer"] == str(folder / "tokenizer")
    assert seen["modes"].quantization is ws.QuantMode.FP8_E4M3FN
    out = capsys.readouterr()
    assert f"from $WANSTUDIO_WEIGHTS={folder}" in out.out and "stopped before loading" in out.err


def test_memory_flags_reach_the_loader_and_the_call(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANSTUDIO_WEIGHTS", str(_weights_folder(tmp_path)))
    seen = _capture_from_files(monkeypatch)
    flags = ["--blocks-to-swap", "auto", "--vram-budget-gb", "11.5", "--offload-encoders", "on"]
    flags += ["--text-encoder-device", "CPU", "--text-encoder-quantization", "fp8_e4m3fn_scaled"]
    assert main(["infinitetalk", *_media_args(), *flags]) == 2
    assert seen["modes"].blocks_to_swap == "auto" and seen["vram_budget_gb"] == 11.5
    assert seen["offload_encoders"] == "on" and seen["text_encoder_device"] == "cpu"
    assert seen["text_encoder_quantization"] == "fp8_e4m3fn_scaled"
    assert main(["infinitetalk", *_media_args()]) == 2  # the defaults: decide, GPU when it fits, bf16
    assert seen["offload_encoders"] == "auto" and seen["text_encoder_device"] == "auto"
    assert seen["text_encoder_quantization"] is None and seen["vram_budget_gb"] is None
    args = build_parser().parse_args(["infinitetalk", "--image", "a", "--audio", "b"])
    assert args.tiled_vae == "auto"
    args = build_parser().parse_args(["infinitetalk", "--image", "a", "--audio", "b", "--tiled-vae"])
    assert args.tiled_vae == "on"  # the old bare flag still means tiles
    for bad, message in (
        (["--vram-budget-gb", "0"], "expected a number of GiB > 0"),
        (["--offload-encoders", "yes"], "--offload-encoders"),
        (["--tiled-vae", "sometimes"], "--tiled-vae"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(["infinitetalk", *_media_args(), *bad])
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_timesteps_flag_sets_the_distilled_list_and_the_step_count():
    from wanstudio.cli_support import sampling_settings

    def parsed(*flags):
        return sampling_settings(
            build_parser().parse_args(["infinitetalk", "--image", "a", "--audio", "b", *flags])
        )

    got = parsed("--preset", "distill_4step", "--timesteps", "999", "750", "500", "250")
    assert got["timesteps"] == [999.0, 750.0, 500.0, 250.0] and got["steps"] == 4
    assert got["scheduler"] == "euler_distill"
    assert parsed("--scheduler", "euler_distill", "--timesteps", "900", "300")["steps"] == 2
    assert parsed("--timesteps", "900", "300", "--steps", "3")["steps"] == 3  # the sampler refuses it
    assert "timesteps" not in parsed()


def test_memory_settings_accept_the_registry_names():
    from wanstudio.pipeline.memory import check_offload, check_text_device, check_tiled

    assert [check_offload(v) for v in ("auto", "ON", "off", None, True, False)] == [
        None,
        True,
        False,
        None,
        True,
        False,
    ]
    assert [check_text_device(v) for v in ("auto", "cpu", None, torch.device("cpu"))] == [
        None,
        "cpu",
        None,
        "cpu",
    ]
    assert [check_tiled(v) for v in ("auto", "on", "off", True, False)] == ["auto", True, False, True, False]
    for check, bad in (
        (check_offload, "maybe"),
        (check_text_device, "cuda"),
        (check_tiled, None),
        (check_offload, 2),
    ):
        with pytest.raises(ConfigError):
            check(bad)


def test_explicit_flags_win_over_a_wanstudio_toml(tmp_path, monkeypatch, capsys):
    folder = _weights_folder(tmp_path)
    monkeypatch.chdir(folder)  # wanstudio.toml in the current folder
    mine = tmp_path / "my_vae.safetensors"
    mine.write_bytes(b"")
    seen = _capture_from_files(monkeypatch)
    assert main(["infinitetalk", *_media_args(), "--vae", str(mine)]) == 2
    assert seen["vae"] == str(mine) and seen["clip"] == str(folder / "clip.pth")
    out = capsys.readouterr().out
    assert "vae from --vae" in out and f"from {folder / 'wanstudio.toml'}" in out


def test_the_infinitetalk_weights_follow_the_dit_flag_not_the_config(tmp_path, monkeypatch):
    folder = _weights_folder(tmp_path)
    monkeypatch.setenv("WANSTUDIO_WEIGHTS", str(folder / "wanstudio.toml"))
    merged = tmp_path / "merged.safetensors"
    merged.write_bytes(b"")
    seen = _capture_from_files(monkeypatch)
    assert main(["infinitetalk", *_media_args(), "--dit", str(merged)]) == 2
    assert seen["dit"] == [str(merged)] and seen["infinitetalk"] is None
    assert seen["wav2vec"] == str(folder / "wav2vec")


def test_missing_weights_say_where_wanstudio_looked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["infinitetalk", *_media_args()]) == 2
    err = capsys.readouterr().err
    assert "missing weights: --dit, --vae, --text-encoder, --clip, --wav2vec" in err
    assert "$WANSTUDIO_WEIGHTS" in err and str(tmp_path / "wanstudio.toml") in err
    assert "README.md, section 'Real weights'" in err and "--tiny" in err


def test_doctor_reports_the_weights_it_finds_or_where_it_looked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["doctor", "--device", "cpu"]) == 0
    text = capsys.readouterr().out.split("\nweights (what")[1]
    assert "none configured: $WANSTUDIO_WEIGHTS is not set" in text
    assert str(tmp_path / "wanstudio.toml") in text and "WANSTUDIO_WEIGHTS=<your download folder>" in text
    folder = _weights_folder(tmp_path)
    (folder / "clip.pth").unlink()
    monkeypatch.setenv("WANSTUDIO_WEIGHTS", str(folder))
    assert main(["doctor", "--device", "cpu"]) == 0
    text = capsys.readouterr().out.split("\nweights (what")[1]
    assert f"found through $WANSTUDIO_WEIGHTS={folder}" in text
    assert f"vae: {folder / 'vae.pth'}" in text and f"MISSING: clip: {folder / 'clip.pth'}" in text


def _capture_tiny_call(monkeypatch) -> list:
    from wanstudio.pipeline import InfiniteTalkPipeline

    pipes = []

    def call(self, *args, **kw):
        pipes.append(self)
        raise _Stop("stopped before generating")

    monkeypatch.setattr(InfiniteTalkPipeline, "__call__", call)
    return pipes


def test_tiny_applies_the_runtime_modes(monkeypatch, capsys):
    from wanstudio.modes import RuntimeModes
    from wanstudio.quant import quantized_layers

    pipes = _capture_tiny_call(monkeypatch)
    argv = ["--tiny", "--quantization", "fp8_e4m3fn", "--attention", "sdpa", "--dtype", "bf16"]
    assert main(["infinitetalk", *_media_args(), *argv, "--steps", "1"]) == 2
    model = pipes[0].model
    assert model.modes == RuntimeModes(quantization="fp8_e4m3fn", attention="sdpa", precision="bf16")
    assert quantized_layers(model) and {m.mode.value for m in quantized_layers(model).values()} == {
        "fp8_e4m3fn"
    }
    assert next(p for n, p in model.named_parameters() if "norm" not in n).dtype == torch_dtype("bfloat16")
    assert "fp8_e4m3fn" in repr(pipes[0])


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--blocks-to-swap", "1"], "block swap is meaningless on the CPU"),
        (["--dtype", "fp16_fast"], "'fp16_fast' (fp16 matmul accumulation) needs a CUDA GPU"),
        (["--attention", "flash_attn"], "attention mode 'flash_attn' cannot run here"),
    ],
)
def test_tiny_refuses_a_mode_the_cpu_cannot_run_instead_of_ignoring_it(argv, message, monkeypatch, capsys):
    if __import__("torch").cuda.is_available():
        pytest.skip("has a GPU")
    pipes = _capture_tiny_call(monkeypatch)
    assert main(["infinitetalk", *_media_args(), "--tiny", *argv]) == 2
    assert message in capsys.readouterr().err and not pipes


def test_tiny_at_default_settings_warns_how_long_it_takes_on_a_cpu(monkeypatch, capsys):
    from wanstudio.pipeline import InfiniteTalkPipeline

    def tiny(*a, **kw):
        raise _Stop("stopped before building")

    monkeypatch.setattr(InfiniteTalkPipeline, "tiny", staticmethod(tiny))
    assert main(["infinitetalk", *_media_args(), "--tiny"]) == 2
    out = capsys.readouterr().out
    # the shipped 3.8 s clip, 17-frame clips carrying 5 frames: 8 clips
    assert "note: --tiny on the CPU runs 8 clips x 40 steps x 3 model calls here: about 2 min" in out
    assert "--max-frames" in out and "wanstudio demo" in out
    assert main(["infinitetalk", *_media_args(), "--tiny", "--steps", "2", "--max-frames", "20"]) == 2
    assert "note:" not in capsys.readouterr().out


def test_inspect_refuses_a_model_larger_than_memory_before_allocating(monkeypatch, capsys):
    from types import SimpleNamespace

    import wanstudio.model

    made = []
    real = wanstudio.model.WanModel

    class Recording(real):
        def __init__(self, cfg, device=None, dtype=None):
            made.append(str(device))
            if cfg.dim > 1024 and str(device) != "meta":  # never let a failing check eat 65 GB
                raise AssertionError(f"a {cfg.dim}-wide model was allocated on {device}")
            super().__init__(cfg, device=device, dtype=dtype)

    monkeypatch.setattr("wanstudio.model.WanModel", Recording)
    monkeypatch.setattr("psutil.virtual_memory", lambda: SimpleNamespace(available=24 * 2**30))
    assert main(["inspect", "--preset", "i2v-14b", "--latent", "1", "2", "2"]) == 2
    err = capsys.readouterr().err
    assert made == ["meta"]  # counted on the meta device, nothing allocated
    assert "the i2v-14b preset in fp32 needs about 71.2 GiB (16.39 B parameters x 4 bytes + margin)" in err
    assert "but only 24.0 GiB of host memory is available" in err
    assert "--preset t2v-1.3b" in err and "--dtype bf16 (about 36.1 GiB)" in err
    monkeypatch.setattr("psutil.virtual_memory", lambda: SimpleNamespace(available=2**20))
    assert main(["inspect", "--preset", "tiny-t2v"]) == 2  # the tiny preset needs ~1 GiB of margin
    monkeypatch.setattr("psutil.virtual_memory", lambda: SimpleNamespace(available=64 * 2**30))
    assert main(["inspect", "--preset", "tiny-t2v"]) == 0


# --- presets and LoRAs ---------------------------------------------------------------------------------
def _parsed(*argv):
    from wanstudio.cli import build_parser

    return build_parser().parse_args(["infinitetalk", "--image", "i.png", "--audio", "a.wav", *argv])


def test_preset_sets_the_sampling_and_flags_override_single_values():
    from wanstudio.cli_support import sampling_settings
    from wanstudio.options import GenerationPreset

    assert sampling_settings(_parsed()) == dict(steps=40, text_scale=5.0, audio_scale=4.0, scheduler="euler")
    distill = GenerationPreset.DISTILL_4STEP.settings
    assert sampling_settings(_parsed("--preset", "distill_4step")) == dict(
        steps=4, shift=distill.shift, text_scale=1.0, audio_scale=2.0, scheduler="euler_distill"
    )
    got = sampling_settings(_parsed("--preset", "distill_4step", "--audio-scale", "1", "--steps", "6"))
    assert got["audio_scale"] == 1.0 and got["steps"] == 6 and got["text_scale"] == 1.0


def test_lora_flag_takes_a_path_and_an_optional_strength(tmp_path, capsys):
    from wanstudio.lora import LoRA

    lora = tmp_path / "distill.safetensors"
    lora.write_bytes(b"")
    args = _parsed("--lora", str(lora), "--lora", f"{lora}:0.8")
    assert args.lora == [LoRA(lora, 1.0), LoRA(lora, 0.8)]
    with pytest.raises(SystemExit):
        _parsed("--lora", str(tmp_path / "missing.safetensors"))
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["demo"], ["infinitetalk", "--image", "a", "--audio", "b"]])
def test_dash_o_names_the_output_as_out_does(command):
    """`-o` is what people type first; it used to fall through to the top-level usage line."""
    assert build_parser().parse_args([*command, "-o", "x.mp4"]).out == "x.mp4"
