"""Media I/O: images, buckets, audio decoding and loudness, speaker mixing, mp4 writing."""

from __future__ import annotations

import errno
import os
import re
import subprocess

import numpy as np
import pytest

imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")  # GPU boxes may lack ffmpeg
pyloudnorm = pytest.importorskip("pyloudnorm")
import torch
from PIL import Image
from scipy.io import wavfile

from wanstudio.errors import MediaError, ShapeError, UnknownOptionError
from wanstudio.media import (
    VideoWriter,
    asset_path,
    check_input_file,
    check_output_path,
    check_speech,
    choose_bucket,
    load_audio,
    load_image,
    loudness_normalize,
    mix_speakers,
    probe_media,
    resize_and_crop,
    write_video,
)


def _sine(seconds: float, rate: int = 16000, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _write_wav(path, wave: np.ndarray, rate: int = 16000):
    wavfile.write(path, rate, (np.clip(wave, -1, 1) * 32767).astype(np.int16))
    return path


def _peak_hz(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave))
    return float(np.fft.rfftfreq(wave.size, 1 / rate)[spectrum.argmax()])


def _frames(count: int, height: int = 48, width: int = 64) -> np.ndarray:
    """uint8 [F, H, W, 3]: a moving gradient, so every frame differs."""
    y, x = np.mgrid[:height, :width]
    return np.stack(
        [
            np.stack([(x * 4 + f * 8) % 256, (y * 5) % 256, np.full_like(x, f * 9 % 256)], axis=-1)
            for f in range(count)
        ]
    ).astype(np.uint8)


@pytest.fixture()
def no_temp_files(tmp_path):
    """Asserts, after the test, that nothing but the files it names remains in tmp_path."""
    expected: set[str] = set()
    yield expected
    assert {p.name for p in tmp_path.iterdir()} == expected


# --- images --------------------------------------------------------------------------------


def test_load_image_applies_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.new("RGB", (40, 20), "red").save(tmp_path / "photo.jpg", exif=exif)
    image = load_image(tmp_path / "photo.jpg")
    assert image.mode == "RGB" and image.size == (20, 40)


def test_load_image_puts_transparency_over_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(tmp_path / "alpha.png")
    image = load_image(tmp_path / "alpha.png")
    assert image.getpixel((4, 4)) == (255, 255, 255) and image.getpixel((0, 0)) == (0, 0, 255)


