"""GeneratePanel: image (or a video to dub) + speech in, talking video out, without blocking
the kernel.

Generate runs the pipeline in a worker thread; the pipeline's progress callback moves two
bars (clips, steps) and is also where Cancel takes effect: after Cancel, the next progress
event raises :class:`GenerationCancelled` inside the pipeline, which stops at that step with
every finished clip saved in the work folder (``<out>.work``), so Generate with *resume*
ticked continues from the next clip.
"""

from __future__ import annotations

import html
import logging
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import ipywidgets as widgets

from .. import studio
from ..errors import PipelineError
from ..options import CacheMode, GenerationPreset, Scheduler, SizeClass, SpeakerMix, parse_option
from ..pipeline.infinitetalk import DEFAULT_SHIFT  # the pipeline's own default shift per size
from . import choices
from .common import (
    STYLE,
    WIDE,
    error_html,
    fit_layout,
    format_traceback,
    heading,
    inline,
    slider_layout,
    status_html,
)
from .generate_request import GenerateRequest, GenerationCancelled, parse_bboxes
from .media_view import save_upload, video_widget
from .speaker_regions import SpeakerRegions

log = logging.getLogger(__name__)


def _resolve_pipeline(source):
    """A pipeline, or something holding one (a LoadPanel or LoadResult: ``.pipeline``)."""
    if source is not None and not callable(source) and hasattr(source, "pipeline"):
        return source.pipeline
    return source


