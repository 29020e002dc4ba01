"""The studio panels without a browser: build them, set values, click, and check the calls made
(fake loader, fake pipeline, fake inspector) and what the panels show; plus the notebook
helpers in ``wanstudio.studio``."""

from __future__ import annotations

import ast
import datetime
import importlib.util
import json
import math
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

pytest.importorskip("ipywidgets")  # a studio / test extra: collection works without it

import wanstudio as ws
from wanstudio import studio
from wanstudio.availability import Availability
from wanstudio.errors import ConfigError, LayoutError, PipelineError
from wanstudio.modes import RuntimeModes
from wanstudio.options import (
    AttentionMode,
    BasePrecision,
    QuantMode,
    Scheduler,
    SizeClass,
    SpeakerMix,
    options_table,
)
from wanstudio.quant import quantized_layers
from wanstudio.studio import LoadResult, LoadSettings, WeightPaths
from wanstudio.widgets import (
    GeneratePanel,
    GenerationCancelled,
    LayoutPanel,
    LoadPanel,
    choices,
    quant_comparison_plot,
)
from wanstudio.widgets.common import error_html
from wanstudio.widgets.generate_panel import parse_bboxes
from wanstudio.widgets.load_panel import check_path

ROOT = Path(__file__).resolve().parents[1]
JOIN = 30.0  # seconds a worker thread may take in these tests (they take milliseconds)


def values(dropdown) -> list[str]:
    return [v for _, v in dropdown.options]


# --- fakes ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model() -> ws.WanModel:
    torch.manual_seed(0)
    return ws.WanModel(ws.WanConfig.preset("tiny-infinitetalk")).eval().requires_grad_(False)


class FakePipeline:
    """Records calls; emits progress like the real pipeline; writes a small 'mp4'.

    ``gate``: if set, the call waits on it after ``pause_at`` = (clip, step), having set
    ``reached`` — so a test can click Cancel at a known point.
    """

    identity = "tiny-infinitetalk(fake)"

    def __init__(
        self,
        model,
        clips: int = 2,
        steps: int = 3,
        error: Exception | None = None,
        pause_at: tuple[int, int] | None = None,
    ):
        self.model = model
        self.settings = {}
        self.calls: list[tuple[tuple, dict]] = []
        self.clips, self.steps, self.error, self.pause_at = clips, steps, error, pause_at
        self.reached, self.gate = threading.Event(), threading.Event()
        self.raised: BaseException | None = None
        self.thread_names: list[str] = []

    def __call__(self, image, audio, **kw):
        from wanstudio.pipeline import GeneratedVideo, ProgressEvent

        self.calls.append(((image, audio), kw))
        self.thread_names.append(threading.current_thread().name)
        progress, out = kw["progress"], kw.get("out")
        resumed = 1 if kw.get("resume") else 0

        def emit(kind, clip, step):
            progress(
                ProgressEvent(
                    kind, clip, self.clips, step, self.steps, 0.5, 1.0, clip * 10, self.clips * 10, resumed
                )
            )

        try:
            emit("start", resumed + 1, 0)
            for clip in range(resumed + 1, self.clips + 1):
                for step in range(1, self.steps + 1):
                    if self.error is not None and (clip, step) == (1, 2):
                        raise self.error
                    if self.pause_at == (clip, step):
                        self.reached.set()
                        assert self.gate.wait(JOIN)
                    emit("step", clip, step)
                emit("clip", clip, 0)
            emit("done", self.clips, self.steps)
        except BaseException as e:
            self.raised = e
            raise
        Path(out).write_bytes(b"\x00\x00\x00\x18ftypmp42fake-video")
        return GeneratedVideo(
            frames=None,
            path=Path(out),
            num_frames=self.clips * 10,
            size=(64, 64),
            clips=self.clips,
            resumed_clips=resumed,
            seconds=0.1,
        )


class FakeReport:
    def __init__(self, mode):
        self.mode = mode

    def _repr_html_(self):
        return f"<table><tr><td>per-layer SQNR for {self.mode.value}</td></tr></table>"


class FakeLoader:
    def __init__(self, model, error: Exception | None = None):
        self.model, self.error = model, error
        self.calls: list[LoadSettings] = []

    def __call__(self, settings: LoadSettings) -> LoadResult:
        self.calls.append(settings)
        if self.error is not None:
            raise self.error
        report = FakeReport(settings.quantization) if settings.quantization != QuantMode.DISABLED else None
        return LoadResult(
            FakePipeline(self.model), settings, 0.25, report, "" if report else "no quantization"
        )


# --- dropdowns == registry ---------------------------------------------------------------------------
def test_every_dropdown_offers_exactly_the_registry(tiny_model):
    load = LoadPanel(loader=FakeLoader(tiny_model), find=False, device="cpu")
    gen = GeneratePanel(FakePipeline(tiny_model), image="i.png", audio="a.wav")
    assert values(load.quantization) == list(QuantMode.names())
    assert values(load.attention) == list(AttentionMode.names())
    assert values(load.precision) == list(BasePrecision.names())
    assert values(gen.size_class) == list(SizeClass.names())
    assert values(gen.scheduler) == list(Scheduler.names())
    assert values(gen.speaker_mix) == list(SpeakerMix.names())
    assert values(load.preset) == studio.pipeline_presets()
    assert "tiny-infinitetalk" in values(load.preset)


def test_unavailable_modes_are_labelled_with_the_reason(monkeypatch):
    def fake_attention(device):
        out = {
            m: Availability.refused("needs a CUDA GPU", "needs a CUDA GPU (cpu is not one)")
            for m in AttentionMode
        }
        out[AttentionMode.SDPA] = Availability.runs("torch SDPA")
        out[AttentionMode.SAGEATTN] = Availability.refused(
            "not installed", "package 'sageattention' is not installed (pip install sageattention)"
        )
        out[AttentionMode.XFORMERS] = Availability(False, "a reason nobody shortened")
        return out

    monkeypatch.setattr(choices, "attention_availability", fake_attention)
    labels = dict((v, label) for label, v in choices.attention_choices("cpu"))
    assert labels["sdpa"] == "sdpa"
    assert labels["sageattn"] == "sageattn — not installed"
    assert labels["flash_attn"] == "flash_attn — needs a CUDA GPU"
    assert labels["xformers"] == "xformers — not available here"  # no short: never the reason


def test_cpu_labels_come_from_the_real_probes():
    labels = dict((v, label) for label, v in choices.attention_choices("cpu"))
    assert labels["sdpa"] == "sdpa"
    for mode in AttentionMode:
        if mode != AttentionMode.SDPA:
            assert labels[mode.value].startswith(f"{mode.value} — ")
    precision = dict((v, label) for label, v in choices.precision_choices("cpu"))
    assert precision["fp16_fast"].startswith("fp16_fast — needs a CUDA GPU")


