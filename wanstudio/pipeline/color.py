"""Lab colour matching of decoded frames to the reference image (docs/WAN_SPEC.md §6).

Each frame's per-channel CIELAB mean and standard deviation are moved to the reference's, the
result is converted back to RGB and blended with the frame by ``strength``. Long videos drift in
colour clip after clip; this pulls every clip back before its last frames seed the next one.
Conversions follow the sRGB / D65 formulas (the same as scikit-image's ``rgb2lab``), in fp64.
"""

from __future__ import annotations

import torch

from ..errors import PipelineError

# linear sRGB -> CIE XYZ (D65), and the D65 white point (2 degree observer)
_XYZ_FROM_RGB = torch.tensor(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]],
    dtype=torch.float64,
)
_WHITE_D65 = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)
_EPS = 0.008856  # (6/29)^3
_KAPPA = 7.787  # (29/6)^2 / 3


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """rgb [..., 3] in [0, 1] -> Lab [..., 3] (L in [0, 100]); fp64."""
    rgb = rgb.double()
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = linear @ _XYZ_FROM_RGB.to(rgb.device).T / _WHITE_D65.to(rgb.device)
    f = torch.where(xyz > _EPS, xyz.clamp_min(0) ** (1 / 3), _KAPPA * xyz + 16 / 116)
    fx, fy, fz = f.unbind(-1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=-1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Lab [..., 3] -> rgb [..., 3] clipped to [0, 1]; fp64."""
    lab = lab.double()
    L, a, b = lab.unbind(-1)
    fy = (L + 16) / 116
    f = torch.stack([fy + a / 500, fy, (fy - b / 200).clamp_min(0)], dim=-1)
    xyz = torch.where(f > 0.2068966, f**3, (f - 16 / 116) / _KAPPA) * _WHITE_D65.to(lab.device)
    linear = xyz @ torch.linalg.inv(_XYZ_FROM_RGB).to(lab.device).T
    linear = linear.clamp_min(0)
    rgb = torch.where(linear > 0.0031308, 1.055 * linear ** (1 / 2.4) - 0.055, 12.92 * linear)
    return rgb.clamp(0, 1)


def match_colors(frames: torch.Tensor, reference: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Match each frame's Lab statistics to ``reference`` and blend by ``strength``.

    frames [3, F, H, W] in [-1, 1]; reference [3, H', W'] in [-1, 1]. Returns a new
    [3, F, H, W] tensor in [-1, 1] of the frames' dtype; ``strength`` 0 returns ``frames``.
    """
    if not 0.0 <= strength <= 1.0:
        raise PipelineError(f"color_correction must be in [0, 1], got {strength}")
    if strength == 0.0:
        return frames
    ref_lab = rgb_to_lab(((reference.permute(1, 2, 0) + 1) / 2).clamp(0, 1))  # (H', W', 3)
    ref_mean = ref_lab.mean(dim=(0, 1))
    ref_std = ref_lab.std(dim=(0, 1), correction=0)
    out = torch.empty_like(frames)
    for i in range(frames.shape[1]):  # one frame at a time: fp64 Lab of a whole clip is large
        src = ((frames[:, i].permute(1, 2, 0).double() + 1) / 2).clamp(0, 1)  # (H, W, 3)
        lab = rgb_to_lab(src)
        mean, std = lab.mean(dim=(0, 1)), lab.std(dim=(0, 1), correction=0)
        flat = std == 0  # a flat channel takes the reference mean
        scale = torch.where(flat, torch.zeros_like(std), ref_std / torch.where(flat, 1.0, std))
        matched = lab_to_rgb((lab - mean) * scale + ref_mean)
        blended = (1 - strength) * src + strength * matched
        out[:, i] = (blended * 2 - 1).permute(2, 0, 1).to(frames.dtype)
    return out
