"""Test images as uint8 tensors and their PIL twins, for comparing the batched device ops with PIL
and torchvision on the same pixels."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def uint8_batch(c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Four images ``[4, c, h, w]``: random, narrow-range (autocontrast/equalize do something),
    constant, random."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (4, c, h, w), generator=g, dtype=torch.uint8)
    x[1] = x[1] // 5 + 90
    x[2] = 77
    return x


def to_pil(img: torch.Tensor) -> Image.Image:
    """``uint8 [C, H, W]`` -> a PIL image (mode L for one channel, RGB for three)."""
    a = img.permute(1, 2, 0).numpy()
    return Image.fromarray(a[..., 0] if a.shape[2] == 1 else a)


def from_pil(im: Image.Image, c: int) -> torch.Tensor:
    """A PIL image -> ``uint8 [c, H, W]``."""
    a = torch.from_numpy(np.array(im))
    return a.unsqueeze(0) if c == 1 else a.permute(2, 0, 1)
