"""The dataset registry: one dict from ``data.dataset`` names to :class:`DatasetSpec`.

To add a dataset, write a reader ``read(cfg, split) -> ArraySplit | FileSplit`` (``cfg`` is the
recipe's ``data`` section, ``split`` is ``"train"`` or ``"test"``) and register it, either with an
entry in :data:`DATASETS` below or from your own code::

    from balpoe.data.registry import DatasetSpec, register_dataset
    register_dataset("my_data", DatasetSpec(read=my_reader, mean=(0.5,), std=(0.25,)))

:class:`~balpoe.data.bundle.ArraySplit` datasets (small, in memory) are served from the training
device with batched augmentation; :class:`~balpoe.data.bundle.FileSplit` datasets (image files)
through a ``DataLoader`` with torchvision transforms.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from balpoe.data.bundle import ArraySplit, FileSplit
from balpoe.data.cifar import load_cifar
from balpoe.data.fashion_mnist import load_fashion_mnist
from balpoe.data.image_list import IMAGENET_MEAN, IMAGENET_STD, INAT_MEAN, INAT_STD, default_list_files, list_split
from balpoe.errors import BalpoeError

# The official BalPoE code normalises CIFAR-100 with CIFAR-10's statistics.
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)


@dataclass(frozen=True)
class DatasetSpec:
    """How to read a dataset and what its images need.

    ``read(cfg, split)`` returns the ``"train"`` or ``"test"`` split.  With ``subsample_lt`` the
    training split is balanced and the long-tailed one is built from it (``data.imb_factor``,
    Cao et al. 2019); otherwise it is long-tailed as found.  ``color_jitter``: image-file
    datasets add ``ColorJitter(0.4, 0.4, 0.4, 0)`` to their training transform."""
    read: Callable[[Any, str], ArraySplit | FileSplit]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    subsample_lt: bool = True
    color_jitter: bool = True


def _cifar(num_classes: int, cfg, split: str) -> ArraySplit:
    return ArraySplit(*load_cifar(cfg.root or "data", num_classes, train=split == "train", download=cfg.download))


def _fashion_mnist(cfg, split: str) -> ArraySplit:
    return ArraySplit(*load_fashion_mnist(cfg.root, train=split == "train", download=cfg.download))


def _image_list(name: str, cfg, split: str) -> FileSplit:
    if not cfg.root:
        raise BalpoeError(f"recipe key 'data.root' is required for {name} (the folder holding the images and the "
                          "list files)")
    train_list, test_list = default_list_files(name, cfg.root)
    return list_split(cfg.root, train_list if split == "train" else test_list)


DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(partial(_cifar, 10), CIFAR_MEAN, CIFAR_STD),
    "cifar100": DatasetSpec(partial(_cifar, 100), CIFAR_MEAN, CIFAR_STD),
    "fashion_mnist": DatasetSpec(_fashion_mnist, FASHION_MNIST_MEAN, FASHION_MNIST_STD),
    "imagenet_lt": DatasetSpec(partial(_image_list, "imagenet_lt"), IMAGENET_MEAN, IMAGENET_STD, subsample_lt=False),
    "places_lt": DatasetSpec(partial(_image_list, "places_lt"), IMAGENET_MEAN, IMAGENET_STD, subsample_lt=False),
    "inat": DatasetSpec(partial(_image_list, "inat"), INAT_MEAN, INAT_STD, subsample_lt=False, color_jitter=False),
}


def register_dataset(name: str, spec: DatasetSpec) -> DatasetSpec:
    """Add (or replace) a dataset under ``name``; recipes then use ``data.dataset: <name>``."""
    if not isinstance(spec, DatasetSpec):
        raise TypeError(f"register_dataset expects a DatasetSpec, got {type(spec).__name__}")
    DATASETS[name] = spec
    return spec


def get_dataset(name: str) -> DatasetSpec:
    """The registered dataset ``name``; an unknown name is a one-line error listing the known ones."""
    if name not in DATASETS:
        raise BalpoeError(f"recipe key 'data.dataset' is unknown: {name!r} (known: {', '.join(DATASETS)})")
    return DATASETS[name]
