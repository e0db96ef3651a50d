"""The dataset registry: one dict from ``data.dataset`` names to :class:`DatasetSpec`.

To add a dataset, write a reader ``read(cfg, split) -> ArraySplit | FileSplit`` (``cfg`` is the
recipe's ``data`` section, ``split`` is ``"train"`` or ``"test"``) and register it, either with an
entry in :data:`DATASETS` below or from your own code::

    from balpoe.data.registry import DatasetSpec, register_dataset
    register_dataset("my_data", DatasetSpec(read=my_reader, mean=(0.5,), std=(0.25,)))

Users' own data need no code: ``image_folder`` reads class sub-folders (``data.train_root``,
``data.val_root``, ``data.test_root``, or one ``data.root`` split by ``data.test_fraction``) and
``image_list`` reads ``path label`` list files (``data.train_list``, ``data.val_list``,
``data.test_list``, ``data.class_names``).

:class:`~balpoe.data.bundle.ArraySplit` datasets (small, in memory) are served from the training
device with batched augmentation; :class:`~balpoe.data.bundle.FileSplit` datasets (image files)
through a ``DataLoader`` with torchvision transforms.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

from balpoe.data.bundle import ArraySplit, FileSplit
from balpoe.data.cifar import load_cifar
from balpoe.data.fashion_mnist import load_fashion_mnist
from balpoe.data.image_folder import folder_classes, folder_split, training_folder
from balpoe.data.image_list import (DATA_SOURCES, IMAGENET_MEAN, IMAGENET_STD, INAT_MEAN, INAT_STD, check_list_images,
                                    conventional_list, conventional_val_list, find_list_file, list_split,
                                    read_class_names)
from balpoe.errors import BalpoeError

# The official BalPoE code normalises CIFAR-100 with CIFAR-10's statistics.
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)


@dataclass(frozen=True)
class DatasetSpec:
    """How to read a dataset and what its images need.

    ``read(cfg, split)`` returns the ``"train"`` or ``"test"`` split.  With ``subsample_lt`` the
    training split is balanced and the long-tailed one is built from it (``data.imb_factor``,
    Cao et al. 2019); otherwise it is long-tailed as found (``data.lt_subsample`` overrides this).
    ``color_jitter``: image-file datasets add ``ColorJitter(0.4, 0.4, 0.4, 0)`` to their training
    transform.  ``read_val(cfg)``: the validation split, or None when the recipe names none (it is
    then the calibration holdout instead of a slice of the training split).  ``keys``: the data keys
    among :data:`FILE_KEYS` the reader reads; setting another is a one-line error.  ``auto_pipeline``:
    image files whose augmentation, channels and normalisation are chosen from the images
    themselves (:func:`~balpoe.data.pipeline.resolve_pipeline`; users' own data), instead of the
    official ImageNet-style pipeline with ``mean`` / ``std``."""
    read: Callable[[Any, str], ArraySplit | FileSplit]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    subsample_lt: bool = True
    color_jitter: bool = True
    read_val: Callable[[Any], ArraySplit | FileSplit | None] | None = None
    keys: tuple[str, ...] = ()
    auto_pipeline: bool = False


#: data keys that locate a dataset's files; each dataset reads some of them (``DatasetSpec.keys``)
FILE_KEYS = ("train_root", "val_root", "test_root", "train_list", "val_list", "test_list", "class_names")
LIST_KEYS = ("train_list", "val_list", "test_list", "class_names")
FOLDER_KEYS = ("train_root", "val_root", "test_root")


def _cifar(num_classes: int, cfg, split: str) -> ArraySplit:
    return ArraySplit(*load_cifar(cfg.root or "data", num_classes, train=split == "train", download=cfg.download))


def _fashion_mnist(cfg, split: str) -> ArraySplit:
    return ArraySplit(*load_fashion_mnist(cfg.root, train=split == "train", download=cfg.download))


def _list_file(name: str | None, cfg, split: str) -> Path | None:
    """The list file of ``split`` (train / val / test): the recipe's ``data.<split>_list``, else the
    dataset's conventional file under ``data.root`` (validation: only when present and
    ``data.holdout_fraction`` is 0); None for a validation split that is not there."""
    given, root = getattr(cfg, f"{split}_list", None), cfg.root
    if given:
        return find_list_file(given, root, f"data.{split}_list")
    if name is None:
        if split == "val":
            return None
        if split == "train":
            raise BalpoeError("recipe key 'data.train_list' is required for dataset image_list (a text file of "
                              "'<relative/path> <label>' lines, the paths relative to data.root)")
        raise BalpoeError("dataset image_list has no test split: set recipe key 'data.test_list' (a text file of "
                          "'<relative/path> <label>' lines) or data.test_fraction (e.g. 0.2 of the training list)")
    if not root:
        raise BalpoeError(f"recipe key 'data.root' is required for {name} (the folder holding the images and the "
                          "list files)")
    if split == "val":
        return conventional_val_list(name, root) if cfg.holdout_fraction == 0 else None
    return conventional_list(name, root, split)


def _read_list(name: str | None, cfg, path: Path) -> FileSplit:
    base = Path(cfg.root).expanduser() if cfg.root else path.parent
    names = read_class_names(cfg.class_names) if getattr(cfg, "class_names", None) else None
    return check_list_images(list_split(base, path, class_names=names), path, DATA_SOURCES.get(name or "", ""))


def _image_list(name: str | None, cfg, split: str) -> FileSplit:
    return _read_list(name, cfg, _list_file(name, cfg, split))


def _image_list_val(name: str | None, cfg) -> FileSplit | None:
    path = _list_file(name, cfg, "val")
    return None if path is None else _read_list(name, cfg, path)


def _image_folder(cfg, split: str) -> FileSplit:
    train, key = training_folder(cfg)
    if split == "train":
        return folder_split(train, key)
    if not cfg.test_root:
        raise BalpoeError("dataset image_folder has no test split: set recipe key 'data.test_root' (a folder of class "
                          "sub-folders) or data.test_fraction (e.g. 0.2 of the training folder)")
    return folder_split(cfg.test_root, "data.test_root", folder_classes(train, key), f"the training folder {train}")


def _image_folder_val(cfg) -> FileSplit | None:
    if not cfg.val_root:
        return None
    train, key = training_folder(cfg)
    return folder_split(cfg.val_root, "data.val_root", folder_classes(train, key), f"the training folder {train}")


def _listed(name: str | None, mean, std, **kw) -> DatasetSpec:
    return DatasetSpec(partial(_image_list, name), mean, std, subsample_lt=False,
                       read_val=partial(_image_list_val, name), keys=LIST_KEYS, auto_pipeline=name is None, **kw)


DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(partial(_cifar, 10), CIFAR_MEAN, CIFAR_STD),
    "cifar100": DatasetSpec(partial(_cifar, 100), CIFAR_MEAN, CIFAR_STD),
    "fashion_mnist": DatasetSpec(_fashion_mnist, FASHION_MNIST_MEAN, FASHION_MNIST_STD),
    "imagenet_lt": _listed("imagenet_lt", IMAGENET_MEAN, IMAGENET_STD),
    "places_lt": _listed("places_lt", IMAGENET_MEAN, IMAGENET_STD),
    "inat": _listed("inat", INAT_MEAN, INAT_STD, color_jitter=False),
    # users' own data: the pipeline chosen from the images (small: CIFAR-style, in memory; large: the ImageNet-LT
    # pipeline with ImageNet statistics, what pretrained backbones expect), balpoe.data.pipeline
    "image_folder": DatasetSpec(_image_folder, IMAGENET_MEAN, IMAGENET_STD, subsample_lt=False,
                                read_val=_image_folder_val, keys=FOLDER_KEYS, auto_pipeline=True),
    "image_list": _listed(None, IMAGENET_MEAN, IMAGENET_STD),
}


def register_dataset(name: str, spec: DatasetSpec) -> DatasetSpec:
    """Add (or replace) a dataset under ``name``; recipes then use ``data.dataset: <name>``."""
    if not isinstance(spec, DatasetSpec):
        raise TypeError(f"register_dataset expects a DatasetSpec, got {type(spec).__name__}")
    DATASETS[name] = spec
    return spec


def check_dataset_keys(name: str, spec: DatasetSpec, cfg) -> None:
    """Every key of :data:`FILE_KEYS` the recipe sets is one dataset ``name`` reads (one-line error)."""
    for key in FILE_KEYS:
        if getattr(cfg, key, None) and key not in spec.keys:
            readers = [n for n, s in DATASETS.items() if key in s.keys]
            raise BalpoeError(f"recipe key 'data.{key}' is not read by dataset {name!r} (it reads "
                              f"{', '.join('data.' + k for k in spec.keys) or 'none of the file keys'}; "
                              f"data.{key} is for {', '.join(readers) or 'no registered dataset'})")


def get_dataset(name: str) -> DatasetSpec:
    """The registered dataset ``name``; an unknown name is a one-line error listing the known ones."""
    if name not in DATASETS:
        raise BalpoeError(f"recipe key 'data.dataset' is unknown: {name!r} (known: {', '.join(DATASETS)})")
    return DATASETS[name]
