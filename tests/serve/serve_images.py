"""Image files of known classes for the serving tests: the tiny CIFAR-10's class prototypes
(:mod:`balpoe.data.synthetic`, what ``formats.write_cifar`` writes) with fresh noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from balpoe.data.synthetic import synthetic_images


def class_images(labels, seed: int = 3) -> np.ndarray:
    """uint8 ``[N, 32, 32, 3]`` images of the given CIFAR classes (the training prototypes + fresh noise)."""
    x = synthetic_images(np.asarray(labels), 10, 3, 32, np.random.default_rng(seed))
    return x.transpose(0, 2, 3, 1).copy()


def write_images(folder: Path, labels, fmt: str = "PNG", seed: int = 3) -> list[Path]:
    """One image file per label (``<i>_c<label>.png``) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (x, c) in enumerate(zip(class_images(labels, seed), labels)):
        p = folder / f"{i:03d}_c{c}.{'png' if fmt == 'PNG' else 'jpg'}"
        Image.fromarray(x).save(p, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        paths.append(p)
    return paths