def test_labels_show_the_short_reason_their_checker_gave(monkeypatch):
    """The short label comes from whoever decided (backends, quant, precision), not from
    parsing the full reason: here an old GPU, simulated for quantization and bf16."""
    from wanstudio.quant import spec

    monkeypatch.setattr(spec, "cuda_capability", lambda device: (7, 5))
    monkeypatch.setattr(spec, "cuda_name", lambda device: "Old Card")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    quant = studio.quant_availability("cuda:0")
    fast = quant[QuantMode.FP8_E4M3FN_FAST]
    assert not fast.available and fast.short == "GPU too old (needs sm89+)"
    assert "Old Card" in fast.reason and "compute capability 7.5" in fast.reason  # the full story
    assert quant[QuantMode.FP8_E4M3FN_SCALED].available
    precision = studio.precision_availability("cuda:0")
    assert precision[BasePrecision.BF16].short == "GPU too old (needs sm80+)"
    labels = dict((v, label) for label, v in choices.choices(QuantMode, quant))
    assert labels["fp8_e4m3fn_fast"] == "fp8_e4m3fn_fast — GPU too old (needs sm89+)"
    everything = [
        *studio.attention_availability("cpu").values(),
        *studio.precision_availability("cpu").values(),
        *quant.values(),
        studio.swap_availability("cpu"),
    ]
    for status in everything:
        assert status.available or 0 < len(status.short) <= choices.MAX_REASON, status


def test_options_markdown_is_the_registry_tables():
    text = choices.options_markdown()
    for kind in choices.REGISTRIES.values():
        assert options_table(kind) in text
    for mode in QuantMode:
        assert f"`{mode.value}`" in text


def test_readme_holds_the_generated_options_tables():
    readme = (ROOT / "README.md").read_text()
    assert choices.options_markdown() in readme, (
        "README.md's options tables differ from the registry: paste wanstudio.widgets.options_markdown()"
    )


def test_environment_yml_installs_the_studio():
    yaml = pytest.importorskip("yaml")
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["channels"][0] == "conda-forge"
    names = {d.split("=")[0].split(">")[0] for d in env["dependencies"] if isinstance(d, str)}
    assert {"python", "pytorch", "ffmpeg", "jupyterlab", "ipywidgets", "pip"} <= names
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "-e .[studio]" in pip


# --- LoadPanel -------------------------------------------------------------------------------------
def test_load_panel_tiny_click_calls_the_loader_and_shows_the_summary(tiny_model):
    loader = FakeLoader(tiny_model)
    panel = LoadPanel(loader=loader, find=False, device="cpu")
    loaded = []
    panel.on_loaded(loaded.append)
    assert panel.preset.value == "tiny-infinitetalk"
    assert panel.paths_box.layout.display == "none"  # the tiny preset needs no files
    panel.quantization.value = "fp8_e4m3fn_scaled"
    panel.load_button.click()
    (settings,) = loader.calls
    assert settings.preset == "tiny-infinitetalk" and settings.weights is None
    assert settings.quantization is QuantMode.FP8_E4M3FN_SCALED
    assert settings.attention is AttentionMode.SDPA and settings.precision is BasePrecision.FP32
    assert panel.pipeline is loaded[0].pipeline
    assert panel.model is tiny_model
    html = panel.summary_html.value
    assert "DiT" in html and "float32" in html and "host RSS" in html
    assert "fp8_e4m3fn_scaled" in html and "sdpa" in html  # the kernel path of each chosen mode
    assert "per-layer SQNR for fp8_e4m3fn_scaled" in panel.report_html.value
    assert "Loaded tiny-infinitetalk" in panel.status.value


def test_load_panel_refuses_a_mode_this_machine_cannot_run(tiny_model):
    loader = FakeLoader(tiny_model)
    panel = LoadPanel(loader=loader, find=False, device="cpu")
    panel.attention.value = "flash_attn"
    assert panel.load_button.disabled
    assert "needs a CUDA GPU" in panel.mode_notes.value
    assert panel.load() is None and loader.calls == []
    assert "needs a CUDA GPU" in panel.status.value
    panel.attention.value = "sdpa"
    assert not panel.load_button.disabled


def test_load_panel_block_swap_is_off_on_the_cpu(tiny_model):
    panel = LoadPanel(loader=FakeLoader(tiny_model), find=False, device="cpu")
    assert panel.blocks_to_swap.disabled and panel.blocks_to_swap.value == 0
    assert "block swap" in panel.mode_notes.value


def test_load_panel_shows_loader_errors_readably(tiny_model):
    error = ws.CheckpointError(
        "checkpoint does not match the i2v model\nDiagnosis: pass infinitetalk.safetensors"
    )
    panel = LoadPanel(loader=FakeLoader(tiny_model, error=error), find=False, device="cpu")
    assert panel.load() is None
    assert "CheckpointError" in panel.status.value and "Diagnosis: pass" in panel.status.value
    assert "Traceback" not in panel.status.value
    assert "Traceback" in panel.last_traceback and panel.last_error is error
    assert not panel.load_button.disabled  # the user can fix and retry


def test_load_panel_real_paths_are_validated_and_passed_on(tiny_model, tmp_path):
    files = {}
    for name in (
        "dit.safetensors.index.json",
        "infinitetalk.safetensors",
        "Wan2.1_VAE.pth",
        "umt5.pth",
        "clip.pth",
    ):
        (tmp_path / name).write_bytes(b"x" * 10)
        files[name] = tmp_path / name
    (tmp_path / "wav2vec").mkdir()
    loader = FakeLoader(tiny_model)
    panel = LoadPanel(loader=loader, find=False, device="cpu")
    panel.preset.value = "infinitetalk-14b"
    assert panel.paths_box.layout.display is None
    assert panel.load_button.disabled  # no paths yet
    panel.paths["dit"].value = str(files["dit.safetensors.index.json"])
    assert "✓" in panel.path_status["dit"].value
    panel.paths["vae"].value = str(tmp_path / "missing.pth")
    assert "✗ not found" in panel.path_status["vae"].value
    assert panel.load_button.disabled
    panel.paths["vae"].value = str(files["Wan2.1_VAE.pth"])
    panel.paths["text_encoder"].value = str(files["umt5.pth"])
    panel.paths["clip"].value = str(files["clip.pth"])
    panel.paths["wav2vec"].value = str(tmp_path / "wav2vec")
    panel.paths["infinitetalk"].value = str(files["infinitetalk.safetensors"])
    assert "folder" in panel.path_status["wav2vec"].value
    assert not panel.load_button.disabled, panel.mode_notes.value
    panel.load_button.click()
    (settings,) = loader.calls
    assert settings.preset == "infinitetalk-14b"
    assert settings.weights.dit == (str(files["dit.safetensors.index.json"]),)
    assert settings.weights.infinitetalk == str(files["infinitetalk.safetensors"])
    assert settings.weights.tokenizer is None
    assert settings.memory_kwargs() == dict(  # the defaults: decide at load time
        offload_encoders=None, text_encoder_device=None, text_encoder_quantization=None, vram_budget_gb=None
    )
    panel.vram_budget.value = 11.5
    panel.offload_encoders.value = "on"
    panel.text_encoder_device.value = "cpu"
    panel.text_encoder_quantization.value = "fp8_e4m3fn_scaled"
    assert "always the CPU" in panel.memory_notes.value
    panel.load_button.click()
    assert loader.calls[-1].memory_kwargs() == dict(
        offload_encoders=True,
        text_encoder_device="cpu",
        text_encoder_quantization="fp8_e4m3fn_scaled",
        vram_budget_gb=11.5,
    )


