"""What one Generate click asks for: the pipeline call's arguments as the panel read them,
and the parsing of the panel's text fields (speaker boxes)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import PipelineError, WanstudioError
from ..options import Scheduler, SizeClass, SpeakerMix


class GenerationCancelled(WanstudioError):
    """Raised from the progress callback after Cancel: stops the pipeline at the next step."""

    def __init__(self, event=None):
        where = ""
        if event is not None:
            where = f" at clip {event.clip} of {event.clips}"
            if getattr(event, "kind", "") == "step":
                where += f", step {event.step} of {event.steps}"
        super().__init__(f"cancelled{where}")
        self.event = event


@dataclass(frozen=True)
class GenerateRequest:
    """One Generate click: the pipeline call's arguments, as the panel read them."""

    image: str
    audio: str
    audio2: str | None = None
    speaker_mix: str = SpeakerMix.PARA.value
    bboxes: tuple | None = None  # None with two speakers: the pipeline's default halves
    speaker_strengths: tuple | None = None  # None: 1 per speaker
    prompt: str = ""
    negative_prompt: str | None = None
    size_class: str | None = SizeClass.P480.value  # None: the pipeline's own size (tiny: 64x64)
    scheduler: str = Scheduler.EULER.value
    steps: int = 40
    shift: float = 7.0
    text_scale: float = 5.0
    audio_scale: float = 4.0
    cache: str = "none"  # options.CacheMode
    seed: int = 42
    max_frames: int = 1000
    out: str = "infinitetalk.mp4"
    resume: bool = False
    strict_layout: bool = False

    @property
    def work_dir(self) -> Path:
        """Where the pipeline keeps finished clips (its default, ``<out>.work``)."""
        return Path(f"{self.out}.work")

    def call_kwargs(self) -> dict:
        """Keyword arguments of ``InfiniteTalkPipeline.__call__`` (image and audio positional)."""
        kw = asdict(self)
        for key in ("image", "audio", "strict_layout"):
            kw.pop(key)
        if self.size_class is None:
            kw.pop("size_class")
        if self.audio2 is None:
            kw.pop("audio2"), kw.pop("speaker_mix"), kw.pop("bboxes")
        for key in ("bboxes", "speaker_strengths"):
            if kw.get(key, 0) is None:
                kw.pop(key)
        return kw


def parse_bboxes(text: str) -> tuple | None:
    """'x0,y0,x1,y1; x0,y0,x1,y1' (speaker 1 first, source-image pixels) -> two 4-tuples."""
    text = text.strip()
    if not text:
        return None
    boxes = []
    for part in text.replace("\n", ";").split(";"):
        if not part.strip():
            continue
        try:
            numbers = tuple(int(round(float(v))) for v in part.replace(" ", ",").split(",") if v.strip())
        except ValueError:
            raise PipelineError(f"speaker boxes: {part.strip()!r} is not four numbers x0,y0,x1,y1") from None
        if len(numbers) != 4:
            raise PipelineError(f"speaker boxes: {part.strip()!r} is not four numbers x0,y0,x1,y1")
        boxes.append(numbers)
    if len(boxes) != 2:
        raise PipelineError(f"speaker boxes: give two boxes (speaker 1; speaker 2), got {len(boxes)}")
    return tuple(boxes)
