"""The ``wanstudio`` command line: demo end to end, choices from options.py, doctor, errors."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

import wanstudio as ws
from wanstudio.cli import build_parser, main
from wanstudio.options import SCHEDULERS, BasePrecision, SizeClass, SpeakerMix


def choices(subcommand: str, dest: str) -> tuple:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[subcommand]
    return tuple(next(a for a in sub._actions if a.dest == dest).choices)


def test_demo_writes_an_mp4_with_video_and_audio(tmp_path, capsys):
    from wanstudio.media import asset_path, load_audio, probe_media

    out = tmp_path / "demo.mp4"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    info = probe_media(out)
    seconds = load_audio(asset_path("speech.wav")).size / 16000
    assert info["has_video"] and info["has_audio"]
    assert info["frames"] == int(seconds * 25) and info["fps"] == 25
    assert info["duration"] == pytest.approx(seconds, abs=0.1)
    text = capsys.readouterr().out
    assert "wanstudio demo:" in text and "audio yes" in text and "noise" in text
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
        (["--image", "a.png", "--audio", "a.wav", "--audio2", "b.wav", "--tiny"], "--bbox twice"),
        (["--image", "a.png", "--audio", "a.wav", "--tiny"], "image: no such file"),
    ],
)
def test_infinitetalk_errors_are_one_line_and_exit_2(argv, match, capsys):
    assert main(["infinitetalk", *argv]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_unknown_choice_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["infinitetalk", "--image", "a", "--audio", "b", "--quantization", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err


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
    for command in (["demo"], ["infinitetalk", "--tiny", "--image", "a.png", "--audio", "a.wav"]):
        assert main([*command, "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert re.search(match, err) and "Traceback" not in err
    if holder is not None:
        holder.release()
