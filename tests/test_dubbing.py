"""Dubbing a source video, the official InfiniteTalk input file, and two speakers (default
regions, per-speaker strength, 'para' / 'add' timing): against the fake DiT / VAE of
test_pipeline.py and on the tiny preset end to end."""

from __future__ import annotations

import json
import logging
import subprocess

import numpy as np
import pytest
import torch
from test_pipeline import FAST, FakeDiT, FakeImage, fake_encode, make_pipe, speech

import wanstudio as ws
from wanstudio.pipeline import ClipPlan, InfiniteTalkPipeline, default_speaker_boxes, read_input_json

media = pytest.importorskip("wanstudio.media")


# --- synthetic source videos: frame i carries its number in its red channel ----------------------
def level(i: int) -> int:
    return 5 + 8 * i  # frames 0..30 -> 5..245


def numbered_frames(n: int, size=(48, 32)) -> np.ndarray:
    """uint8 [n, H, W, 3]: red = level(i); green / blue gradients (orientation and crop show)."""
    w, h = size
    frames = np.zeros((n, h, w, 3), np.uint8)
    frames[..., 1] = (np.arange(w) * 255 // max(1, w - 1))[None, None, :]
    frames[..., 2] = (np.arange(h) * 255 // max(1, h - 1))[None, :, None]
    for i in range(n):
        frames[i, ..., 0] = level(i)
    return frames


def write_lossless(path, frames: np.ndarray, fps: float = 25):
    """Frames -> a lossless (PNG-in-Matroska) video through the bundled ffmpeg: decoded exactly."""
    n, h, w, _ = frames.shape
    command = [ffmpeg_exe(), "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24"]
    command += ["-s", f"{w}x{h}", "-r", str(fps), "-i", "-", "-c:v", "png", str(path)]
    subprocess.run(command, input=np.ascontiguousarray(frames).tobytes(), check=True)
    return path


def frame_number(frame: torch.Tensor) -> int:
    """The number a conditioning frame [3, H, W] in [-1, 1] carries in its red channel."""
    red = float((frame[0].mean() + 1) * 127.5)
    return round((red - 5) / 8)


def as_condition(frame_uint8: np.ndarray, size=(48, 32)) -> torch.Tensor:
    """What the pipeline must make of a source frame: resize_and_crop, as for an image."""
    from PIL import Image

    return media.resize_and_crop(Image.fromarray(frame_uint8), size)


class RecordingDiT(FakeDiT):
    """FakeDiT that also keeps the image condition (clip_fea, y) of every call."""

    def forward(self, x, t, context, *, clip_fea=None, y=None, audio=None, ref_target_masks=None):
        out = super().forward(
            x, t, context, clip_fea=clip_fea, y=y, audio=audio, ref_target_masks=ref_target_masks
        )
        self.calls[-1].update(clip_fea=clip_fea, y=y)
        return out


class RecordingImage(FakeImage):
    def __init__(self):
        self.seen: list[torch.Tensor] = []

    def encode(self, images):
        self.seen.append(images.clone())
        return super().encode(images)


def recording_pipe(**kw):
    dit, image_encoder = RecordingDiT(), RecordingImage()
    pipe, _, vae = make_pipe(dit, **kw)
    pipe.image_encoder = image_encoder
    return pipe, dit, vae, image_encoder


def clip_conditions(dit, calls_per_clip: int) -> list[dict]:
    """The first DiT call of each clip."""
    return dit.calls[::calls_per_clip]


def expected_y(frame: torch.Tensor) -> torch.Tensor:
    """y for a conditioning frame under the fake VAE: mask on latent frame 0 + [frame, zeros]."""
    video = torch.zeros(1, 3, 17, *frame.shape[1:])
    video[:, :, 0] = frame
    latents = fake_encode(video)
    mask = torch.zeros(1, 4, *latents.shape[2:])
    mask[:, :, 0] = 1
    return torch.cat([mask, latents], 1)


# --- the reader ----------------------------------------------------------------------------------------
def test_the_reader_resamples_to_25_fps_reports_the_source_rate_and_holds_the_last_frame(tmp_path):
    frames = numbered_frames(30, (40, 24))
    path = write_lossless(tmp_path / "fifty.mkv", frames, fps=50)  # 0.6 s at 50 fps
    with media.VideoReader(path) as reader:
        assert reader.source_fps == 50 and (reader.width, reader.height) == (40, 24)
        assert reader.estimated_frames == 15 and reader.count is None
        for i in (0, 1, 7, 14):  # 25 fps frame i = the 50 fps frame shown at i / 25 s = 2i
            index, frame = reader.read(i)
            assert index == i and np.array_equal(frame, frames[2 * i])
        index, frame = reader.read(40)  # past the end: the last frame
        assert index == 14 and reader.count == 15 and np.array_equal(frame, frames[28])
        assert np.array_equal(reader.frame(3), frames[6])  # backwards: decoded again from the start
        assert "at 50 fps" in reader.describe() and "(15 frames at 25 fps)" in reader.describe()


def test_the_reader_keeps_one_frame_in_memory_and_stops_ffmpeg_on_close(tmp_path):
    # 10 frames of 256 x 192 (1.5 MB of RGB) outgrow the pipe's buffer: ffmpeg is still running
    path = write_lossless(tmp_path / "v.mkv", numbered_frames(10, size=(256, 192)))
    reader = media.VideoReader(path)
    reader.read(5)
    proc = reader._proc
    assert proc.poll() is None and len(reader._buffer) == 256 * 192 * 3
    reader.close()
    assert proc.poll() is not None
    with pytest.raises(ws.MediaError, match="after close"):
        reader.read(9)


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


@pytest.mark.parametrize(
    "name, match",
    [
        ("garbage.mp4", "not a media file ffmpeg can read"),
        ("empty.y4m", "holds no video frames"),  # a video stream, zero frames
        ("speech.m4a", "holds only an audio stream"),
    ],
)
def test_unreadable_and_frameless_videos_are_refused_before_heavy_work(tmp_path, name, match):
    path = tmp_path / name
    if name == "garbage.mp4":
        path.write_bytes(b"not a video at all")
    elif name == "empty.y4m":
        path.write_bytes(b"YUV4MPEG2 W64 H48 F25:1 Ip A1:1 C420jpeg\n")
    else:
        command = [ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "sine", "-t", "0.5", str(path)]
        subprocess.run(command, check=True)
    pipe, dit, vae, image_encoder = recording_pipe()
    with pytest.raises(ws.MediaError, match=match):
        pipe(video=path, audio=speech(0.5), size=(48, 32), **FAST)
    assert not dit.calls and not vae.encoded and not image_encoder.seen
    with pytest.raises(ws.MediaError, match="video file not found"):
        pipe(video=tmp_path / "missing.mp4", audio=speech(0.5), **FAST)


# --- dubbing against the fake DiT ----------------------------------------------------------------------
def test_each_clip_is_conditioned_on_the_source_frame_at_its_start(tmp_path, monkeypatch):
    """frame_num 17, motion 5: clips start at 0, 12, 24; 1.2 s of speech = 30 frames = 3 clips."""
    frames = numbered_frames(30)
    path = write_lossless(tmp_path / "scene.mkv", frames)
    references = []
    import wanstudio.pipeline.clips as clips

    original = clips.match_colors
    monkeypatch.setattr(
        clips, "match_colors", lambda v, ref, s: references.append(ref) or original(v, ref, s)
    )
    pipe, dit, vae, image_encoder = recording_pipe()
    out = pipe(
        video=path, audio=speech(1.2), size=(48, 32), steps=2, motion_frame=5, loudness=None, progress=False
    )
    assert out.clips == 3 and out.num_frames == 30 == out.frames.shape[0]
    # the source as read, and nothing about its length (it matches the audio)
    assert out.notes == (
        "source video scene.mkv: 48x32 at 25 fps, 1.20 s (about 30 frames at 25 fps), read at 25 fps",
    )
    per_clip = clip_conditions(dit, 2 * 3)
    assert len(per_clip) == 3
    for k, call in zip((0, 1, 2), per_clip, strict=True):
        start = ClipPlan.make(30, 17, 5, 1000).start(k)
        want = as_condition(frames[start])
        assert frame_number(want) == start == 12 * k
        assert torch.allclose(call["y"], expected_y(want), atol=1e-6)  # VAE latents of that frame
        assert torch.equal(call["clip_fea"], FakeImage().encode(want[None]))  # its CLIP features
    assert [frame_number(x[0]) for x in image_encoder.seen] == [0, 12, 24]  # one CLIP pass per clip
    # frame 0 is the colour reference of every clip and clip 1's clean head
    assert len(references) == 3 and all(torch.equal(r, as_condition(frames[0])) for r in references)
    heads = [v for v in vae.encoded if v.shape[2] == 1]
    assert len(heads) == 1 and torch.equal(heads[0][0, :, 0], as_condition(frames[0]))


def test_a_video_path_given_as_image_is_dubbed_the_same(tmp_path):
    path = write_lossless(tmp_path / "scene.mkv", numbered_frames(20))
    a = make_pipe()[0](video=path, audio=speech(0.8), size=(48, 32), **FAST)
    b = make_pipe()[0](path, speech(0.8), size=(48, 32), **FAST)  # positional image, .mkv suffix
    assert torch.equal(a.frames, b.frames)


def test_a_video_shorter_than_the_audio_holds_its_last_frame_and_says_so(tmp_path, caplog):
    frames = numbered_frames(15)  # 0.6 s; the speech is 1.2 s: clips start at 0, 12, 24
    path = write_lossless(tmp_path / "short.mkv", frames)
    pipe, dit, _, image_encoder = recording_pipe()
    with caplog.at_level(logging.INFO, logger="wanstudio"):
        out = pipe(
            video=path,
            audio=speech(1.2),
            size=(48, 32),
            steps=2,
            motion_frame=5,
            loudness=None,
            progress=False,
        )
    assert out.num_frames == 30 and out.clips == 3  # the output follows the audio
    ys = [c["y"] for c in clip_conditions(dit, 2 * 3)]
    assert torch.allclose(ys[1], expected_y(as_condition(frames[12])), atol=1e-6)
    assert torch.allclose(ys[2], expected_y(as_condition(frames[14])), atol=1e-6)  # the last frame
    assert [frame_number(x[0]) for x in image_encoder.seen] == [0, 12, 14]
    source, note = out.notes  # what was read, then what was done about its length
    assert source.startswith("source video ") and "read at 25 fps" in source
    assert "shorter than the 1.20 s output" in note and "its last frame" in note
    assert any(r.levelno == logging.WARNING and "shorter" in r.getMessage() for r in caplog.records)


def test_a_video_longer_than_the_audio_is_cut_to_the_audio(tmp_path):
    path = write_lossless(tmp_path / "long.mkv", numbered_frames(30))  # 1.2 s
    out = make_pipe()[0](video=path, audio=speech(0.4), size=(48, 32), **FAST)
    assert out.num_frames == 10 and out.clips == 1
    source, note = out.notes  # what was read, then what was done about its length
    assert source.startswith("source video ") and "read at 25 fps" in source
    assert "longer than the 0.40 s output" in note and "not used" in note


def test_a_video_of_one_still_picture_gives_the_image_output_bitwise(tmp_path):
    """The video path degenerates to the image path: same frames, same latents, same output."""
    frames = np.repeat(numbered_frames(1), 30, axis=0)
    path = write_lossless(tmp_path / "still.mkv", frames)
    image = as_condition(frames[0])  # the tensor the image path is given
    from_image = make_pipe()[0](image, speech(1.2), seed=3, **FAST)
    from_video = make_pipe()[0](video=path, audio=speech(1.2), size=(48, 32), seed=3, **FAST)
    assert torch.equal(from_image.frames, from_video.frames)


def test_resume_with_a_video_equals_an_uninterrupted_run_and_needs_the_same_video(tmp_path):
    frames = numbered_frames(30)
    path = write_lossless(tmp_path / "scene.mkv", frames)
    args = dict(video=path, audio=speech(1.3, seed=1), size=(48, 32), seed=7, **FAST)
    reference = make_pipe()[0](**args).frames
    with pytest.raises(RuntimeError, match="injected"):
        make_pipe(FakeDiT(fail_at=3 * 3 + 4))[0](**args, work_dir=tmp_path / "work")  # clip 2
    # another video with the same frame 0 (the reference) but other later frames: refused
    other = frames.copy()
    other[12:] = frames[12:] // 2
    other_path = write_lossless(tmp_path / "other.mkv", other)
    with pytest.raises(ws.PipelineError, match="video: "):
        make_pipe()[0](**{**args, "video": other_path}, work_dir=tmp_path / "work", resume=True)
    pipe, dit, vae = make_pipe()
    out = pipe(**args, work_dir=tmp_path / "work", resume=True)
    assert out.resumed_clips == 1 and len(vae.decoded) == out.clips - 1
    assert torch.equal(out.frames, reference)


# --- two speakers ----------------------------------------------------------------------------------------
def test_two_speakers_without_boxes_get_the_official_default_regions():
    # the official tool: halves of the frame, inset by 5 % (face_scale 0.05), values truncated
    assert default_speaker_boxes(96, 64) == ((2, 3, 45, 60), (50, 3, 93, 60))
    assert default_speaker_boxes(48, 32) == ((1, 1, 22, 30), (25, 1, 46, 30))
    pipe, dit, _ = make_pipe()
    pipe(torch.zeros(3, 64, 96), speech(0.5), audio2=speech(0.5, seed=3), **FAST)
    masks = dit.calls[0]["masks"]  # the latent grid of 64x96: 8x12, nearest from the pixel masks
    want = torch.zeros(3, 8, 12)
    want[0, 1:8, 1:6] = 1  # pixel rows 8, 16, ..., 56 and columns 8, ..., 40 fall inside box 1
    want[1, 1:8, 7:12] = 1
    want[2] = 1 - want[0] - want[1]
    assert torch.equal(masks, want)


@pytest.mark.parametrize("mix", ["para", "add"])
def test_para_and_add_timing(mix):
    """Speaker 1 talks 0.4 s, speaker 2 0.6 s. 'para': together, 0.6 s; 'add': one after the
    other, 1.0 s, each silent while the other talks (audio features are the RMS per frame)."""
    pipe, dit, _ = make_pipe()
    out = pipe(torch.zeros(3, 32, 48), speech(0.4), audio2=speech(0.6, seed=2), speaker_mix=mix, **FAST)
    audio = dit.calls[0]["audio"][0, :, :, 2, 1, 0]  # (speaker, frame): centre window, layer 1
    if mix == "para":
        assert out.num_frames == 15
        assert (audio[0, :10] > 0).all() and (audio[0, 10:15] == 0).all()
        assert (audio[1, :15] > 0).all()
    else:
        assert out.num_frames == 25
        assert (audio[0, :10] > 0).all() and (audio[0, 10:17] == 0).all()
        assert (audio[1, :10] == 0).all() and (audio[1, 10:17] > 0).all()


def test_speaker_strengths_scale_each_speakers_audio_features():
    base_pipe, base, _ = make_pipe()
    base_pipe(torch.zeros(3, 32, 48), speech(0.5), audio2=speech(0.5, seed=3), **FAST)
    pipe, dit, _ = make_pipe()
    pipe(
        torch.zeros(3, 32, 48), speech(0.5), audio2=speech(0.5, seed=3), speaker_strengths=(2.0, 0.25), **FAST
    )
    a, b = base.calls[0]["audio"], dit.calls[0]["audio"]
    assert torch.equal(b[:, 0], a[:, 0] * 2.0) and torch.equal(b[:, 1], a[:, 1] * 0.25)
    assert dit.calls[2]["audio"].abs().sum() == 0  # the unconditional call stays silent
    one_pipe, one, _ = make_pipe()
    one_pipe(torch.zeros(3, 32, 48), speech(0.5), speaker_strengths=0.5, **FAST)
    single_pipe, single, _ = make_pipe()
    single_pipe(torch.zeros(3, 32, 48), speech(0.5), **FAST)
    assert torch.equal(one.calls[0]["audio"], single.calls[0]["audio"] * 0.5)


# --- the official input file ------------------------------------------------------------------------------
@pytest.fixture
def scene(tmp_path):
    """A non-square 96x64 picture, a video, two speech files, in a folder with the JSON files."""
    from PIL import Image

    folder = tmp_path / "job"
    (folder / "media").mkdir(parents=True)
    Image.fromarray(numbered_frames(1, (96, 64))[0]).save(folder / "media" / "two.png")
    write_lossless(folder / "media" / "scene.mkv", numbered_frames(30, (96, 64)))
    media.write_video(folder / "media" / "man.mp4", np.zeros((2, 16, 16, 3), np.uint8), audio=speech(0.5))
    import wave

    for name, seed in (("man.wav", 0), ("woman.wav", 2)):
        with wave.open(str(folder / "media" / name), "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
            w.writeframes((speech(0.5, seed=seed) * 32767).astype("<i2").tobytes())
    return folder


def write_json(folder, name, data):
    path = folder / name
    path.write_text(json.dumps(data))
    return path


def test_official_json_one_speaker_image_and_video(scene):
    path = write_json(
        scene,
        "single.json",
        {
            "prompt": "A man is talking",
            "cond_video": "media/two.png",
            "cond_audio": {"person1": "media/man.wav"},
        },
    )
    assert read_input_json(path) == {
        "prompt": "A man is talking",
        "image": str(scene / "media" / "two.png"),  # relative to the JSON file's folder
        "audio": str(scene / "media" / "man.wav"),
    }
    path = write_json(
        scene,
        "dub.json",
        {"prompt": "", "cond_video": "media/scene.mkv", "cond_audio": {"person1": "media/man.wav"}},
    )
    kw = read_input_json(path)
    assert kw["video"] == str(scene / "media" / "scene.mkv") and "image" not in kw
    pipe, dit, _, image_encoder = recording_pipe()
    out = pipe(**kw, size=(48, 32), **FAST)
    assert out.num_frames == 12 and frame_number(image_encoder.seen[0][0]) == 0
    assert any(n.startswith("source video scene.mkv: ") and "read at 25 fps" in n for n in out.notes)
    again = pipe.from_json(path, size=(48, 32), **FAST)  # the same call, the file read for us
    assert torch.equal(again.frames, out.frames) and again.notes == out.notes


def test_official_json_two_speakers_with_boxes_on_a_non_square_frame(scene):
    """The official code sets mask[x_min:x_max, y_min:y_max]: x counts rows, y columns."""
    data = {
        "prompt": "two people talking",
        "cond_video": "media/two.png",  # 96 wide, 64 high
        "audio_type": "add",
        "cond_audio": {"person1": "media/man.wav", "person2": "media/woman.wav"},
        "bbox": {"person1": [8, 0, 56, 40], "person2": [8, 56, 56, 96]},
    }
    kw = read_input_json(write_json(scene, "multi.json", data))
    assert kw["speaker_mix"] == "add" and kw["audio2"] == str(scene / "media" / "woman.wav")
    assert kw["bboxes"] == ((0, 8, 40, 56), (56, 8, 96, 56))  # (x0, y0, x1, y1), x to the right
    pipe, dit, _ = make_pipe()
    pipe(**{**kw, "prompt": ""}, size=(96, 64), **FAST)
    # by hand: person 1 covers pixel rows 8..55 and columns 0..39, person 2 rows 8..55, columns 56..95;
    # the 8x12 latent grid samples pixel rows / columns 0, 8, 16, ...
    want = torch.zeros(3, 8, 12)
    want[0, 1:7, 0:5] = 1
    want[1, 1:7, 7:12] = 1
    want[2] = 1 - want[0] - want[1]
    assert torch.equal(dit.calls[0]["masks"], want)
    # the same file without boxes: the default halves; audio_type defaults to para
    del data["bbox"], data["audio_type"]
    kw = read_input_json(write_json(scene, "halves.json", data))
    assert "bboxes" not in kw and kw["speaker_mix"] == "para"


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"cond_vidoe": "media/two.png"}, ws.PipelineError, "unknown key.*'cond_vidoe'"),
        ({"cond_video": "media/nope.png"}, ws.MediaError, "'cond_video': .*nope.png not found"),
        ({"cond_audio": {"person1": "media/nope.wav"}}, ws.MediaError, "'cond_audio.person1'"),
        (
            {"cond_audio": {"person1": "media/man.wav", "person3": "media/man.wav"}},
            ws.PipelineError,
            "person3",
        ),
        ({"cond_audio": {"person2": "media/man.wav"}}, ws.PipelineError, "no 'person1'"),
        ({"audio_type": "both"}, ws.PipelineError, "'audio_type'"),
        (
            {"bbox": {"person1": [0, 0, 80, 40], "person2": [0, 50, 60, 96]}},
            ws.PipelineError,
            "bbox.person1.*outside the 96x64",
        ),
        ({"bbox": {"person1": [0, 0, 60, 60], "person2": [0, 50, 60, 96]}}, ws.PipelineError, "overlap"),
        ({"bbox": {"person1": [0, 0, 60, 40]}}, ws.PipelineError, "need a box each"),
        (
            {"bbox": {"person1": [0, 0, 60, 40], "person2": [0, 50, 60, 96], "person3": [0, 0, 1, 1]}},
            ws.PipelineError,
            "more speakers than speech tracks",
        ),
        (
            {"bbox": {"person1": [0, 0, 60], "person2": [0, 50, 60, 96]}},
            ws.PipelineError,
            "'bbox.person1' must be",
        ),
    ],
)
def test_official_json_errors_name_the_key(scene, change, error, match):
    data = {
        "prompt": "",
        "cond_video": "media/two.png",
        "cond_audio": {"person1": "media/man.wav", "person2": "media/woman.wav"},
        **change,
    }
    with pytest.raises(error, match=match):
        read_input_json(write_json(scene, "bad.json", data))


