"""The official InfiniteTalk input file (``generate_infinitetalk.py --input_json``) as call arguments.

The format, as in MeiGen-AI/InfiniteTalk's ``examples/*.json``::

    {
      "prompt": "A man is talking",
      "cond_video": "ref.png",                  # a still image, or a video to dub
      "cond_audio": {"person1": "a.wav", "person2": "b.wav"},   # person2: two speakers
      "audio_type": "para",                     # two speakers: "para" (at once) or "add" (in turn)
      "bbox": {"person1": [x_min, y_min, x_max, y_max], "person2": [...]}
    }

**The box convention.** The official code makes each speaker's mask as a [height, width] array
and sets ``mask[x_min:x_max, y_min:y_max] = 1``: **x counts rows** (pixels down from the top
edge) and **y counts columns** (pixels right from the left edge), the transpose of the usual
image convention; ends are excluded and values are truncated to integers. A box drawn on the
picture from its top-left corner (left, top) to its bottom-right corner (right, bottom) is
therefore written ``[top, left, bottom, right]``. :func:`read_input_json` applies exactly that:
it passes ``bboxes=((y_min, x_min, y_max, x_max), ...)`` in the pipeline's (x0, y0, x1, y1),
x-to-the-right convention, so the same pixels are covered.

Differences from the official script, each deliberate: relative paths resolve against the JSON
file's folder (the official script resolves them against the folder it is started from);
boxes are matched to speakers by name (``bbox.person1`` belongs to ``cond_audio.person1``; the
official script takes them in listing order, the same thing when listed in order); a box
outside the frame, overlapping boxes, unknown keys and missing files are errors naming the
key; ``audio_type`` defaults to "para"; ``prompt`` defaults to "". With one speaker the
official script ignores ``bbox``; so does wanstudio (after checking it).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..errors import MediaError, PipelineError, UnknownOptionError
from ..options import SpeakerMix, parse_option

log = logging.getLogger(__name__)

KEYS = ("prompt", "cond_video", "cond_audio", "audio_type", "bbox")
PEOPLE = ("person1", "person2")


def read_input_json(path: str | os.PathLike) -> dict:
    """An official InfiniteTalk input file -> keyword arguments of ``InfiniteTalkPipeline.__call__``.

    Returns ``prompt``, ``image`` or ``video`` (by ``cond_video``'s suffix), ``audio``, and for two
    speakers ``audio2``, ``speaker_mix`` and, when the file has ``bbox``, ``bboxes`` (converted
    from the official rows-first convention: see this module's docstring). Paths are absolute.
    Use: ``pipe(**read_input_json("talk.json"), out="talk.mp4")``.

    Raises:
        PipelineError: not JSON, an unknown key, a missing or malformed value, a box outside
            the frame, overlapping boxes, more boxes than speech tracks (the message names the key).
        MediaError: a file named by the JSON is missing or unreadable (named with its key).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise MediaError(f"input JSON not found: {path}. Check the path.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PipelineError(
            f"{path} is not a JSON file ({err}); expected the official InfiniteTalk input format"
        ) from err
    where = path.name
    if not isinstance(data, dict):
        raise PipelineError(
            f"{where}: expected a JSON object with keys {', '.join(KEYS)}, found {type(data).__name__}"
        )
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise PipelineError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; the official format has "
            f"{', '.join(KEYS)}. Remove or rename them."
        )
    folder = path.parent
    prompt = data.get("prompt", "")
    if not isinstance(prompt, str):
        raise PipelineError(f"{where}: 'prompt' must be a string, found {type(prompt).__name__}")
    if "cond_video" not in data:
        raise PipelineError(f"{where}: 'cond_video' is missing: the reference image or the video to dub")
    cond_video = _file(data["cond_video"], folder, where, "cond_video")
    audios = data.get("cond_audio")
    if not isinstance(audios, dict) or not audios:
        raise PipelineError(
            f'{where}: \'cond_audio\' must be an object {{"person1": speech file[, "person2": ...]}}, '
            f"found {audios!r}"
        )
    extra = [k for k in audios if k not in PEOPLE]
    if extra:
        raise PipelineError(
            f"{where}: cond_audio holds {', '.join(map(repr, extra))}; InfiniteTalk takes one or two "
            f"speakers, named 'person1' and 'person2'"
        )
    if "person1" not in audios:
        raise PipelineError(f"{where}: cond_audio has no 'person1' (the first speaker's speech)")
    people = [p for p in PEOPLE if p in audios]
    speech = {p: _file(audios[p], folder, where, f"cond_audio.{p}") for p in people}

    from ..media import is_video_file

    kwargs: dict = {"prompt": prompt, "video" if is_video_file(cond_video) else "image": str(cond_video)}
    kwargs["audio"] = str(speech["person1"])
    if len(people) == 2:
        kwargs["audio2"] = str(speech["person2"])
        try:
            kwargs["speaker_mix"] = parse_option(
                SpeakerMix, data.get("audio_type", SpeakerMix.PARA.value)
            ).value
        except UnknownOptionError as err:
            raise PipelineError(f"{where}: 'audio_type': {err}") from err
    elif "audio_type" in data:
        parse_option(SpeakerMix, data["audio_type"])  # checked; one speaker has nothing to mix
    if "bbox" in data:
        boxes = _boxes(data["bbox"], people, cond_video, where)
        if len(people) == 2:
            kwargs["bboxes"] = boxes
        else:
            log.info("%s: one speaker: its bbox is not used (as in the official tool)", where)
    return kwargs


def official_box_to_xyxy(box) -> tuple[int, int, int, int]:
    """An official ``[x_min, y_min, x_max, y_max]`` box (x = rows, y = columns; truncated to
    integers as the official code does) -> wanstudio's (x0, y0, x1, y1) with x to the right."""
    x_min, y_min, x_max, y_max = (int(v) for v in box)
    return y_min, x_min, y_max, x_max


# --- helpers ----------------------------------------------------------------------------------------
def _file(value, folder: Path, where: str, key: str) -> Path:
    """A path from the JSON, resolved against its folder; MediaError naming ``key`` if missing."""
    if not isinstance(value, str) or not value.strip():
        raise PipelineError(f"{where}: '{key}' must be a file path (a string), found {value!r}")
    if value == "None" and key.startswith("cond_audio"):
        raise PipelineError(
            f"{where}: '{key}' is \"None\" (the official tool's silent speaker); wanstudio needs a "
            f"speech file per person: give one, or drop {key.split('.')[-1]} for one speaker"
        )
    given = Path(value).expanduser()
    path = given if given.is_absolute() else folder / given
    if not path.is_file():
        hint = ""
        if not given.is_absolute() and Path.cwd().joinpath(given).is_file():
            hint = (
                f"; {Path.cwd() / given} exists, but relative paths resolve against the JSON file's "
                f"folder {folder}: write the path relative to it (or absolute)"
            )
        what = "is a folder" if path.is_dir() else "not found"
        raise MediaError(f"{where}: '{key}': {path} {what}{hint}")
    return path


def _frame_size(cond_video: Path, where: str) -> tuple[int, int]:
    """(width, height) of the reference frame the pipeline will see."""
    from ..media import VideoReader, is_video_file, load_image

    try:
        if is_video_file(cond_video):
            with VideoReader(cond_video) as reader:
                return reader.width, reader.height
        return load_image(cond_video).size
    except MediaError as err:
        raise MediaError(f"{where}: 'cond_video': {err}") from err


def _boxes(value, people: list[str], cond_video: Path, where: str) -> tuple:
    """The official bbox object -> wanstudio boxes in speaker order, each checked in official terms."""
    if not isinstance(value, dict):
        raise PipelineError(
            f"{where}: 'bbox' must be an object {{\"person1\": [x_min, y_min, x_max, y_max], ...}}, found {value!r}"
        )
    more = [k for k in value if k not in people]
    if more:
        raise PipelineError(
            f"{where}: more speakers than speech tracks: bbox names {', '.join(map(repr, more))} but "
            f"cond_audio has only {', '.join(people)}; give a box per speech track"
        )
    if len(people) == 2 and len(value) != 2:
        raise PipelineError(
            f"{where}: bbox gives {', '.join(value) or 'no box'}; two speakers need a box each "
            f"(person1 and person2), or no bbox at all (then the left and right halves are used)"
        )
    width, height = _frame_size(cond_video, where)
    rows = {}
    for person in people:
        if person not in value:
            continue
        box = value[person]
        if (
            not isinstance(box, list)
            or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
        ):
            raise PipelineError(
                f"{where}: 'bbox.{person}' must be [x_min, y_min, x_max, y_max], found {box!r}"
            )
        x_min, y_min, x_max, y_max = (int(v) for v in box)
        if not (0 <= x_min < x_max <= height and 0 <= y_min < y_max <= width):
            raise PipelineError(
                f"{where}: 'bbox.{person}' = {box} is outside the {width}x{height} frame of cond_video: "
                f"in the official convention x counts rows (0 <= x_min < x_max <= {height}, the height) "
                f"and y columns (0 <= y_min < y_max <= {width}, the width); a box from (left, top) to "
                f"(right, bottom) is written [top, left, bottom, right]"
            )
        rows[person] = (x_min, y_min, x_max, y_max)
    if len(rows) == 2:
        (a0, b0, a1, b1), (c0, d0, c1, d1) = rows["person1"], rows["person2"]
        if max(a0, c0) < min(a1, c1) and max(b0, d0) < min(b1, d1):
            raise PipelineError(
                f"{where}: 'bbox.person1' {value['person1']} and 'bbox.person2' {value['person2']} overlap; "
                f"a pixel belongs to one speaker only: draw boxes that do not overlap"
            )
    return tuple(official_box_to_xyxy(rows[p]) for p in people if p in rows)
