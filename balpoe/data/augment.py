"""Batched, per-sample augmentation on the training device (no PIL, no worker processes).

Order as the official torchvision pipeline: random crop with zero padding -> random horizontal
flip -> random rotation in [-deg, deg] (nearest, zero fill, about the centre) -> /255 ->
normalise.  Every sample draws its own offsets, flip and angle from the given generator.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange


def random_crop_flip(x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Per-sample ``RandomCrop(size, padding)`` + ``RandomHorizontalFlip`` on a uint8 batch ``[B, C, H, W]``."""
    b, _, h, w = x.shape
    dev = x.device
    if padding:
        x = F.pad(x, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (b, 1), device=dev, generator=generator)
        ox = torch.randint(0, 2 * padding + 1, (b, 1), device=dev, generator=generator)
    else:
        oy = ox = torch.zeros(b, 1, dtype=torch.long, device=dev)
    rows = oy + torch.arange(h, device=dev)
    cols = ox + torch.arange(w, device=dev)
    if flip:
        flips = torch.rand(b, 1, device=dev, generator=generator) < 0.5
        cols = torch.where(flips, cols.flip(1), cols)
    if not padding and not flip:
        return x
    out = x[torch.arange(b, device=dev)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return rearrange(out, "b h w c -> b c h w")  # advanced indexing put the channel axis last


def random_rotation(x: torch.Tensor, degrees: float, generator: torch.Generator) -> torch.Tensor:
    """Per-sample ``RandomRotation(degrees)`` (nearest, fill 0) of a float batch ``[B, C, H, W]``."""
    b, _, h, w = x.shape
    angle = (torch.rand(b, device=x.device, generator=generator) * 2 - 1) * (degrees * math.pi / 180)
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(cos)
    # Normalised coordinates; the aspect factors keep the rotation rigid for non-square images.
    theta = torch.stack([torch.stack([cos, -sin * h / w, zero], -1),
                         torch.stack([sin * w / h, cos, zero], -1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(x / 255 - mean) / std`` for a batch in [0, 255]; ``mean``/``std`` are ``[C]``."""
    scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1)
    shift = (mean / std).view(1, -1, 1, 1)
    return x.float().mul(scale).sub_(shift)


def augment_batch(x: torch.Tensor, padding: int, flip: bool, rotation: float,
                  generator: torch.Generator) -> torch.Tensor:
    """Crop + flip (uint8) then rotation; returns float in [0, 255]."""
    x = random_crop_flip(x, padding, flip, generator).float()
    if rotation:
        x = random_rotation(x, rotation, generator)
    return x