def test_load_settings_memory_choices_reach_from_files(monkeypatch, tmp_path):
    from wanstudio.studio import session

    seen = {}

    def from_files(**kw):
        seen.update(kw)
        raise RuntimeError("stop before loading")

    monkeypatch.setattr(session.InfiniteTalkPipeline, "from_files", staticmethod(from_files))
    weights = WeightPaths(
        dit=("d.safetensors",), vae="v.pth", text_encoder="t.pth", clip="c.pth", wav2vec="w", source="test"
    )
    settings = LoadSettings(
        "infinitetalk-14b", weights, blocks_to_swap="auto", vram_budget_gb=11, offload_encoders="off"
    )
    with pytest.raises(RuntimeError, match="stop before loading"):
        session.load_pipeline(settings)
    assert seen["modes"].blocks_to_swap == "auto" and seen["vram_budget_gb"] == 11.0
    assert seen["offload_encoders"] is False and seen["text_encoder_device"] is None
    for bad in (dict(vram_budget_gb=0), dict(offload_encoders="sometimes"), dict(blocks_to_swap=99)):
        with pytest.raises(ws.WanstudioError):  # ConfigError / UnknownOptionError / BlockSwapError
            LoadSettings("infinitetalk-14b", weights, **bad)


def test_check_path(tmp_path):
    assert check_path("", required=True) == (False, "required")
    assert check_path("", required=False) == (None, "optional")
    (tmp_path / "a").write_bytes(b"12")
    ok, msg = check_path(f"{tmp_path / 'a'}\n{tmp_path}", required=True)
    assert ok and "folder" in msg


# --- GeneratePanel -----------------------------------------------------------------------------------
@pytest.fixture
def media(tmp_path):
    from PIL import Image

    image = tmp_path / "portrait.png"
    Image.new("RGB", (96, 64), (120, 90, 60)).save(image)
    audio = tmp_path / "speech.wav"
    audio.write_bytes(b"RIFF")
    return image, audio, tmp_path / "out" / "video.mp4"


def test_generate_runs_in_a_thread_and_shows_the_video(tiny_model, media):
    image, audio, out = media
    pipe = FakePipeline(tiny_model, clips=2, steps=3, pause_at=(1, 1))
    panel = GeneratePanel(pipe, image=image, audio=audio, out=out)
    assert panel.steps.value == 4 and panel.max_frames.value == 25  # quick defaults for tiny
    panel.prompt.value = "a person talking"
    panel.steps.value = 3
    panel.seed.value = 7
    panel.size_class.value = "720"
    assert panel.shift.value == 11.0  # the size class's default shift
    panel.text_scale.value, panel.audio_scale.value = 4.5, 3.5
    panel.generate_button.click()
    assert pipe.reached.wait(JOIN)  # the click returned while the pipeline is still running
    assert panel.running and panel.generate_button.disabled and not panel.cancel_button.disabled
    pipe.gate.set()
    assert panel.wait(JOIN)
    ((args, kw),) = pipe.calls
    assert args == (str(image), str(audio))
    assert pipe.thread_names == ["wanstudio-generate"]
    assert kw["prompt"] == "a person talking" and kw["steps"] == 3 and kw["seed"] == 7
    assert kw["size_class"] == "720" and kw["shift"] == 11.0
    assert kw["text_scale"] == 4.5 and kw["audio_scale"] == 3.5 and kw["max_frames"] == 25
    assert kw["out"] == str(out) and kw["resume"] is False
    assert "audio2" not in kw and kw["scheduler"] == "euler"
    assert kw["negative_prompt"]  # Wan's default negative prompt is filled in
    assert (panel.clip_bar.value, panel.clip_bar.max) == (2, 2)
    assert (panel.step_bar.value, panel.step_bar.max) == (3, 3)
    assert "Done" in panel.status.value and panel.result.path == out
    (video,) = panel.video_box.children
    assert video.format == "mp4" and bytes(video.value) == out.read_bytes()
    assert not panel.generate_button.disabled and panel.cancel_button.disabled


def test_cancel_stops_at_the_next_step_and_keeps_finished_clips_for_resume(tiny_model, media):
    image, audio, out = media
    pipe = FakePipeline(tiny_model, clips=3, steps=4, pause_at=(2, 2))
    panel = GeneratePanel(pipe, image=image, audio=audio, out=out)
    panel.generate_button.click()
    assert pipe.reached.wait(JOIN)
    panel.cancel_button.click()
    assert "Cancelling" in panel.status.value
    pipe.gate.set()
    assert panel.wait(JOIN)
    assert isinstance(pipe.raised, GenerationCancelled)
    event = pipe.raised.event
    assert (event.kind, event.clip, event.step) == ("step", 2, 2)  # the very next step
    assert panel.finished_clips == 1
    assert "Cancelled in clip 2 of 3, after step 2 of 4" in panel.status.value
    assert f"{out}.work" in panel.status.value and panel.resume.value
    assert panel.video_box.children == ()
    assert not out.exists()
    # Generate again: resume is passed, and the run completes
    pipe.pause_at = None
    panel.generate_button.click()
    assert panel.wait(JOIN)
    assert pipe.calls[-1][1]["resume"] is True
    assert "Done" in panel.status.value and not panel.resume.value


def test_pipeline_errors_are_shown_readably(tiny_model, media):
    image, audio, out = media
    error = PipelineError("clip 1 of 2, step 2 of 3: the latents hold NaN/Inf. Try bf16.")
    panel = GeneratePanel(FakePipeline(tiny_model, error=error), image=image, audio=audio, out=out)
    panel.generate_button.click()
    assert panel.wait(JOIN)
    assert "PipelineError" in panel.status.value and "latents hold NaN/Inf" in panel.status.value
    assert "Traceback" not in panel.status.value and "Traceback" in panel.last_traceback
    assert panel.clip_bar.bar_style == "danger" and not panel.generate_button.disabled


