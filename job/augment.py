"""Data augmentation, drawn on the images' device: the weak transforms of every training batch (random whole-pixel
shifts, rotations, elastic distortion: VAT_TRANSLATE_PX, VAT_ROTATE_DEG, VAT_ELASTIC_PX) and the strong view of
FixMatch and UDA drawn for handwriting, where each image gets its own random shift, rotation, shear, scale, elastic
distortion and cutout square (VAT_STRONG_*).

Everything is drawn from the device's default generator, with no host round trip: a CUDA graph replays it, and a
checkpoint's generator state makes a resumed run draw the very same transforms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from job.data import as_float_batch


def drawn(indices: torch.Tensor, batch_size: int) -> torch.Tensor:
    """A uniform draw of `batch_size` of `indices` without replacement (all of them, in order, when that is all)."""
    if batch_size >= len(indices):
        return indices
    return indices[torch.rand(len(indices), device=indices.device).topk(batch_size, sorted=False).indices]


def training_batch(
    images_uint8: torch.Tensor,
    indices: torch.Tensor,
    batch_size: int,
    shift_px: int = 0,
    rotate_deg: float = 0.0,
    elastic_px: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of `drawn(indices, batch_size)` as channels-last floats, each randomly shifted by up to `shift_px`
    pixels, then turned by up to `rotate_deg` degrees and elastically distorted by `elastic_px` pixels
    (`randomly_deformed`); returns (images, indices)."""
    indices = drawn(indices, batch_size)
    batch = as_float_batch(randomly_shifted(images_uint8[indices], shift_px), channels_last=True)
    return randomly_deformed(batch, rotate_deg, elastic_px), indices


def randomly_shifted(images_uint8: torch.Tensor, max_px: int) -> torch.Tensor:
    """Each image moved by its own random whole-pixel shift in [-max_px, max_px] along each axis (zeros fill in).

    Beyond the article (VAT_TRANSLATE_PX). Drawn on the images' device from its default generator, without a
    host round trip, so it works inside a CUDA graph and a resumed run draws the same shifts.
    """
    if max_px == 0:
        return images_uint8
    n, height, width = images_uint8.shape
    padded = F.pad(images_uint8, (max_px, max_px, max_px, max_px))
    offsets = torch.randint(0, 2 * max_px + 1, (2, n, 1), device=images_uint8.device)
    rows = offsets[0] + torch.arange(height, device=images_uint8.device)
    cols = offsets[1] + torch.arange(width, device=images_uint8.device)
    batch = torch.arange(n, device=images_uint8.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]


ELASTIC_SMOOTHING_PX = 4.0  # Simard et al. (2003): the displacement field is white noise blurred with this sigma


def randomly_deformed(batch: torch.Tensor, max_deg: float, elastic_px: float) -> torch.Tensor:
    """Each image of a float batch [N, 1, S, S] turned about its centre by its own random angle in [-max_deg, max_deg]
    degrees (VAT_ROTATE_DEG), and displaced along a smooth random field whose two components have a standard
    deviation of `elastic_px` pixels at every pixel (Simard et al.'s elastic distortion, VAT_ELASTIC_PX: strokes
    bend, loops open or close, as another hand would write them). Beyond the article; drawn on the device like the
    shifts; with both at 0 the batch is returned as it is and nothing is drawn."""
    if max_deg == 0 and elastic_px == 0:
        return batch
    n, size = len(batch), batch.shape[-1]
    angles = torch.zeros(n, device=batch.device)
    if max_deg:
        angles = (torch.rand(n, device=batch.device) * 2 - 1) * math.radians(max_deg)
    displacement = None
    if elastic_px:
        displacement = smooth_noise(n, size, ELASTIC_SMOOTHING_PX, batch.device) * (elastic_px * 2 / size)
    return warped(batch, angles, displacement)


def smooth_noise(n: int, size: int, sigma_px: float, device: torch.device) -> torch.Tensor:
    """[n, size, size, 2] Gaussian white noise blurred by a Gaussian of `sigma_px`, rescaled to unit variance."""
    radius = math.ceil(3 * sigma_px)
    taps = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps / sigma_px) ** 2)
    kernel = kernel / kernel.norm()  # unit L2 norm along each axis: blurred unit-variance noise keeps variance 1
    noise = torch.randn(2 * n, 1, size + 2 * radius, size + 2 * radius, device=device)
    blurred = F.conv2d(F.conv2d(noise, kernel.view(1, 1, -1, 1)), kernel.view(1, 1, 1, -1))
    return blurred.view(n, 2, size, size).permute(0, 2, 3, 1)


def warped(batch: torch.Tensor, angles: torch.Tensor, displacement: torch.Tensor | None = None) -> torch.Tensor:
    """Image i of a float batch of square images [N, 1, S, S] turned by angles[i] radians about its centre, then
    displaced by `displacement` ([N, S, S, 2], in grid_sample's [-1, 1] units); bilinear, zeros fill in,
    channels-last. The sampling grid is built elementwise, not by affine_grid's matmul, which TF32 would round on
    a GPU (angle 0 would not be the identity there)."""
    n, _, size, width = batch.shape
    if size != width:
        raise ValueError(f"warped() needs square images, got {size}x{width}")
    # Pixel centres in [-1, 1] (align_corners=False); the output pixel (x, y) samples the input at R(angle) (x, y).
    coords = (torch.arange(size, device=batch.device, dtype=batch.dtype) * 2 + 1) / size - 1
    x, y = coords.view(1, 1, size), coords.view(1, size, 1)
    angles = angles.to(batch.dtype).view(n, 1, 1)
    cos, sin = angles.cos(), angles.sin()
    grid = torch.stack([cos * x - sin * y, sin * x + cos * y], dim=3)
    if displacement is not None:
        grid = grid + displacement.to(batch.dtype)
    sampled = F.grid_sample(batch, grid, align_corners=False)
    return sampled.contiguous(memory_format=torch.channels_last)


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
