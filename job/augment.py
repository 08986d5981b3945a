"""Strong augmentation, the "strong" view of FixMatch and UDA drawn for handwriting: each image gets its own random
whole-pixel shift, rotation, shear, scale, elastic distortion and cutout square (VAT_STRONG_*).

It is built from job/data.py's transforms (`randomly_shifted`, `warped`, `smooth_noise`) and, like them, draws
everything on the images' device from that device's default generator, with no host round trip: a CUDA graph
replays it, and a checkpoint's generator state makes a resumed run draw the very same transforms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from job.data import ELASTIC_SMOOTHING_PX, as_float_batch, randomly_shifted, smooth_noise, warped


@dataclass(frozen=True)
class StrongAugmentation:
    """The limits of the random transform; 0 leaves a part out (a whole-pixel shift of 0, no cutout...)."""

    translate_px: int
    rotate_deg: float
    shear_deg: float
    scale: float  # the digit is drawn at a size in [1 - scale, 1 + scale] times its own
    elastic_px: float
    cutout_px: int  # the side of the square blanked out

    @classmethod
    def from_settings(cls, settings: Any) -> StrongAugmentation:
        return cls(
            translate_px=settings.strong_translate_px,
            rotate_deg=settings.strong_rotate_deg,
            shear_deg=settings.strong_shear_deg,
            scale=settings.strong_scale,
            elastic_px=settings.strong_elastic_px,
            cutout_px=settings.strong_cutout_px,
        )


def strongly_augmented(images_uint8: torch.Tensor, strength: StrongAugmentation) -> torch.Tensor:
    """uint8 [N, S, S] -> channels-last floats [N, 1, S, S] in [0, 1]: each image shifted, then turned, sheared,
    scaled and elastically distorted in one bilinear resampling (zeros fill in), then a square of it blanked out."""
    batch = as_float_batch(randomly_shifted(images_uint8, strength.translate_px), channels_last=True)
    n, size, device = len(batch), batch.shape[-1], batch.device
    displacement = affine_displacement(random_affine(n, strength, device), size)
    if strength.elastic_px:
        elastic = smooth_noise(n, size, ELASTIC_SMOOTHING_PX, device) * (strength.elastic_px * 2 / size)
        displacement = displacement + elastic
    # Angle 0: the affine part travels in the displacement, so `warped` builds its grid elementwise as it does for
    # the weak warps (affine_grid's matmul would be rounded by TF32 on a GPU).
    batch = warped(batch, torch.zeros(n, device=device), displacement)
    return cut_out(batch, strength.cutout_px)


def random_affine(n: int, strength: StrongAugmentation, device: torch.device) -> torch.Tensor:
    """[n, 2, 2]: per image, where an output pixel samples the input (grid_sample's units): the inverse of a turn by
    up to rotate_deg, a horizontal shear by up to shear_deg and a scaling within [1 - scale, 1 + scale]."""
    uniform = torch.rand(3, n, device=device) * 2 - 1  # in [-1, 1): angle, shear, scale, one each per image
    angle = uniform[0] * math.radians(strength.rotate_deg)
    shear = torch.tan(uniform[1] * math.radians(strength.shear_deg))
    size = 1 + uniform[2] * strength.scale
    cos, sin = angle.cos(), angle.sin()
    # (rotation @ shear) / size, written out: [[cos, cos * shear - sin], [sin, sin * shear + cos]] / size.
    matrix = torch.stack([cos, cos * shear - sin, sin, sin * shear + cos], dim=1) / size[:, None]
    return matrix.view(n, 2, 2)


def affine_displacement(matrices: torch.Tensor, size: int) -> torch.Tensor:
    """[n, size, size, 2]: how far each pixel centre's sampling point moves under `matrices` ([n, 2, 2], about the
    image's centre), as `warped` adds it to the identity grid; elementwise, no matmul."""
    coords = (torch.arange(size, device=matrices.device, dtype=matrices.dtype) * 2 + 1) / size - 1
    x, y = coords.view(1, 1, size), coords.view(1, size, 1)
    m = matrices.view(-1, 4, 1, 1)
    return torch.stack([m[:, 0] * x + m[:, 1] * y - x, m[:, 2] * x + m[:, 3] * y - y], dim=3)


def cut_out(batch: torch.Tensor, side_px: int) -> torch.Tensor:
    """Each image of [N, 1, S, S] with its own side_px square set to 0 (background), centred on a random pixel, so
    that a square near an edge is partly outside the image (DeVries and Taylor's cutout, as FixMatch uses it)."""
    if side_px == 0:
        return batch
    n, size = len(batch), batch.shape[-1]
    pixels = torch.arange(size, device=batch.device)
    first = (torch.rand(2, n, 1, device=batch.device) * size).long() - side_px // 2  # top row, left column
    rows = (pixels >= first[0]) & (pixels < first[0] + side_px)
    cols = (pixels >= first[1]) & (pixels < first[1] + side_px)
    square = (rows[:, :, None] & cols[:, None, :]).unsqueeze(1)
    return batch.masked_fill(square, 0.0).contiguous(memory_format=torch.channels_last)