class GeneratePanel(widgets.VBox):
    """Image or source video and speech (upload or path; one or two speakers, the speaker
    regions drawn over the reference frame), prompt, sampling settings; Generate in a worker
    thread with clip / step progress, Cancel, inline video, readable errors.

    Args:
        pipeline: an ``InfiniteTalkPipeline``, or a LoadPanel / LoadResult holding one
            (looked up when Generate is clicked, so the panel can be built before loading).
        image, audio: initial paths (default: the shipped portrait and speech clip); the image
            path may name a video (.mp4, .mov, ...): the run dubs it.
        out: the mp4 to write (default ``$WANSTUDIO_OUTPUT/infinitetalk.mp4``).
        steps, max_frames: initial values (the tiny pipeline starts with quick ones).
    """

    def __init__(
        self,
        pipeline=None,
        *,
        image: str | Path | None = None,
        audio: str | Path | None = None,
        out: str | Path | None = None,
        steps: int | None = None,
        max_frames: int | None = None,
    ):
        self.source = pipeline
        self.result = None
        self.last_error: BaseException | None = None
        self.last_traceback = ""
        self.last_event = None
        self.request: GenerateRequest | None = None
        self.finished_clips = 0
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self._listeners: list[Callable] = []

        if image is None or audio is None:
            try:
                default_image, default_audio = studio.sample_media()
            except Exception:  # media not in this build: the fields start empty
                default_image = default_audio = ""
            image = image if image is not None else default_image
            audio = audio if audio is not None else default_audio
        tiny = str(getattr(_resolve_pipeline(pipeline), "identity", "")).startswith("tiny")
        steps = steps if steps is not None else (4 if tiny else 40)
        max_frames = max_frames if max_frames is not None else (25 if tiny else 1000)

        # --- inputs
        self.image_path = widgets.Text(
            value=str(image),
            description="image or video",
            tooltip="a portrait, or a video to dub (its frames follow the new speech)",
            style=STYLE,
            layout=widgets.Layout(width="70%"),
        )
        self.image_upload = widgets.FileUpload(accept="image/*,video/*", multiple=False, description="upload")
        self.audio_path = widgets.Text(
            value=str(audio),
            description="speech (speaker 1)",
            style=STYLE,
            layout=widgets.Layout(width="70%"),
        )
        self.audio_upload = widgets.FileUpload(accept="audio/*", multiple=False, description="upload")
        self.speakers = inline(
            widgets.ToggleButtons(
                options=[("one speaker", 1), ("two speakers", 2)],
                value=1,
                description="speakers",
                style=STYLE,
                layout=fit_layout(),
            )
        )
        self.audio2_path = widgets.Text(
            description="speech (speaker 2)", style=STYLE, layout=widgets.Layout(width="70%")
        )
        self.audio2_upload = widgets.FileUpload(accept="audio/*", multiple=False, description="upload")
        self.speaker_mix = widgets.Dropdown(
            options=choices.speaker_mix_choices(),
            description="speaker mix",
            style=STYLE,
            layout=widgets.Layout(width="70%"),
        )
        self.bboxes = widgets.Text(
            description="speaker boxes",
            style=STYLE,
            layout=widgets.Layout(width="70%"),
            placeholder="x0,y0,x1,y1; x0,y0,x1,y1 (empty: left half, right half)",
            continuous_update=False,
        )
        self.regions = SpeakerRegions()  # the reference frame with the two regions tinted
        self.two_box = widgets.VBox(
            [
                widgets.HBox([self.audio2_path, self.audio2_upload]),
                self.speaker_mix,
                self.bboxes,
                self.regions,
            ]
        )
        # --- text and sampling
        self.prompt = widgets.Textarea(
            description="prompt",
            style=STYLE,
            layout=WIDE,
            placeholder="A person talking to the camera, natural expressions.",
        )
        self.negative_prompt = widgets.Textarea(
            value=_default_negative(), description="negative prompt", style=STYLE, layout=WIDE
        )
        self.size_class = widgets.Dropdown(
            options=choices.size_class_choices(),
            value=SizeClass.P480.value,
            description="size class",
            style=STYLE,
        )
        # a pipeline with a size of its own (the tiny preset: 64x64) uses it unless unticked; a
        # 480p bucket on the tiny preset is a ~600x600 video: minutes on a CPU instead of seconds
        self.own_size = widgets.Checkbox(
            value=True,
            description="the pipeline's own size",
            indent=True,
            style=STYLE,
            layout=fit_layout(display="none"),
        )
        self.preset = widgets.Dropdown(
            options=choices.choices(GenerationPreset),
            value=GenerationPreset.STANDARD.value,
            description="preset",
            style=STYLE,
            tooltip="sets sampler, steps, shift and guidance; each stays editable",
        )
        self.scheduler = widgets.Dropdown(
            options=choices.scheduler_choices(),
            value=Scheduler.EULER.value,
            description="sampler",
            style=STYLE,
        )
        self.steps = widgets.IntSlider(
            value=steps, min=1, max=100, description="steps", style=STYLE, layout=slider_layout()
        )
        self.shift = widgets.BoundedFloatText(
            value=DEFAULT_SHIFT[SizeClass.P480],
            min=0.01,
            max=100.0,
            step=0.5,
            description="shift",
            style=STYLE,
        )
        self.text_scale = widgets.FloatSlider(
            value=5.0,
            min=1.0,
            max=15.0,
            step=0.5,
            description="text guidance",
            style=STYLE,
            layout=slider_layout(),
        )
        self.audio_scale = widgets.FloatSlider(
            value=4.0,
            min=1.0,
            max=15.0,
            step=0.5,
            description="audio guidance",
            style=STYLE,
            layout=slider_layout(),
        )
        self.cache = widgets.Dropdown(
            options=choices.choices(CacheMode),
            value=CacheMode.NONE.value,
            description="step cache",
            style=STYLE,
            tooltip="reuse the blocks' output on steps whose input barely changed (40-step runs)",
        )
        self.seed = widgets.BoundedIntText(value=42, min=0, max=2**31 - 1, description="seed", style=STYLE)
        self.max_frames = widgets.BoundedIntText(
            value=max_frames, min=1, max=10**7, description="max frames", style=STYLE
        )
        out = out if out is not None else studio.output_path("infinitetalk.mp4")
        self.out = widgets.Text(
            value=str(out), description="output mp4", style=STYLE, layout=widgets.Layout(width="70%")
        )
        self.resume = widgets.Checkbox(
            value=False,
            description="resume (continue the run in <out>.work)",
            indent=True,
            style=STYLE,
            layout=fit_layout(),
        )
        self.strict = widgets.Checkbox(
            value=False,
            description="strict layout (raise before a bad launch)",
            indent=True,
            style=STYLE,
            layout=fit_layout(),
        )
        # --- actions and results
        self.generate_button = widgets.Button(description="Generate", button_style="primary", icon="play")
        self.cancel_button = widgets.Button(
            description="Cancel", button_style="warning", icon="stop", disabled=True
        )
        self.clip_bar = widgets.IntProgress(
            value=0, min=0, max=1, description="clips", style=STYLE, layout=slider_layout()
        )
        self.step_bar = widgets.IntProgress(
            value=0, min=0, max=1, description="steps", style=STYLE, layout=slider_layout()
        )
        self.progress_text = widgets.HTML()
        self.status = widgets.HTML()
        self.video_box = widgets.Box()

        self.generate_button.on_click(lambda _b: self.generate())
        self.cancel_button.on_click(lambda _b: self.cancel())
        self.speakers.observe(lambda _c: self._speakers_changed(), "value")
        for field in (self.image_path, self.bboxes):
            field.observe(lambda _c: self._show_regions(), "value")
        self.own_size.observe(lambda _c: self._own_size_changed(), "value")
        self.size_class.observe(
            lambda c: setattr(self.shift, "value", DEFAULT_SHIFT[parse_option(SizeClass, c.new)]), "value"
        )
        self.preset.observe(lambda c: self.apply_preset(c.new), "value")
        self._speakers_changed()
        self._pipeline_changed()
        if callable(getattr(pipeline, "on_loaded", None)):  # a LoadPanel: its pipeline comes later
            pipeline.on_loaded(lambda _result: self._pipeline_changed())
        super().__init__(
            [
                heading("Image and speech"),
                widgets.HBox([self.image_path, self.image_upload]),
                widgets.HBox([self.audio_path, self.audio_upload]),
                self.speakers,
                self.two_box,
                heading("Prompt"),
                self.prompt,
                self.negative_prompt,
                heading("Sampling"),
                self.size_class,
                self.own_size,
                self.preset,
                self.scheduler,
                self.steps,
                self.shift,
                self.text_scale,
                self.audio_scale,
                self.cache,
                self.seed,
                self.max_frames,
                heading("Output"),
                self.out,
                self.resume,
                self.strict,
                widgets.HBox([self.generate_button, self.cancel_button]),
                self.clip_bar,
                self.step_bar,
                self.progress_text,
                self.status,
                self.video_box,
            ],
            layout=widgets.Layout(width="100%"),
        )
        self.add_class("wanstudio-generate-panel")

    # --- state ---------------------------------------------------------------------------------------
    @property
    def pipeline(self):
        return _resolve_pipeline(self.source)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def on_finished(self, callback: Callable) -> None:
        """``callback(panel)`` after every run (finished, cancelled or failed), in the worker thread."""
        self._listeners.append(callback)

    def apply_preset(self, name: str) -> None:
        """Set sampler, steps, shift and guidance scales to a :class:`GenerationPreset`'s."""
        settings = parse_option(GenerationPreset, name).settings
        self.scheduler.value = settings.scheduler.value
        self.steps.value = settings.steps
        self.text_scale.value = settings.text_scale
        self.audio_scale.value = settings.audio_scale
        size = parse_option(SizeClass, self.size_class.value or SizeClass.P480.value)
        self.shift.value = settings.shift if settings.shift is not None else DEFAULT_SHIFT[size]

    def _speakers_changed(self) -> None:
        self.two_box.layout.display = None if self.speakers.value == 2 else "none"
        self._show_regions()

    def _show_regions(self) -> None:
        if self.speakers.value == 2:  # one speaker: no frame is read
            self.regions.show(self.image_path.value, self.bboxes.value)

    def pipeline_size(self) -> tuple[int, int] | None:
        """The pipeline's own (width, height), if it has one (the tiny preset: 64x64)."""
        size = getattr(self.pipeline, "default_size", None)
        try:
            width, height = (int(v) for v in size)
        except (TypeError, ValueError):
            return None
        return width, height

    def _pipeline_changed(self) -> None:
        size = self.pipeline_size()
        self.own_size.layout.display = None if size else "none"
        if size:
            self.own_size.description = (
                f"use the pipeline's own size, {size[0]}x{size[1]} (not the size class)"
            )
        self._own_size_changed()

    def _own_size_changed(self) -> None:
        self.size_class.disabled = bool(self.own_size.value and self.pipeline_size())

    def _uploads_folder(self) -> Path:
        return Path(self.out.value).expanduser().parent / "uploads"

    def read_request(self) -> GenerateRequest:
        """The call the controls describe (uploads are saved next to the output first)."""
        for upload, field in (
            (self.image_upload, self.image_path),
            (self.audio_upload, self.audio_path),
            (self.audio2_upload, self.audio2_path),
        ):
            saved = save_upload(upload, self._uploads_folder())
            if saved is not None:
                field.value = str(saved)
                upload.value = ()
        image, audio = self.image_path.value.strip(), self.audio_path.value.strip()
        if not image:
            raise PipelineError("no image or video: give a path or upload a portrait (or a video to dub)")
        if not audio:
            raise PipelineError("no speech: give a path or upload an audio file")
        audio2 = mix = bboxes = strengths = None
        if self.speakers.value == 2:
            audio2 = self.audio2_path.value.strip()
            if not audio2:
                raise PipelineError("two speakers: give speaker 2's speech (path or upload)")
            mix = self.speaker_mix.value
            bboxes = parse_bboxes(self.bboxes.value)  # None: the pipeline's default halves
            strengths = self.regions.strength_values()
        out = self.out.value.strip()
        if not out:
            raise PipelineError("no output path")
        if not Path(out).expanduser().parent.exists():
            Path(out).expanduser().parent.mkdir(parents=True, exist_ok=True)
        return GenerateRequest(
            image=image,
            audio=audio,
            audio2=audio2,
            speaker_mix=mix or SpeakerMix.PARA.value,
            bboxes=bboxes,
            speaker_strengths=strengths,
            prompt=self.prompt.value,
            negative_prompt=self.negative_prompt.value or None,
            size_class=None if self.size_class.disabled else self.size_class.value,
            scheduler=self.scheduler.value,
            steps=self.steps.value,
            shift=float(self.shift.value),
            text_scale=float(self.text_scale.value),
            audio_scale=float(self.audio_scale.value),
            cache=self.cache.value,
            seed=int(self.seed.value),
            max_frames=int(self.max_frames.value),
            out=out,
            resume=self.resume.value,
            strict_layout=self.strict.value,
        )

    # --- actions -------------------------------------------------------------------------------------
    def generate(self) -> bool:
        """Start a run in a worker thread (what Generate does); False if it could not start."""
        if self.running:
            return False
        self.last_error, self.last_traceback = None, ""
        try:
            pipe = self.pipeline
            if pipe is None:
                raise PipelineError("no pipeline loaded yet: click Load in the load panel first")
            self._pipeline_changed()  # the pipeline may have been swapped since the panel was built
            request = self.read_request()
        except Exception as e:
            self._show_error(e)
            return False
        self.request = request
        self.result = None
        self.last_event = None
        self.finished_clips = 0
        self._cancel.clear()
        self.video_box.children = ()
        self.clip_bar.value, self.step_bar.value = 0, 0
        self.clip_bar.bar_style = self.step_bar.bar_style = ""
        self.status.value = status_html("Preparing (encoding image, text and speech)…", "busy")
        self.progress_text.value = ""
        self.generate_button.disabled, self.cancel_button.disabled = True, False
        self._thread = threading.Thread(
            target=self._work, args=(pipe, request), name="wanstudio-generate", daemon=True
        )
        self._thread.start()
        return True

    def cancel(self) -> None:
        """Stop at the next step; finished clips stay in the work folder for resume."""
        if self.running:
            self._cancel.set()
            self.cancel_button.disabled = True
            self.status.value = status_html("Cancelling at the next step…", "warn")

    def wait(self, timeout: float | None = None) -> bool:
        """Join the worker thread; True when no run is in progress afterwards."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running

    # --- the worker ----------------------------------------------------------------------------------
    def _on_progress(self, event) -> None:
        """The pipeline's progress callback (worker thread): move the bars, honour Cancel."""
        self.last_event = event
        if event.kind == "start":
            self.finished_clips = event.resumed_clips
            if not self._cancel.is_set():
                self.status.value = status_html(  # the inputs are encoded: sampling starts now
                    f"Generating {event.clips} clip{'s' if event.clips != 1 else ''} of {event.steps} "
                    f"step{'s' if event.steps != 1 else ''} each…",
                    "busy",
                )
        elif event.kind in ("clip", "done"):
            self.finished_clips = event.clip
        self.clip_bar.max = max(1, event.clips)
        self.clip_bar.value = self.finished_clips
        self.step_bar.max = max(1, event.steps)
        self.step_bar.value = event.step if event.kind in ("step", "done") else 0
        eta = "?" if event.eta is None else _hms(event.eta)
        resumed = f" ({event.resumed_clips} resumed)" if event.resumed_clips else ""
        self.progress_text.value = html.escape(
            f"clip {min(event.clip, event.clips)} of {event.clips}{resumed}, step {event.step} of {event.steps} · "
            f"{event.frames_done}/{event.frames_total} frames · elapsed {_hms(event.elapsed)} · ETA {eta}"
        )
        if event.kind != "done" and self._cancel.is_set():
            raise GenerationCancelled(event)

    def _work(self, pipe, request: GenerateRequest) -> None:
        t0 = time.perf_counter()
        try:
            strict = _strict(request.strict_layout)
            with strict:
                result = pipe(
                    request.image, request.audio, **request.call_kwargs(), progress=self._on_progress
                )
            self.result = result
            self.status.value = status_html(
                f"Done in {time.perf_counter() - t0:.1f} s: {_summary(result)}", "ok"
            )
            self.clip_bar.bar_style = self.step_bar.bar_style = "success"
            path = getattr(result, "path", None) or request.out
            if path and Path(path).is_file():
                self.video_box.children = (video_widget(path),)
            self.resume.value = False
        except GenerationCancelled as e:
            self.last_error = e
            kept = self.finished_clips
            self.clip_bar.bar_style = self.step_bar.bar_style = "warning"
            more = (
                (
                    f" {kept} finished clip{'s' if kept != 1 else ''} kept in {request.work_dir}; 'resume' is "
                    f"ticked, so Generate continues from clip {kept + 1}."
                )
                if kept
                else " No clip had finished; Generate starts over."
            )
            self.resume.value = kept > 0
            self.status.value = status_html(f"Cancelled{_where(e.event)}.{more}", "warn")
        except Exception as e:  # shown in the panel; the traceback stays on the panel
            self._show_error(e)
            if self.finished_clips:
                self.status.value += status_html(
                    f"{self.finished_clips} finished clip(s) are kept in {request.work_dir}: tick 'resume' "
                    f"to continue after fixing the cause.",
                    "info",
                )
            self.clip_bar.bar_style = self.step_bar.bar_style = "danger"
        finally:
            self.generate_button.disabled, self.cancel_button.disabled = False, True
            for callback in self._listeners:
                try:
                    callback(self)
                except Exception:  # a listener must not take the panel down
                    log.exception("GeneratePanel listener failed")

    def _show_error(self, error: BaseException) -> None:
        self.last_error, self.last_traceback = error, format_traceback(error)
        log.debug("generation failed:\n%s", self.last_traceback)
        self.status.value = error_html(error, "Generation failed")


def _strict(enabled: bool):
    if not enabled:
        return nullcontext()
    from ..layout import strict_layout

    return strict_layout()


def _default_negative() -> str:
    try:
        from ..pipeline import DEFAULT_NEGATIVE_PROMPT
    except ImportError:
        return ""
    return DEFAULT_NEGATIVE_PROMPT


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _where(event) -> str:
    if event is None:
        return ""
    text = f" in clip {event.clip} of {event.clips}"
    return text + (f", after step {event.step} of {event.steps}" if event.kind == "step" else "")


def _summary(result) -> str:
    summary = getattr(result, "summary", None)
    return summary() if callable(summary) else str(result)
