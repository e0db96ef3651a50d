"""Learnable synthetic images, for tests and speed benchmarks in the real on-disk formats.

Every class has a fixed prototype (a class-specific mean brightness plus a coarse, left-right
symmetric random pattern, so horizontal flips keep the class signal); each image adds integer
noise to it.  Deterministic in the generator; prototypes depend only on the class index and
image shape, so a training and a test split share them.  Write them with the readers' inverse
writers (:func:`balpoe.data.cifar.save_cifar`, :func:`balpoe.data.fashion_mnist.save_fashion_mnist`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def class_prototypes(num_classes: int, channels: int, size: int, grid: int = 4) -> np.ndarray:
    """float32 ``[num_classes, channels, size, size]`` prototypes in about [20, 235]."""
    protos = np.empty((num_classes, channels, size, size), dtype=np.float32)
    half = (grid + 1) // 2
    for c in range(num_classes):
        rng = np.random.default_rng(10_007 + c)
        brightness = 60.0 + 135.0 * (c / max(num_classes - 1, 1))
        coarse = rng.uniform(-1.0, 1.0, size=(channels, grid, half))
        coarse = np.concatenate([coarse, coarse[:, :, : grid - half][:, :, ::-1]], axis=2)  # mirror
        rows = (np.arange(size) * grid) // size
        protos[c] = brightness + 55.0 * coarse[:, rows][:, :, rows]
    return protos


def synthetic_images(labels: np.ndarray, num_classes: int, channels: int, size: int,
                     rng: np.random.Generator, noise: int = 20) -> np.ndarray:
    """uint8 ``[N, channels, size, size]``: the class prototype of each label plus noise (the sum
    of two uniform integers in ``[-noise, noise]``, std about ``0.82 * noise``)."""
    protos = np.rint(class_prototypes(num_classes, channels, size)).astype(np.int16)
    labels = np.asarray(labels, dtype=np.int64)
    out = np.empty((len(labels), channels, size, size), dtype=np.uint8)
    for s in range(0, len(labels), 4096):
        x = protos[labels[s:s + 4096]]
        x += rng.integers(-noise, noise + 1, size=x.shape, dtype=np.int16)
        x += rng.integers(-noise, noise + 1, size=x.shape, dtype=np.int16)
        out[s:s + 4096] = np.clip(x, 0, 255)
    return out


def synthetic_labels(counts: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """int64 labels with ``counts[c]`` images of class ``c``, in a shuffled order (like real files)."""
    labels = np.repeat(np.arange(len(counts)), [int(c) for c in counts]).astype(np.int64)
    rng.shuffle(labels)
    return labels


def synthetic_split(counts: Sequence[int], channels: int, size: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, channels, size, size], labels [N])`` with the given per-class counts."""
    labels = synthetic_labels(counts, rng)
    return synthetic_images(labels, len(counts), channels, size, rng), labels
