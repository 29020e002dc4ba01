"""The ``wanstudio`` command line: demo end to end, choices from options.py, doctor, errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

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