def test_load_image_errors(tmp_path):
    with pytest.raises(MediaError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(MediaError, match="is a folder, expected an image file"):
        load_image(tmp_path)
    with pytest.raises(MediaError, match="not an image"):
        load_image(asset_path("speech.wav"))
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(asset_path("portrait.png").read_bytes()[:2000])
    with pytest.raises(MediaError, match="could not be decoded"):
        load_image(truncated)


def _png_header(path, width: int, height: int):
    """A PNG whose header says width x height, with no pixel data: only decoding it would fail."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    rows = chunk(b"IDAT", zlib.compress(b"\0" * 64))  # a sliver of the first row, then EOF
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + rows)
    return path


@pytest.mark.parametrize("side", [10_000, 20_000], ids=["100-mpx", "400-mpx-pil-bomb"])
def test_a_huge_image_is_refused_from_its_header_before_decoding(tmp_path, side):
    path = _png_header(tmp_path / "huge.png", side, side)
    with pytest.raises(MediaError, match=r"too large for a reference image .*downscale it") as caught:
        load_image(path)
    assert "64 Mpx" in str(caught.value) and "truncated" not in str(caught.value)


def test_an_image_at_the_limit_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr("wanstudio.media.images.MAX_IMAGE_PIXELS", 40 * 30)
    Image.new("RGB", (40, 30), "red").save(tmp_path / "ok.png")
    assert load_image(tmp_path / "ok.png").size == (40, 30)
    Image.new("RGB", (41, 30), "red").save(tmp_path / "big.png")
    with pytest.raises(MediaError, match=r"41x30 = 0.0 Mpx"):
        load_image(tmp_path / "big.png")


def test_an_animated_image_warns_that_its_first_frame_is_used(tmp_path):
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "green", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    with pytest.warns(UserWarning, match=r"animated image: using its first frame of 3"):
        image = load_image(tmp_path / "anim.gif")
    assert image.getpixel((4, 4)) == (255, 0, 0)


def test_check_input_file_names_what_it_found(tmp_path):
    assert check_input_file(asset_path("portrait.png"), "image") == asset_path("portrait.png")
    with pytest.raises(MediaError, match=r"is a folder, expected an audio file"):
        check_input_file(tmp_path, "audio")
    with pytest.raises(MediaError, match=r"image file not found"):
        check_input_file(tmp_path / "nope.png", "image")


@pytest.mark.parametrize(
    ("size", "size_class", "bucket"),
    [
        ((512, 512), "480", (640, 640)),
        ((1000, 500), 480, (896, 448)),  # landscape 2:1
        ((384, 448), "480", (576, 704)),  # the shipped portrait: H/W = 1.17 -> 1.22
        ((720, 1280), "720", (704, 1280)),  # portrait 16:9
        ((960, 960), "720", (960, 960)),
    ],
)
def test_choose_bucket_takes_the_nearest_aspect(size, size_class, bucket):
    assert choose_bucket(*size, size_class) == bucket


@pytest.mark.parametrize(("size_class", "pixels"), [("480", 640 * 640), ("720", 960 * 960)])
def test_buckets_are_multiples_of_16_near_the_class_area(size_class, pixels):
    for ratio in np.geomspace(0.2, 5.0, 40):
        w, h = choose_bucket(1000, int(1000 * ratio), size_class)
        assert w % 16 == 0 and h % 16 == 0
        assert 0.85 < w * h / pixels < 1.15


def test_choose_bucket_rejects_unknown_classes():
    with pytest.raises(UnknownOptionError, match="1080"):
        choose_bucket(100, 100, "1080")


def test_resize_and_crop_covers_then_crops_the_centre():
    image = Image.new("RGB", (300, 100), "red")
    image.paste((0, 255, 0), (100, 0, 200, 100))  # the middle third is green
    image.paste((0, 0, 255), (200, 0, 300, 100))
    out = resize_and_crop(image, (64, 64))
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    inner = out[:, :, 2:-2]  # away from the band edges, where bilinear blends
    assert torch.all(inner[1] > 0.9) and torch.all(inner[0] < -0.9) and torch.all(inner[2] < -0.9)


def test_resize_and_crop_non_square_target():
    out = resize_and_crop(load_image(asset_path("portrait.png")), (576, 704))
    assert out.shape == (3, 704, 576)


# --- audio ---------------------------------------------------------------------------------


def test_wav_decodes_to_16k_mono(tmp_path):
    stereo = np.stack([_sine(1.5, 44100), _sine(1.5, 44100)], axis=1)
    wave = load_audio(_write_wav(tmp_path / "a.wav", stereo, 44100))
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(wave.size - 1.5 * 16000) <= 1
    assert abs(_peak_hz(wave, 16000) - 440) < 2  # the rate is right, not only the length


@pytest.mark.parametrize("suffix", [".mp3", ".m4a"])
def test_compressed_audio_decodes_to_the_right_length_and_rate(tmp_path, suffix):
    source = _write_wav(tmp_path / "a.wav", _sine(2.0, 22050), 22050)
    encoded = tmp_path / f"a{suffix}"
    subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(source), str(encoded)], check=True
    )
    wave = load_audio(encoded)
    assert abs(wave.size - 2.0 * 16000) <= 16000 / 25  # within one video frame
    assert abs(_peak_hz(wave, 16000) - 440) < 2


def test_loudness_lands_on_minus_23_lufs():
    wave = _sine(3.0, amp=0.05) + 0.01 * np.random.default_rng(0).standard_normal(48000).astype(np.float32)
    before = wave.copy()
    out = loudness_normalize(wave)
    assert abs(pyloudnorm.Meter(16000).integrated_loudness(out) + 23) < 0.5
    assert out.dtype == np.float32 and np.array_equal(wave, before)  # the input is untouched


@pytest.mark.parametrize(
    "wave",
    [np.zeros(32000, np.float32), _sine(2.0, amp=1e-6), _sine(0.3)],
    ids=["silence", "below-100-lufs", "shorter-than-the-meter-block"],
)
def test_loudness_is_left_alone_when_it_cannot_be_measured(wave):
    np.testing.assert_array_equal(loudness_normalize(wave), wave)


def test_mix_speakers_para_pads_to_the_longer():
    a1, a2 = np.ones(5, np.float32), np.full(3, 2.0, np.float32)
    m1, m2 = mix_speakers(a1, a2, "para")
    np.testing.assert_array_equal(m1, a1)
    np.testing.assert_array_equal(m2, [2, 2, 2, 0, 0])


def test_mix_speakers_add_takes_turns():
    a1, a2 = np.ones(2, np.float32), np.full(3, 2.0, np.float32)
    m1, m2 = mix_speakers(a1, a2, "add")
    np.testing.assert_array_equal(m1, [1, 1, 0, 0, 0])
    np.testing.assert_array_equal(m2, [0, 0, 2, 2, 2])


def test_mix_speakers_rejects_unknown_modes():
    with pytest.raises(UnknownOptionError, match="Did you mean 'para'"):
        mix_speakers(np.ones(2), np.ones(2), "parra")


def test_audio_errors(tmp_path):
    with pytest.raises(MediaError, match="not found"):
        load_audio(tmp_path / "missing.wav")
    with pytest.raises(MediaError, match="is a folder, expected an audio file"):
        load_audio(tmp_path)
    with pytest.raises(MediaError, match="no audio stream"):
        load_audio(asset_path("portrait.png"))
    garbage = tmp_path / "noise.wav"
    garbage.write_bytes(b"this is not audio" * 100)
    with pytest.raises(MediaError, match="not an audio file"):
        load_audio(garbage)
    with pytest.raises(MediaError, match="no audio samples"):
        load_audio(_write_wav(tmp_path / "empty.wav", np.zeros(0)))
    with pytest.raises(MediaError, match="silent"):
        load_audio(_write_wav(tmp_path / "quiet.wav", np.zeros(16000)))
    with pytest.raises(MediaError, match="shorter than 0.0400 s"):
        load_audio(_write_wav(tmp_path / "blip.wav", _sine(0.02)))


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_a_silent_array_is_refused_like_a_silent_file(tmp_path, kind):
    path = _write_wav(tmp_path / "quiet.wav", np.zeros(16000))
    with pytest.raises(MediaError) as from_file:
        load_audio(path)
    zeros = np.zeros(16000, np.float32) if kind == "numpy" else torch.zeros(16000)
    with pytest.raises(MediaError) as from_array:
        check_speech(zeros)
    assert str(from_array.value) == str(from_file.value).replace(str(path), "the audio array")
    assert "is silent" in str(from_array.value)
    speech = _sine(1.0)
    np.testing.assert_array_equal(check_speech(torch.from_numpy(speech)), speech)
    with pytest.raises(MediaError, match="NaN"):
        check_speech(np.full(16000, np.nan))
    with pytest.raises(ShapeError, match=r"mono \[samples\]"):
        check_speech(np.zeros((2, 16000)))


def test_the_pipeline_refuses_a_silent_array_as_it_refuses_a_silent_file():
    from wanstudio.pipeline import InfiniteTalkPipeline

    pipe = InfiniteTalkPipeline.tiny(seed=0)
    with pytest.raises(MediaError, match="the audio array is silent"):
        pipe(asset_path("portrait.png"), np.zeros(16000, np.float32), steps=1, max_frames=17, progress=False)


def test_the_pipeline_says_a_folder_is_a_folder(tmp_path):
    from wanstudio.pipeline import InfiniteTalkPipeline

    pipe = InfiniteTalkPipeline.tiny(seed=0)
    with pytest.raises(MediaError, match="is a folder, expected an image file"):
        pipe(tmp_path, asset_path("speech.wav"), steps=1, max_frames=17, progress=False)


def test_shipped_assets():
    portrait = load_image(asset_path("portrait.png"))
    assert min(portrait.size) >= 256 and max(portrait.size) <= 512
    speech = load_audio(asset_path("speech.wav"))
    assert 2.0 < speech.size / 16000 < 8.0
    assert probe_media(asset_path("speech.wav"))["sample_rate"] == 16000
    with pytest.raises(MediaError, match="portrait.png, speech.wav"):
        asset_path("nope.png")


# --- video ---------------------------------------------------------------------------------


def test_mp4_has_the_frames_duration_and_audio(tmp_path):
    path = write_video(tmp_path / "out.mp4", _frames(30), audio=_sine(1.2))
    info = probe_media(path)
    assert info["video_codec"] == "h264" and info["pix_fmt"] == "yuv420p"
    assert (info["width"], info["height"], info["fps"], info["frames"]) == (64, 48, 25.0, 30)
    assert abs(info["duration"] - 30 / 25) < 0.07  # AAC frames are 64 ms at 16 kHz
    assert info["has_audio"] and info["audio_codec"] == "aac"


def test_frames_stream_in_pieces_and_audio_is_cut_to_the_video(tmp_path):
    clip = torch.rand(3, 10, 32, 32) * 2 - 1  # one sample of VAE.decode output
    with VideoWriter(tmp_path / "out.mp4", audio=_sine(3.0)) as writer:
        for _ in range(3):
            writer.append(clip)
    info = probe_media(writer.path)
    assert info["frames"] == 30 and abs(info["duration"] - 1.2) < 0.07


def test_video_without_audio(tmp_path):
    info = probe_media(write_video(tmp_path / "out.mp4", _frames(5)))
    assert info["frames"] == 5 and not info["has_audio"]


def test_an_interrupted_write_leaves_no_partial_file(tmp_path, no_temp_files):
    with pytest.raises(KeyboardInterrupt), VideoWriter(tmp_path / "out.mp4", audio=_sine(1.0)) as w:
        w.append(_frames(10))
        raise KeyboardInterrupt


def test_an_interrupted_write_keeps_the_previous_file(tmp_path, no_temp_files):
    previous = write_video(tmp_path / "out.mp4", _frames(4))
    no_temp_files.add("out.mp4")
    content = previous.read_bytes()
    with pytest.raises(RuntimeError), VideoWriter(previous) as writer:
        writer.append(_frames(8))
        raise RuntimeError("generation failed")
    assert previous.read_bytes() == content


def test_closing_without_frames_is_an_error(tmp_path, no_temp_files):
    with pytest.raises(MediaError, match="no frames"), VideoWriter(tmp_path / "out.mp4"):
        pass


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        (np.zeros((2, 47, 64, 3), np.uint8), "even frame sizes"),
        (np.zeros((2, 48, 64, 3), np.float32), r"uint8 \[F, H, W, 3\]"),
        (torch.zeros(1, 3, 2, 48, 64), r"pass video\[0\]"),
    ],
)
def test_bad_frames_are_refused(tmp_path, no_temp_files, frames, message):
    with pytest.raises(ShapeError, match=message), VideoWriter(tmp_path / "out.mp4") as writer:
        writer.append(frames)


def test_stereo_audio_for_the_video_is_refused(tmp_path, no_temp_files):
    with pytest.raises(ShapeError, match="mono audio"):
        VideoWriter(tmp_path / "out.mp4", audio=np.zeros((100, 2), np.float32))


def test_frames_of_another_size_are_refused(tmp_path, no_temp_files):
    with pytest.raises(ShapeError, match="one size"), VideoWriter(tmp_path / "out.mp4") as writer:
        writer.append(_frames(2))
        writer.append(_frames(2, height=32))


def test_probe_rejects_non_media(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(MediaError, match="not a media file"):
        probe_media(junk)


# --- the output path ------------------------------------------------------------------------


def test_check_output_path_accepts_a_writable_video_path_and_makes_its_folder(tmp_path, no_temp_files):
    path = tmp_path / "new" / "deeper" / "talk.mp4"
    assert check_output_path(path) == path
    assert path.parent.is_dir() and not any(path.parent.iterdir())  # the probe file is gone
    no_temp_files.add("new")
    assert check_output_path(str(tmp_path / "new" / "TALK.MOV")) == tmp_path / "new" / "TALK.MOV"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "it is a folder. Pass a file in it"),
        ("talk.wav", r"expected a name ending in \.mp4, \.m4v, \.mov, found '\.wav'"),
        ("talk", r"found 'no suffix'\. Pass e\.g\. .*talk\.mp4"),
        ("file.txt/talk.mp4", "a part of the folder path is a file"),
    ],
)
def test_check_output_path_refuses_what_cannot_be_written(tmp_path, name, message):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(MediaError, match=message):
        check_output_path(tmp_path / name)


@pytest.mark.parametrize(
    ("code", "reason"),
    [(errno.EROFS, "the file system is read-only"), (errno.EACCES, "permission denied")],
)
def test_check_output_path_tries_a_file_in_the_folder(tmp_path, monkeypatch, no_temp_files, code, reason):
    tried = []

    def refuse(path, *args, **kwargs):
        tried.append(os.fspath(path))
        raise OSError(code, os.strerror(code), os.fspath(path))

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(MediaError, match=f"cannot write the video to .*out.mp4: {reason}"):
        check_output_path(tmp_path / "out.mp4")
    assert re.fullmatch(rf".*/\.out\.mp4\.{os.getpid()}\.[0-9a-f]{{8}}\.probe\.part", tried[0])


def test_video_temp_files_carry_the_writers_pid(tmp_path):
    with VideoWriter(tmp_path / "out.mp4", audio=_sine(0.5)) as writer:
        writer.append(_frames(4))
        parts = (writer._video_part, writer._muxed_part)  # ffmpeg may not have created them yet
    pid = os.getpid()
    assert {p.parent for p in parts} == {tmp_path}
    assert re.fullmatch(rf"\.out\.mp4\.{pid}\.[0-9a-f]{{8}}\.video\.part", parts[0].name)
    assert re.fullmatch(rf"\.out\.mp4\.{pid}\.[0-9a-f]{{8}}\.part", parts[1].name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]