def test_official_json_more_boxes_than_speakers_and_paths_relative_to_the_json(scene, monkeypatch):
    data = {
        "cond_video": "media/two.png",
        "cond_audio": {"person1": "media/man.wav"},
        "bbox": {"person2": [0, 0, 8, 8]},
    }
    with pytest.raises(ws.PipelineError, match="more speakers than speech tracks: bbox names 'person2'"):
        read_input_json(write_json(scene, "one.json", data))
    # paths written relative to the folder one starts from (as the official examples are) are
    # not found, and the error says why
    monkeypatch.chdir(scene.parent)
    data = {"cond_video": "job/media/two.png", "cond_audio": {"person1": "job/media/man.wav"}}
    with pytest.raises(ws.MediaError, match="resolve against the JSON file's folder"):
        read_input_json(write_json(scene, "cwd.json", data))


# --- the tiny preset end to end ----------------------------------------------------------------------------
@pytest.mark.slow  # a whole tiny run
def test_tiny_dubbing_follows_the_source_frames_and_the_audio(tmp_path):
    """~2.5 clips of speech on the real tiny model, encoders and VAE: the CLIP encoder sees the
    source frames 0, 12, 24; the mp4 has audio-duration x 25 frames and the speech."""
    pipe = InfiniteTalkPipeline.tiny(seed=0)
    frames = numbered_frames(31, (80, 64))
    source = media.VideoWriter(tmp_path / "scene.mp4")  # H.264 as users bring it
    with source:
        source.append(frames)
    seconds = 2.5 * 12 / 25 + 5 / 25  # 1.4 s: 35 frames, clips at 0, 12, 24
    wave = speech(seconds)
    seen = []
    original = pipe.image_encoder.encode
    pipe.image_encoder.encode = lambda images: seen.append(images.clone()) or original(images)
    path = tmp_path / "dubbed.mp4"
    try:
        out = pipe(
            video=source.path, audio=wave, out=path, steps=2, motion_frame=5, loudness=None, progress=False
        )
    finally:
        del pipe.image_encoder.encode
    assert out.clips == 3 and out.frames.shape == (35, 64, 64, 3)
    assert [frame_number(x[0]) for x in seen] == [0, 12, 24]  # H.264: the levels stay apart
    info = media.probe_media(path)
    assert info["frames"] == 35 and info["has_audio"] and info["duration"] == pytest.approx(1.4, abs=0.05)
    heard = media.load_audio(path)
    n = min(len(heard), len(wave))
    assert abs(len(heard) - len(wave)) < 16000 / 25  # within one frame
    assert np.corrcoef(heard[:n], wave[:n])[0, 1] > 0.9  # the same speech, through AAC