def test_bad_inputs_are_refused_before_a_thread_starts(tiny_model, media):
    image, audio, out = media
    pipe = FakePipeline(tiny_model)
    panel = GeneratePanel(pipe, image=image, audio="", out=out)
    assert panel.generate() is False and not panel.running
    assert "no speech" in panel.status.value and pipe.calls == []
    panel = GeneratePanel(None, image=image, audio=audio, out=out)
    panel.generate_button.click()
    assert "no pipeline loaded yet" in panel.status.value


def test_two_speakers(tiny_model, media):
    image, audio, out = media
    pipe = FakePipeline(tiny_model)
    panel = GeneratePanel(pipe, image=image, audio=audio, out=out)
    assert panel.two_box.layout.display == "none"
    panel.speakers.value = 2
    assert panel.two_box.layout.display is None
    panel.audio2_path.value = str(audio)
    panel.speaker_mix.value = "add"
    panel.generate_button.click()
    assert panel.wait(JOIN)
    kw = pipe.calls[-1][1]
    assert kw["audio2"] == str(audio) and kw["speaker_mix"] == "add"
    # no boxes: the pipeline's default regions (the official left / right halves), drawn in the panel
    assert "bboxes" not in kw and "speaker_strengths" not in kw
    assert (
        panel.regions.boxes == ws.pipeline.default_speaker_boxes(96, 64) == ((2, 3, 45, 60), (50, 3, 93, 60))
    )
    panel.bboxes.value = "0,0,40,64; 50,0,96,64"
    panel.regions.strengths[1].value = 0.5
    panel.generate_button.click()
    assert panel.wait(JOIN)
    assert pipe.calls[-1][1]["bboxes"] == ((0, 0, 40, 64), (50, 0, 96, 64))
    assert pipe.calls[-1][1]["speaker_strengths"] == (1.0, 0.5)


