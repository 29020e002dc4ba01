"""Generation pipelines: samplers, guidance, the InfiniteTalk long-video loop, colour match."""

from .color import match_colors
from .guidance import Condition, Guidance, GuidanceConfig
from .infinitetalk import (
    DEFAULT_NEGATIVE_PROMPT,
    ClipPlan,
    GeneratedVideo,
    InfiniteTalkPipeline,
    check_components,
    default_speaker_boxes,
)
from .official_input import official_box_to_xyxy, read_input_json
from .progress import ProgressEvent, TqdmProgress
from .resume import WorkFolder
from .sampler import (
    DistillSampler,
    EulerSampler,
    UniPCSampler,
    distill_step_list,
    make_sampler,
    shift_timesteps,
    timestep_schedule,
)

__all__ = [
    "DEFAULT_NEGATIVE_PROMPT",
    "ClipPlan",
    "Condition",
    "DistillSampler",
    "EulerSampler",
    "GeneratedVideo",
    "Guidance",
    "GuidanceConfig",
    "InfiniteTalkPipeline",
    "ProgressEvent",
    "TqdmProgress",
    "UniPCSampler",
    "WorkFolder",
    "check_components",
    "default_speaker_boxes",
    "distill_step_list",
    "make_sampler",
    "match_colors",
    "official_box_to_xyxy",
    "read_input_json",
    "shift_timesteps",
    "timestep_schedule",
]
