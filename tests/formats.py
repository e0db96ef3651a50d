"""Writers of tiny datasets in exactly the real on-disk formats, for tests.

* :func:`write_cifar` -- the CIFAR-10/100 python-pickle layout (Krizhevsky 2009).
* :func:`write_fashion_mnist` -- IDX files (magic 2051 images / 2049 labels), gzipped or not.
* :func:`write_image_list` -- JPEG/PNG files plus ``path label`` list files (ImageNet-LT,
  Places-LT, iNaturalist 2018 naming).

Images are learnable class prototypes plus noise (:mod:`balpoe.data.synthetic`); everything is
deterministic in ``seed``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from balpoe.data.cifar import save_cifar
from balpoe.data.fashion_mnist import save_fashion_mnist, save_idx
from balpoe.data.synthetic import synthetic_images, synthetic_labels

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
LIST_FILES = {
    "imagenet_lt": ("ImageNet_LT_train.txt", "ImageNet_LT_test.txt"),
    "places_lt": ("Places_LT_train.txt", "Places_LT_test.txt"),
    "inat": ("iNaturalist18_train.txt", "iNaturalist18_val.txt"),
}


def _per_class(n: int | Sequence[int], num_classes: int) -> list[int]:
    counts = [int(n)] * num_classes if np.isscalar(n) else [int(x) for x in n]
    if len(counts) != num_classes:
        raise ValueError(f"{len(counts)} per-class counts for {num_classes} classes")
    return counts


def write_cifar_arrays(root: str | Path, num_classes: int, train: tuple[np.ndarray, np.ndarray],
                       test: tuple[np.ndarray, np.ndarray], class_names: Sequence[str] | None = None) -> Path:
    """Write given ``(images uint8 [N, 3, 32, 32], labels [N])`` in the CIFAR-10/100 pickle layout
    under ``root`` (``balpoe.data.cifar.save_cifar``); returns ``root``."""
    if class_names is None and num_classes == 10:
        class_names = CIFAR10_NAMES
    return save_cifar(root, num_classes, train, test, list(class_names) if class_names else None)


def write_cifar(root: str | Path, num_classes: int, train_per_class: int | Sequence[int],
                test_per_class: int, seed: int = 0) -> Path:
    """Write a tiny learnable CIFAR-10 (``cifar-10-batches-py``: five ``data_batch_i``,
    ``test_batch``, ``batches.meta``) or CIFAR-100 (``cifar-100-python``: ``train``, ``test``,
    ``meta``) under ``root``; returns ``root`` (what ``load_cifar`` takes).
    ``train_per_class`` may be a list of per-class counts (e.g. an already long-tailed split)."""
    if num_classes not in (10, 100):
        raise ValueError("CIFAR has 10 or 100 classes")
    rng = np.random.default_rng(seed)
    train_y = synthetic_labels(_per_class(train_per_class, num_classes), rng)
    test_y = synthetic_labels(_per_class(test_per_class, num_classes), rng)
    train_x = synthetic_images(train_y, num_classes, 3, 32, rng)
    test_x = synthetic_images(test_y, num_classes, 3, 32, rng)
    return write_cifar_arrays(root, num_classes, (train_x, train_y), (test_x, test_y))


def write_idx(path: str | Path, array: np.ndarray, magic: int, gz: bool = True) -> Path:
    """One IDX file (``balpoe.data.fashion_mnist.save_idx``)."""
    return save_idx(path, array, magic, gz)


def write_fashion_mnist_arrays(root: str | Path, train: tuple[np.ndarray, np.ndarray],
                               test: tuple[np.ndarray, np.ndarray], gz: bool = True) -> Path:
    """The four Fashion-MNIST IDX files directly in ``root`` (``balpoe.data.fashion_mnist.save_fashion_mnist``)."""
    return save_fashion_mnist(root, train, test, gz)


def write_fashion_mnist(root: str | Path, train_per_class: int | Sequence[int], test_per_class: int,
                        seed: int = 0, gz: bool = True) -> Path:
    """Write tiny learnable ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` directly in
    ``root``; returns ``root``."""
    rng = np.random.default_rng(seed)
    splits = []
    for per_class in (train_per_class, test_per_class):
        y = synthetic_labels(_per_class(per_class, 10), rng)
        splits.append((synthetic_images(y, 10, 1, 28, rng), y))
    return write_fashion_mnist_arrays(root, splits[0], splits[1], gz)


def _relpath(kind: str, split: str, c: int, i: int, ext: str) -> str:
    if kind == "imagenet_lt":
        wnid = f"n{c:08d}"
        return f"{split}/{wnid}/{wnid}_{i}.{ext}"
    if kind == "places_lt":
        return f"data_256/c/class{c:03d}/{split}_{i:08d}.{ext}"
    return f"train_val2018/Kingdom/{c}/{split}_{i:06d}.{ext}"


def write_image_list(root: str | Path, kind: str, num_classes: int, train_per_class: int | Sequence[int],
                     test_per_class: int, size: int = 32, seed: int = 0, image_format: str = "JPEG") -> Path:
    """Write tiny RGB images under ``root`` and the conventional list files (e.g.
    ``ImageNet_LT_train.txt``) whose lines are ``relative/path label``; returns ``root``.
    ``image_format`` is ``"JPEG"`` (as the real datasets; lossy) or ``"PNG"`` (lossless)."""
    if kind not in LIST_FILES:
        raise ValueError(f"kind must be one of {sorted(LIST_FILES)}")
    ext = {"JPEG": "JPEG" if kind == "imagenet_lt" else "jpg", "PNG": "png"}[image_format]
    root = Path(root)
    rng = np.random.default_rng(seed)
    splits = (("train", _per_class(train_per_class, num_classes)), ("val" if kind != "places_lt" else "test",
                                                                    _per_class(test_per_class, num_classes)))
    for (split, counts), list_name in zip(splits, LIST_FILES[kind]):
        labels = np.repeat(np.arange(num_classes), counts)
        images = synthetic_images(labels, num_classes, 3, size, rng)
        lines = []
        seen = [0] * num_classes
        for x, c in zip(images, labels.tolist()):
            rel = _relpath(kind, split, c, seen[c], ext)
            seen[c] += 1
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x.transpose(1, 2, 0)).save(path, format=image_format, **(
                {"quality": 95, "subsampling": 0} if image_format == "JPEG" else {}))
            lines.append(f"{rel} {c}")
        (root / list_name).write_text("\n".join(lines) + "\n")
    return root