def test_generate_panel_draws_the_speaker_regions_over_the_reference_frame(tiny_model, media, tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from wanstudio.media import VideoWriter

    image, audio, out = media  # a 96x64 picture of one colour (120, 90, 60)
    panel = GeneratePanel(FakePipeline(tiny_model), image=image, audio=audio, out=out)
    assert panel.regions.view.value == b""  # one speaker: nothing is read or drawn
    panel.speakers.value = 2

    def drawn() -> np.ndarray:
        png = Image.open(io.BytesIO(bytes(panel.regions.view.value)))
        return np.asarray(png.convert("RGB"), dtype=float)

    def at(pixels, x, y):  # a source pixel's colour in the drawing (320 px on the longer side)
        scale = pixels.shape[1] / 96
        return pixels[int((y + 0.5) * scale), int((x + 0.5) * scale)]

    pixels = drawn()
    assert pixels.shape[:2] == (213, 320)
    assert np.allclose(at(pixels, 20, 30), [169.5, 76.5, 60], atol=2)  # speaker 1: red tint
    assert np.allclose(at(pixels, 70, 30), [93, 99, 138.75], atol=2)  # speaker 2: blue tint
    assert np.allclose(at(pixels, 47, 30), [120, 90, 60], atol=2)  # between the default halves
    assert "default" in panel.regions.note.value
    panel.bboxes.value = "50,0,96,64; 0,0,40,64"  # speaker 1 on the right now
    pixels = drawn()
    assert np.allclose(at(pixels, 70, 30), [169.5, 76.5, 60], atol=2)
    assert np.allclose(at(pixels, 20, 30), [93, 99, 138.75], atol=2)
    panel.bboxes.value = "0,0,60,64; 40,0,96,64"
    assert panel.regions.view.value == b"" and "overlap" in panel.regions.note.value
    # a video to dub: its frame 0 is the picture
    video = tmp_path / "scene.mp4"
    frames = np.zeros((3, 48, 80, 3), np.uint8)
    frames[0], frames[1:] = (40, 160, 200), (250, 250, 250)
    with VideoWriter(video) as writer:
        writer.append(frames)
    panel.bboxes.value = ""
    panel.image_path.value = str(video)
    pixels = drawn()
    assert pixels.shape[:2] == (192, 320) and "80x48" in panel.regions.note.value
    assert np.allclose(at(pixels, 40 * 96 / 80, 24 * 96 / 80), [40, 160, 200], atol=4)


def test_parse_bboxes():
    assert parse_bboxes("") is None
    assert parse_bboxes("1,2,3,4;5 6 7 8") == ((1, 2, 3, 4), (5, 6, 7, 8))
    with pytest.raises(PipelineError, match="two boxes"):
        parse_bboxes("1,2,3,4")
    with pytest.raises(PipelineError, match="four numbers"):
        parse_bboxes("1,2,3;4,5,6,7")


def test_uploads_are_saved_and_used(tiny_model, media):
    image, audio, out = media
    pipe = FakePipeline(tiny_model)
    panel = GeneratePanel(pipe, image="", audio=audio, out=out)
    panel.image_upload.value = (
        {
            "name": "me.png",
            "type": "image/png",
            "size": 4,
            "content": memoryview(image.read_bytes()),
            "last_modified": datetime.datetime.now(),
        },
    )
    panel.generate_button.click()
    assert panel.wait(JOIN)
    used = Path(pipe.calls[-1][0][0])
    assert used.name == "me.png" and used.read_bytes() == image.read_bytes()
    assert panel.image_path.value == str(used)


def test_generate_panel_takes_the_pipeline_from_a_load_panel(tiny_model, media):
    image, audio, out = media
    load = LoadPanel(loader=FakeLoader(tiny_model), find=False, device="cpu")
    gen = GeneratePanel(load, image=image, audio=audio, out=out)
    assert gen.pipeline is None
    load.load()
    assert gen.pipeline is load.pipeline


def test_generate_uses_the_pipeline_own_size_unless_unticked(tiny_model, media):
    # the tiny preset's own 64x64, not a 480p bucket (~600x600: minutes on a CPU instead of seconds)
    image, audio, out = media
    pipe = FakePipeline(tiny_model)
    pipe.default_size = (64, 64)
    panel = GeneratePanel(pipe, image=image, audio=audio, out=out)
    assert panel.own_size.value and panel.own_size.layout.display is None
    assert "64x64" in panel.own_size.description and panel.size_class.disabled
    panel.generate_button.click()
    assert panel.wait(JOIN) and panel.last_error is None, panel.last_traceback
    assert "size_class" not in pipe.calls[-1][1]  # the pipeline picks its own size
    panel.own_size.value = False
    assert not panel.size_class.disabled
    panel.size_class.value = "720"
    panel.generate_button.click()
    assert panel.wait(JOIN)
    assert pipe.calls[-1][1]["size_class"] == "720"
    # a pipeline without a size of its own: no checkbox, the size class is used
    plain = GeneratePanel(FakePipeline(tiny_model), image=image, audio=audio, out=out)
    assert plain.own_size.layout.display == "none" and not plain.size_class.disabled
    # a LoadPanel's pipeline arrives later: the checkbox appears when it is loaded
    load = LoadPanel(loader=FakeLoader(tiny_model), find=False, device="cpu")
    later = GeneratePanel(load, image=image, audio=audio, out=out)
    assert later.own_size.layout.display == "none"
    load.loader = lambda settings: LoadResult(pipe, settings, 0.1, None, "")
    load.load()
    assert later.own_size.layout.display is None and later.size_class.disabled


def test_error_html_escapes_and_names_the_type():
    text = error_html(ValueError("<b>bad</b>\nsecond line"))
    assert "&lt;b&gt;bad&lt;/b&gt;<br>second line" in text and "ValueError" in text
    assert "panel.last_traceback" in text  # not a wanstudio error: point at the traceback


# --- LayoutPanel -----------------------------------------------------------------------------------
class FakeRow(dict):
    pass


class FakeLayoutReport:
    def __init__(self, rows):
        self.rows = rows
        self.filters: list[dict] = []

    def filter(self, **kw):
        self.filters.append(kw)
        rows = [r for r in self.rows if not kw.get("only_violations") or r["status"] == "violation"]
        return FakeLayoutReport([r for r in rows if kw.get("module", "") in r["module"]])

    def violations(self):
        return [r for r in self.rows if r["status"] == "violation"]

    def summary(self):
        return f"{len(self.rows)} rows"

    def _repr_html_(self):
        return "<table>" + "".join(f"<tr><td>{r['module']}</td></tr>" for r in self.rows) + "</table>"


def test_layout_panel_filters_and_strict_mode(tiny_model):
    rows = [
        FakeRow(module="blocks.0.self_attn", role="kernel operand", kernel="torch.sdpa", status="ok"),
        FakeRow(
            module="blocks.1.ffn.0", role="kernel operand", kernel="torch._scaled_mm", status="violation"
        ),
        FakeRow(module="blocks.1.ffn.0", role="parameter", kernel="", status="n/a"),
    ]
    calls = []

    def inspector(model, inputs, strict=False):
        calls.append((model, sorted(inputs), strict))
        if strict:
            raise LayoutError(
                "blocks.1.ffn.0: kernel torch._scaled_mm, operand 'w' violates its layout contract."
            )
        return FakeLayoutReport(rows)

    panel = LayoutPanel(tiny_model, inspector=inspector)
    report = panel.inspect_button.click() or panel.report
    assert calls[0][0] is tiny_model and calls[0][2] is False and "audio" in calls[0][1]
    assert values(panel.kernel) == ["", "torch._scaled_mm", "torch.sdpa"]
    assert values(panel.role) == ["", "kernel operand", "parameter"]
    assert "3 of 3 rows shown; 1 violation" in panel.counts.value
    panel.only_violations.value = True
    assert report.filters[-1] == {"only_violations": True}
    assert "1 of 3 rows" in panel.counts.value and "blocks.1.ffn.0" in panel.table.value
    panel.module.value = "self_attn"
    panel.kernel.value = "torch.sdpa"
    panel.role.value = "kernel operand"
    assert report.filters[-1] == {
        "only_violations": True,
        "module": "self_attn",
        "kernel": "torch.sdpa",
        "role": "kernel operand",
    }
    panel.strict.value = True  # toggling re-inspects in strict mode
    assert calls[-1][2] is True
    assert "Strict mode stopped the forward" in panel.status.value
    assert "blocks.1.ffn.0" in panel.status.value and panel.report is None
    assert "Block swap is off" in panel.timeline_note.value


def test_layout_panel_without_a_model_says_so():
    panel = LayoutPanel(None)
    assert panel.inspect() is None
    assert "no model to inspect yet" in panel.status.value


# --- the real parts, tiny -----------------------------------------------------------------------------
def test_layout_panel_on_the_real_inspector_with_a_simulated_block_swap():
    torch.manual_seed(0)
    model = ws.WanModel(ws.WanConfig.preset("tiny-infinitetalk")).eval().requires_grad_(False)
    studio.simulated_block_swap(model, 2, prefetch=1)
    panel = LayoutPanel(model)
    report = panel.inspect()
    assert report is not None and len(report.rows) > 50
    assert "torch.sdpa" in values(panel.kernel)
    assert panel.timeline.layout.display is None and bytes(panel.timeline.value[:4]) == b"\x89PNG"
    assert "block copies" in panel.timeline_note.value and "simulated" in panel.timeline_note.value
    panel.only_non_contiguous.value = True
    assert len(studio.report_rows(report.filter(only_non_contiguous=True))) < len(report.rows)


@pytest.mark.slow
def test_misaligned_fp8_weight_strict_mode_names_the_layer_and_the_copy_is_counted():
    torch.manual_seed(0)
    model = ws.WanModel(ws.WanConfig.preset("tiny-infinitetalk")).eval().requires_grad_(False)
    ws_quant = pytest.importorskip("wanstudio.quant")
    ws_quant.quantize(model, QuantMode.FP8_E4M3FN_FAST)
    inputs = studio.example_inputs(model.config)
    layer = studio.fast_linear_layers(model, inputs)[0]
    assert studio.strict_forward_error(model, inputs) is None
    moved = studio.misalign(model, layer)
    assert moved.data_ptr() % 16 and moved.storage_offset() == 1
    error = studio.strict_forward_error(model, inputs)
    assert isinstance(error, LayoutError) and layer in str(error)
    studio.realign(model, layer)
    cost = studio.hidden_copy_cost(model, inputs, layer, repeats=1)
    assert cost.copies_per_forward >= 1 and cost.bytes_per_forward > 0 and layer in cost.copied[0]
    assert studio.strict_forward_error(model, inputs) is None  # left aligned
    assert "hidden cop" in str(cost)


@pytest.mark.slow
def test_compare_quant_modes(tiny_model):
    modes = ["disabled", "fp8_e4m3fn_scaled", "fp4_scaled"]
    cmp = studio.compare_quant_modes(tiny_model, modes)
    assert [r.mode.value for r in cmp.rows] == modes
    base, fp8, fp4 = cmp.rows
    assert (
        base.ratio == 1.0 and math.isinf(base.sqnr_db) and base.linear_bytes == fp8.linear_bytes / fp8.ratio
    )
    assert 0.2 < fp8.ratio < 0.3 and fp8.sqnr_db > 25  # fp32 -> fp8 (+ scales)
    assert fp4.ratio < fp8.ratio and 12 < fp4.sqnr_db < fp8.sqnr_db
    assert fp8.worst_layer.startswith("blocks.") and "dequantize" in fp8.paths
    assert "| fp4_scaled |" in cmp.to_markdown() and "<table" in cmp._repr_html_()
    assert quant_comparison_plot(cmp).data[:4] == b"\x89PNG"  # drawn by the widgets layer
    assert not quantized_layers(tiny_model)  # measured, not changed


def test_load_pipeline_tiny_measures_then_quantizes(monkeypatch, tiny_model):
    import copy

    class Tiny:
        @classmethod
        def tiny(cls, seed, device, dtype):
            pipe = FakePipeline(copy.deepcopy(tiny_model))
            pipe.tiny_args = (seed, device, dtype)
            return pipe

    monkeypatch.setattr(studio.session, "InfiniteTalkPipeline", Tiny)
    result = studio.load_pipeline(LoadSettings(quantization="fp8_e4m3fn_fast", seed=3))
    assert result.pipeline.tiny_args == (3, "cpu", torch.float32)
    assert result.report.mode is QuantMode.FP8_E4M3FN_FAST and result.report.model_sqnr_db > 20
    assert set(studio.quant_paths(result.model)) == {"scaled_mm"}
    assert result.model.modes == result.settings.modes  # configured by wanstudio.modes.apply_modes
    summary = studio.summarize(result.pipeline, result.settings, result.seconds)
    assert "float8_e4m3fn" in summary.to_text() and "scaled_mm x" in summary.to_text()


needs_pipeline = pytest.mark.skipif(
    not (importlib.util.find_spec("transformers") and importlib.util.find_spec("diffusers")),
    reason="the tiny pipeline's encoders need transformers and diffusers",
)


@needs_pipeline
def test_load_panel_with_the_real_loader_on_the_tiny_preset():
    panel = LoadPanel(find=False, device="cpu")
    panel.quantization.value = "fp8_e4m3fn_scaled"
    panel.load_button.click()
    assert panel.last_error is None, panel.last_traceback
    assert type(panel.pipeline).__name__ == "InfiniteTalkPipeline"
    assert "float8_e4m3fn" in panel.summary_html.value and "dequantize x" in panel.summary_html.value
    assert "SQNR" in panel.report_html.value and "blocks.0." in panel.report_html.value


@needs_pipeline
def test_generate_panel_cancel_and_resume_with_the_real_tiny_pipeline(tmp_path):
    pipe = studio.load_pipeline(LoadSettings()).pipeline
    out = tmp_path / "talk.mp4"
    panel = GeneratePanel(pipe, out=out)  # the shipped portrait and speech
    panel.steps.value, panel.max_frames.value = 1, 25  # two clips of 17 frames
    on_progress = panel._on_progress

    def cancel_after_clip_1(event):
        on_progress(event)
        if event.kind == "clip" and event.clip == 1:
            panel.cancel()

    panel._on_progress = cancel_after_clip_1
    panel.generate_button.click()
    assert panel.wait(300)
    assert isinstance(panel.last_error, GenerationCancelled), panel.last_traceback
    assert panel.finished_clips == 1 and panel.resume.value and not out.exists()
    assert (tmp_path / "talk.mp4.work" / "clip_0000.pt").is_file()
    panel._on_progress = on_progress
    panel.generate_button.click()
    assert panel.wait(300)
    assert panel.last_error is None, panel.last_traceback
    assert panel.result.resumed_clips == 1 and panel.result.num_frames == 25
    (video,) = panel.video_box.children
    assert bytes(video.value) == out.read_bytes() and len(video.value) > 1000


# --- studio helpers --------------------------------------------------------------------------------------
def test_load_settings_validation():
    with pytest.raises(ConfigError, match="needs|loads real weights"):
        LoadSettings(preset="infinitetalk-14b")
    with pytest.raises(ws.BlockSwapError, match="blocks_to_swap=3 is more than the model has"):
        LoadSettings(blocks_to_swap=3)  # tiny has 2 blocks
    with pytest.raises(ws.UnknownOptionError, match="Did you mean"):
        LoadSettings(quantization="fp8_e4m3_scaled")
    with pytest.raises(ws.BlockSwapError, match="blocks_to_swap must be an integer >= 0"):
        LoadSettings(blocks_to_swap=True)  # checked once, by offload.check_blocks_to_swap
    assert LoadSettings(precision="bf16").dtype == torch.bfloat16
    assert LoadSettings(attention="sageattn").problems()[0].startswith("attention 'sageattn'")


def test_load_settings_hold_runtime_modes():
    s = LoadSettings(quantization="fp8_e4m3fn", blocks_to_swap=2, prefetch=0)
    assert s.modes == RuntimeModes(quantization="fp8_e4m3fn", precision="fp32", blocks_to_swap=2, prefetch=0)
    assert (s.quantization, s.blocks_to_swap, s.prefetch) == (QuantMode.FP8_E4M3FN, 2, 0)
    assert s.precision is BasePrecision.FP32 and s.attention is AttentionMode.SDPA  # defaults
    given = RuntimeModes(precision="bf16", attention="sageattn")
    s = LoadSettings(modes=given, quantization="fp4_scaled")  # a keyword wins over modes
    assert s.modes == given.replace(quantization="fp4_scaled") and s.dtype == torch.bfloat16
    with pytest.raises(AttributeError):
        s.quantization = "disabled"  # read-only: change modes, make new settings
    assert (
        studio.default_settings(device="cpu", attention="sageattn").modes.attention is AttentionMode.SAGEATTN
    )


def test_load_pipeline_real_weights_go_through_from_files_and_apply_modes(monkeypatch, tiny_model, tmp_path):
    import copy

    calls = []

    class Real:
        @classmethod
        def from_files(cls, **kw):
            calls.append(kw)  # like the real one: the modes are applied while it loads
            return FakePipeline(ws.apply_modes(copy.deepcopy(tiny_model), kw["modes"]))

    monkeypatch.setattr(studio.session, "InfiniteTalkPipeline", Real)
    weights = WeightPaths(dit="d", vae="v", text_encoder="t", clip="c", wav2vec="w")
    settings = LoadSettings(
        preset="infinitetalk-14b", weights=weights, quantization="fp8_e4m3fn_scaled", attention="sdpa"
    )
    result = studio.load_pipeline(settings)
    (kw,) = calls
    assert kw["dit"] == ["d"] and kw["config"] == "infinitetalk-14b" and kw["modes"] == settings.modes
    assert kw["modes"].quantization is QuantMode.FP8_E4M3FN_SCALED and kw["modes"].dtype == torch.float32
    assert set(studio.quant_paths(result.model)) == {"dequantize"}
    assert result.report is None and "quantized while they load" in result.report_note


def _write(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_weight_paths_from_a_toml_file(tmp_path):
    for rel in ("wan/index.json", "it.safetensors", "vae.pth", "t5.pth", "clip.pth"):
        _write(tmp_path / rel)
    (tmp_path / "w2v").mkdir()
    cfg = tmp_path / "wanstudio.toml"
    cfg.write_text(
        '[weights]\ndit = ["wan/index.json"]\ninfinitetalk = "it.safetensors"\nvae = "vae.pth"\n'
        'text_encoder = "t5.pth"\nclip = "clip.pth"\nwav2vec = "w2v"\n'
    )
    w = WeightPaths.from_file(cfg)
    assert w.dit == (str(tmp_path / "wan/index.json"),) and w.wav2vec == str(tmp_path / "w2v")
    assert w.missing() == [] and w.source == str(cfg)
    assert w.as_kwargs()["dit"] == [str(tmp_path / "wan/index.json")]
    assert studio.find_weights({}, search=[tmp_path / "nothing.toml", cfg]) == w
    assert studio.find_weights({studio.WEIGHTS_ENV: str(cfg)}, search=[]) == w
    assert studio.find_weights({studio.WEIGHTS_ENV: str(tmp_path)}, search=[]) == w  # folder with a config
    assert "Real weights from" in studio.describe_weights(w)


def test_weight_paths_json_errors(tmp_path):
    cfg = tmp_path / "w.json"
    cfg.write_text(
        json.dumps({"weights": {"dit": "a", "vae": "b", "clip": "c", "wav2vec": "d", "text": "e"}})
    )
    with pytest.raises(ConfigError, match="unknown entries \\['text'\\]"):
        WeightPaths.from_file(cfg)
    cfg.write_text(json.dumps({"dit": "a", "vae": "b"}))
    with pytest.raises(ConfigError, match="no path for text_encoder, clip, wav2vec"):
        WeightPaths.from_file(cfg)
    with pytest.raises(ConfigError, match="neither a folder nor a file"):
        studio.find_weights({studio.WEIGHTS_ENV: str(tmp_path / "nope")})


def test_weight_paths_found_in_an_official_download_folder(tmp_path):
    wan = tmp_path / "Wan2.1-I2V-14B-480P"
    _write(wan / "diffusion_pytorch_model.safetensors.index.json")
    _write(wan / "Wan2.1_VAE.pth")
    _write(wan / "models_t5_umt5-xxl-enc-bf16.pth")
    _write(wan / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    _write(wan / "google" / "umt5-xxl" / "tokenizer.json")
    _write(tmp_path / "InfiniteTalk" / "single" / "infinitetalk.safetensors")
    _write(tmp_path / "InfiniteTalk" / "multi" / "infinitetalk.safetensors")
    _write(tmp_path / "chinese-wav2vec2-base" / "config.json")
    w = studio.find_weights({studio.WEIGHTS_ENV: str(tmp_path)}, search=[])
    assert w.dit == (str(wan / "diffusion_pytorch_model.safetensors.index.json"),)
    assert w.infinitetalk == str(tmp_path / "InfiniteTalk" / "single" / "infinitetalk.safetensors")
    assert w.tokenizer == str(wan / "google" / "umt5-xxl") and w.wav2vec == str(
        tmp_path / "chinese-wav2vec2-base"
    )
    assert w.missing() == []


def test_weight_folder_without_the_files_says_what_is_missing(tmp_path):
    _write(tmp_path / "Wan2.1_VAE.pth")
    with pytest.raises(ConfigError, match="cannot find dit .*wanstudio.toml"):
        WeightPaths.from_folder(tmp_path)


def test_no_weights_means_tiny(tmp_path):
    assert studio.find_weights({}, search=[tmp_path / "none.toml"]) is None
    assert "tiny-infinitetalk" in studio.describe_weights(None)


def test_required_weights_say_where_they_were_looked_for(tmp_path, monkeypatch):
    searched = [tmp_path / "a" / "wanstudio.toml", tmp_path / "b" / "wanstudio.json"]
    with pytest.raises(ConfigError) as info:
        studio.find_weights({}, search=searched, required=True)
    message = str(info.value)
    assert "$WANSTUDIO_WEIGHTS is not set" in message
    assert str(searched[0]) in message and str(searched[1]) in message
    assert "export WANSTUDIO_WEIGHTS=" in message and "README.md, section 'Real weights'" in message
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="config" + "/wanstudio/wanstudio.toml"):
        studio.find_weights({}, required=True)  # the default search path is named too
    cfg = tmp_path / "b" / "wanstudio.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({"weights": dict(dit="d", vae="v", text_encoder="t", clip="c", wav2vec="w")}))
    assert studio.find_weights({}, search=searched, required=True).vae == str(tmp_path / "b" / "v")


def test_readme_real_weights_snippet_asks_for_required_weights():
    readme = (ROOT / "README.md").read_text()
    assert "studio.find_weights(required=True).as_kwargs()" in readme
    assert "studio.find_weights().as_kwargs()" not in readme  # None.as_kwargs() without weights


def test_studio_imports_nothing_above_it_nor_optional_packages():
    code = (
        "import sys, wanstudio.studio; "
        "print(sorted(m for m in sys.modules if m.startswith('wanstudio.widgets') "
        "or m.split('.')[0] in ('ipywidgets', 'matplotlib', 'IPython')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
    for path in (ROOT / "wanstudio" / "studio").glob("*.py"):  # plain imports, none upward
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                assert "widgets" not in name and name != "importlib", (path.name, name)


@pytest.mark.parametrize("preset", ["tiny-infinitetalk", "tiny-t2v"])
def test_example_inputs_run_the_model(preset):
    torch.manual_seed(0)
    model = ws.WanModel(ws.WanConfig.preset(preset)).eval()
    out = studio.forward(model, studio.example_inputs(model.config))
    assert out.shape == (1, 16, 2, 4, 4) and torch.isfinite(out).all()


def test_truncated_shares_weights(tiny_model):
    view = studio.truncated(tiny_model, 1)
    assert len(view.blocks) == 1 and len(tiny_model.blocks) == 2 and view.config.num_layers == 1
    assert view.blocks[0].ffn[0].weight is tiny_model.blocks[0].ffn[0].weight
    assert studio.forward(view, studio.example_inputs(view.config)).shape == (1, 16, 2, 4, 4)


def test_module_memory_counts_bytes_per_dtype():
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2).to(torch.bfloat16))
    mem = studio.module_memory("m", m)
    assert mem.parameters == 4 * 8 + 8 + 8 * 2 + 2
    assert mem.bytes_by_dtype == {"float32": 40 * 4, "bfloat16": 18 * 2}
    assert mem.bytes_by_device == {"cpu": 40 * 4 + 18 * 2}


def test_swap_timeline_spans():
    from types import SimpleNamespace

    entry = SimpleNamespace(
        unit="blocks.1", copy_start=0.0, copy_end=2.0, compute_ready=1.0, compute_start=2.0, compute_end=3.0
    )
    spans = studio.swap_timeline(SimpleNamespace(timeline=(entry,)))
    assert [(s.kind, s.start, s.end) for s in spans] == [
        ("copy", 0.0, 2.0),
        ("wait", 1.0, 2.0),
        ("compute", 2.0, 3.0),
    ]
    assert studio.swap_timeline(None) == []


def test_quant_availability_on_the_cpu():
    status = studio.quant_availability("cpu")
    assert set(status) == set(QuantMode)
    assert status[QuantMode.FP8_E4M3FN_FAST].available  # _scaled_mm runs on the CPU
    assert "_scaled_mm" in status[QuantMode.FP8_E4M3FN_FAST].kernel


def test_output_path_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(studio.OUTPUT_ENV, str(tmp_path / "videos"))
    assert studio.output_path("x.mp4") == tmp_path / "videos" / "x.mp4"
    assert (tmp_path / "videos").is_dir()


def test_generate_panel_preset_sets_the_sampling_controls(tiny_model):
    from wanstudio.options import GenerationPreset

    gen = GeneratePanel(FakePipeline(tiny_model), image="i.png", audio="a.wav")
    gen.preset.value = GenerationPreset.DISTILL_4STEP.value
    want = GenerationPreset.DISTILL_4STEP.settings
    assert (gen.scheduler.value, gen.steps.value, gen.shift.value) == (want.scheduler.value, 4, want.shift)
    assert (gen.text_scale.value, gen.audio_scale.value) == (1.0, 2.0)
    gen.steps.value = 6  # still editable; the request carries what the controls show
    assert gen.read_request().steps == 6 and gen.read_request().scheduler == "euler_distill"
    gen.preset.value = GenerationPreset.STANDARD.value
    assert (gen.steps.value, gen.text_scale.value, gen.audio_scale.value) == (40, 5.0, 4.0)


def test_load_panel_lora_box_becomes_the_settings_loras(tmp_path):
    from wanstudio.lora import LoRA
    from wanstudio.widgets.load_panel import parse_loras

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b""), b.write_bytes(b"")
    assert parse_loras(f"{a}\n\n  {b}:0.5 \n") == (LoRA(a), LoRA(b, 0.5))
    assert LoadSettings(loras=parse_loras(f"{a}:0.8")).modes.loras == (LoRA(a, 0.8),)
    with pytest.raises(ws.LoraError, match="no such file"):
        parse_loras(str(tmp_path / "missing.safetensors"))


