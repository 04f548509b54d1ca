"""Tutorial 001's augmentation drawn on the fly, in batched tensor ops (twin of `parity/augment.py`).

Rotation by an integer angle in [-15, 15] degrees, then a shift by integers in [shift_low, shift_high) pixels on
each axis, empty pixels filled with each image's median, like the tutorial's `scipy.ndimage` calls. The
interpolation is bilinear where ndimage uses cubic splines, so the copies are close, not identical: use
`augment="tut001"` (the pre-generated arrays) for exact reproduction.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_rotate_shift(x: torch.Tensor, max_degrees: int = 15, shift_low: int = -2, shift_high: int = 2,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 1, H, W) float -> same shape, each image rotated and shifted by its own random draw."""
    if x.ndim != 4:
        raise ValueError(f"expected (B, C, H, W), got {tuple(x.shape)}")
    b = x.shape[0]
    # drawn where the images are (a GPU: no host-to-device copy per batch), or where the generator is
    device = generator.device if generator is not None else x.device
    degrees = torch.randint(-max_degrees, max_degrees + 1, (b,), generator=generator, device=device)
    shifts = torch.randint(shift_low, shift_high, (b, 2), generator=generator, device=device)  # (rows, cols)
    return rotate_shift(x, degrees, shifts)


def rotate_shift(x: torch.Tensor, degrees: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) rotated by `degrees` (B,) about the centre, then shifted by `shifts` (B, 2) pixels (rows,
    cols), the order of the tutorial's `ndimage.shift(ndimage.rotate(x, angle, reshape=False), shift)`."""
    if x.ndim != 4:
        raise ValueError(f"expected (B, C, H, W), got {tuple(x.shape)}")
    b, _, h, w = x.shape
    device = x.device
    angles = degrees.to(device, torch.float64) * (math.pi / 180)
    cos, sin = torch.cos(angles).to(x.dtype), torch.sin(angles).to(x.dtype)
    rotation = torch.empty(b, 2, 2, device=device, dtype=x.dtype)  # normalized coordinates, (x, y) order
    rotation[:, 0, 0], rotation[:, 0, 1] = cos, -sin * h / w
    rotation[:, 1, 0], rotation[:, 1, 1] = sin * w / h, cos
    shift = torch.stack([shifts[:, 1] * 2 / w, shifts[:, 0] * 2 / h], dim=1).to(device, x.dtype)
    # output pixel q -> input pixel R (q - shift): undo the shift first, then the rotation about the centre
    theta = torch.cat([rotation, -(rotation @ shift.unsqueeze(2))], dim=2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    background = x.flatten(1).median(dim=1).values.view(b, 1, 1, 1)
    # sampling (x - background) with zero padding fills the uncovered area with the background value
    return F.grid_sample(x - background, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + background