@pytest.mark.slow  # a whole tiny run
def test_cli_runs_an_official_json_with_a_video_and_two_speakers(scene, tmp_path, capsys):
    from wanstudio.cli import main

    data = {
        "prompt": "two people talking",
        "cond_video": "media/scene.mkv",  # 96x64, 1.2 s
        "audio_type": "add",  # 0.5 s + 0.5 s of speech: 1.0 s, 25 frames
        "cond_audio": {"person1": "media/man.wav", "person2": "media/woman.wav"},
        "bbox": {"person1": [8, 0, 56, 40], "person2": [8, 56, 56, 96]},
    }
    path = write_json(scene, "multi.json", data)
    out = tmp_path / "talk.mp4"
    argv = ["infinitetalk", "--tiny", "--input-json", str(path), "--out", str(out), "--steps", "1"]
    argv += ["--text-scale", "1", "--speaker-strength", "1", "0.5", "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "25 frames" in text and "note: the source video scene.mkv is about 1.20 s, longer" in text
    assert media.probe_media(out)["frames"] == 25
    # the flags the JSON replaces are refused next to it
    assert main(["infinitetalk", "--tiny", "--input-json", str(path), "--bbox", "0,0,4,4"]) == 2
    assert "--input-json gives the inputs" in capsys.readouterr().err