# --- checkpoint storage in the summary; GGUF / quanto discovery ---------------------------------------
def test_load_panel_shows_the_storage_mix_of_a_loaded_checkpoint(tiny_model):
    import copy

    from wanstudio.checkpoints import CheckpointInfo
    from wanstudio.quant import QuantMix

    model = copy.copy(tiny_model)  # its own attributes; the shared fixture stays as it was
    model.checkpoint_info = CheckpointInfo(
        files=[Path("base_fp8_e5m2_scaled_KJ.safetensors"), Path("talk_fp8_e4m3fn_scaled_KJ.safetensors")],
        formats=["comfy-prefixed", "comfy-prefixed"],
        storage={"fp8_e4m3fn_scaled": 80, "fp8_e5m2_scaled": 400, "bfloat16": 2},
        bytes=3 * 2**30,
    )
    model.quantization = QuantMix(((QuantMode.FP8_E5M2_SCALED, 400), (QuantMode.FP8_E4M3FN_SCALED, 80)))
    panel = LoadPanel(loader=FakeLoader(model), find=False, device="cpu")
    panel.load_button.click()
    assert panel.last_error is None, panel.last_traceback
    rows = {what: (mode, detail) for what, mode, detail in panel.summary.kernel_paths}
    assert rows["checkpoint"] == (
        "comfy-prefixed",
        "3.00 GiB in base_fp8_e5m2_scaled_KJ.safetensors (comfy-prefixed), "
        "talk_fp8_e4m3fn_scaled_KJ.safetensors (comfy-prefixed)",
    )
    assert rows["weights stored as"] == (
        "mixed",
        "fp8_e5m2_scaled x 400, fp8_e4m3fn_scaled x 80, bfloat16 x 2",
    )
    mode, detail = rows["quantization"]
    assert mode == "disabled: mixed, as stored"
    assert detail.startswith("fp8_e5m2_scaled x 400, fp8_e4m3fn_scaled x 80 (")
    html = panel.summary_html.value
    assert "weights stored as" in html and "fp8_e5m2_scaled x 400, fp8_e4m3fn_scaled x 80" in html
    assert studio.session.checkpoint_rows(tiny_model) == []  # random weights: no files to show


