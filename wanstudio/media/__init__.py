"""Media files: read the portrait (or a source video) and the speech, write the mp4.

Audio and video go through the ffmpeg binary bundled with imageio-ffmpeg (any format it reads);
images through PIL. A file that cannot be read or written raises MediaError naming the file and
what to do; an array of the wrong shape raises ShapeError.
"""

from __future__ import annotations

from .audio import check_speech, load_audio, loudness_normalize, mix_speakers
from .common import ASSETS, SAMPLE_RATE, SILENCE_PEAK, VIDEO_FPS, asset_path, check_input_file
from .images import MAX_IMAGE_PIXELS, choose_bucket, load_image, resize_and_crop
from .source_video import VIDEO_INPUT_SUFFIXES, VideoReader, file_digest, is_video_file
from .video import VIDEO_SUFFIXES, VideoWriter, check_output_path, probe_media, write_video

__all__ = [
    "ASSETS",
    "MAX_IMAGE_PIXELS",
    "SAMPLE_RATE",
    "SILENCE_PEAK",
    "VIDEO_FPS",
    "VIDEO_INPUT_SUFFIXES",
    "VIDEO_SUFFIXES",
    "VideoReader",
    "VideoWriter",
    "asset_path",
    "check_input_file",
    "check_output_path",
    "check_speech",
    "choose_bucket",
    "file_digest",
    "is_video_file",
    "load_audio",
    "load_image",
    "loudness_normalize",
    "mix_speakers",
    "probe_media",
    "resize_and_crop",
    "write_video",
]