def test_load_panel_dit_fields_name_the_accepted_formats():
    panel = LoadPanel(find=False, device="cpu")
    for text in (panel.paths["dit"].placeholder, panel.paths["dit"].tooltip):
        for fmt in ("safetensors", "bf16", "fp8", "scaled fp8", "GGUF", "quanto"):
            assert fmt in text, (fmt, text)
    assert ".gguf" in panel.paths["infinitetalk"].placeholder


def _encoders(folder: Path) -> None:
    _write(folder / "Wan2.1_VAE.pth")
    _write(folder / "models_t5_umt5-xxl-enc-bf16.pth")
    _write(folder / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    _write(folder / "chinese-wav2vec2-base" / "config.json")


def test_weight_discovery_finds_gguf_and_quanto_dits(tmp_path):
    gguf = tmp_path / "gguf"
    _encoders(gguf)
    dit = _write(gguf / "unet" / "wan2.1-i2v-14b-480p-Q8_0.gguf")
    talk = _write(gguf / "unet" / "Wan2_1-InfiniteTalk_Single_Q8.gguf")
    w = studio.find_weights({studio.WEIGHTS_ENV: str(gguf)}, search=[])
    assert w.dit == (str(dit),) and w.infinitetalk == str(talk) and w.missing() == []

    quanto = tmp_path / "quanto"  # the official repo's quant_models: the whole DiT, its map beside it
    _encoders(quanto)
    _write(quanto / "InfiniteTalk" / "single" / "infinitetalk.safetensors")
    dit = _write(quanto / "InfiniteTalk" / "quant_models" / "infinitetalk_single_int8.safetensors")
    _write(quanto / "InfiniteTalk" / "quant_models" / "infinitetalk_single_int8.json")
    w = studio.find_weights({studio.WEIGHTS_ENV: str(quanto)}, search=[])
    assert w.dit == (str(dit),) and w.infinitetalk is None  # the quanto file holds the audio layers

    _write(gguf / "Wan2.1-I2V-14B-480P" / "diffusion_pytorch_model.safetensors.index.json")
    w = studio.find_weights({studio.WEIGHTS_ENV: str(gguf)}, search=[])
    assert w.dit[0].endswith("diffusion_pytorch_model.safetensors.index.json")  # official shards first
