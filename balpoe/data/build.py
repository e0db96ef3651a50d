"""Recipe ``data`` section -> :class:`~balpoe.data.bundle.DataBundle` -> loaders.

The dataset comes from the registry (:mod:`balpoe.data.registry`).  Small datasets (an
:class:`~balpoe.data.bundle.ArraySplit`) become a long-tailed uint8 training tensor and a balanced
test tensor on the training device, served by :class:`~balpoe.data.device_loader.DeviceLoader`;
image-file datasets (a :class:`~balpoe.data.bundle.FileSplit`) a ``DataLoader`` with torchvision
transforms (:class:`~balpoe.data.folder_loader.FolderLoader`).
"""

from __future__ import annotations

import numpy as np
import torch

from balpoe.data.bundle import ArraySplit, DataBundle, ImageArrays
from balpoe.data.device_loader import DeviceLoader
from balpoe.data.folder_loader import ArrayImageDataset, FolderLoader, array_transforms
from balpoe.data.image_list import ImageListDataset, build_transforms
from balpoe.data.lt import lt_class_counts, lt_subsample_indices, stratified_holdout
from balpoe.data.registry import get_dataset
from balpoe.errors import BalpoeError


def folder_transforms(name: str, train: bool, image_size: int = 224):
    """The train / test transform of the image-file dataset ``name`` (its registry entry's
    statistics and colour jitter; :func:`~balpoe.data.image_list.build_transforms`)."""
    spec = get_dataset(name)
    return build_transforms(train, spec.mean, spec.std, image_size, spec.color_jitter and train)


def largest_imb_factor(n_max: int, num_classes: int, profile: str) -> int:
    """The largest integer imbalance ratio whose long-tailed split keeps at least one image of
    every class: about ``n_max`` (the rarest class keeps ``int(n_max / IF)`` images for both
    profiles; float rounding can make it ``n_max - 1``); 0 when even a balanced split is empty."""
    for k in range(max(n_max, 1), 0, -1):
        if min(lt_class_counts(n_max, num_classes, k, profile)) >= 1:
            return k
    return 0


def check_no_empty_class(counts: list[int], class_names: list[str], n_max: int, imb_factor: float,
                         profile: str) -> None:
    """Every class keeps at least one training image in the long-tailed split ``counts``; otherwise
    a one-line error naming the empty classes and the largest usable ``data.imb_factor``."""
    empty = [c for c, n in enumerate(counts) if n < 1]
    if not empty or n_max < 1:  # an empty training set is not the imbalance ratio's doing
        return
    names = [str(class_names[c]) if c < len(class_names) else str(c) for c in empty]
    shown = ", ".join(n[:40] for n in names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    best = largest_imb_factor(n_max, len(counts), profile)
    raise BalpoeError(f"recipe key 'data.imb_factor' ({imb_factor:g}) leaves {len(empty)} of {len(counts)} classes "
                      f"without a training image ({shown}); with {n_max} images in the largest class the largest "
                      f"usable imb_factor ({profile} profile) is {best}")


def build_data(cfg, device: torch.device | str = "cpu", seed: int = 0) -> DataBundle:
    """The long-tailed training split, the balanced test split and (``cfg.holdout_fraction > 0``) a
    stratified held-out slice of the training split, for the recipe's ``data`` section ``cfg``."""
    spec = get_dataset(cfg.dataset)
    train = spec.read(cfg, "train")
    labels = np.asarray(train.labels, dtype=np.int64)
    num_classes = len(train.class_names)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise BalpoeError(f"dataset {cfg.dataset!r}: training labels must lie in [0, {num_classes})")
    keep = np.arange(len(labels))
    if spec.subsample_lt:
        n_max = int(np.bincount(labels, minlength=num_classes).max()) if len(labels) else 0
        lt_counts = lt_class_counts(n_max, num_classes, cfg.imb_factor, cfg.imb_profile)
        check_no_empty_class(lt_counts, list(train.class_names), n_max, cfg.imb_factor, cfg.imb_profile)
        keep = lt_subsample_indices(labels, lt_counts)
    hold = None
    if cfg.holdout_fraction > 0:
        kept, held = stratified_holdout(labels[keep], cfg.holdout_fraction, seed)
        keep, hold = keep[kept], keep[held]
    test = spec.read(cfg, "test")
    counts = torch.bincount(torch.from_numpy(labels[keep]), minlength=num_classes)
    if isinstance(train, ArraySplit):
        dev = torch.device(device)

        def arrays(split: ArraySplit, idx=None) -> ImageArrays:
            x, y = (split.images, split.labels) if idx is None else (split.images[idx], split.labels[idx])
            return ImageArrays(torch.from_numpy(np.ascontiguousarray(x)),
                               torch.from_numpy(np.asarray(y, dtype=np.int64))).to(dev)

        return DataBundle(cfg.dataset, num_classes, int(train.images.shape[1]), counts, spec.mean, spec.std,
                          list(train.class_names), arrays(train, keep), arrays(test),
                          None if hold is None else arrays(train, hold), in_memory=True)
    train_tf, test_tf = folder_transforms(cfg.dataset, True, cfg.image_size), folder_transforms(cfg.dataset, False,
                                                                                                  cfg.image_size)
    full = ImageListDataset(train, train_tf)
    test.class_names = list(train.class_names)
    return DataBundle(cfg.dataset, num_classes, 3, counts, spec.mean, spec.std, list(train.class_names),
                      full.subset(keep), ImageListDataset(test, test_tf),
                      None if hold is None else full.subset(hold, test_tf), in_memory=False)


def input_size(bundle: DataBundle, cfg) -> list[int]:
    """``[C, H, W]`` of the images the model sees at test time: the in-memory images' size, or the
    image-file datasets' crop ``data.image_size``."""
    if bundle.in_memory:
        return [int(d) for d in bundle.train.images.shape[1:]]
    return [bundle.in_chans, int(cfg.image_size), int(cfg.image_size)]


def uses_device_loader(cfg, bundle: DataBundle) -> bool:
    """Whether ``bundle`` is served from the device (in-memory data, unless ``data.loader: dataloader``)."""
    if cfg.loader == "device" and not bundle.in_memory:
        raise BalpoeError(f"recipe key 'data.loader' is 'device' but {bundle.name} is an image-file dataset")
    return bundle.in_memory and cfg.loader != "dataloader"


def build_loader(bundle: DataBundle, split: str, batch_size: int, cfg, *, train: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1, channels_last: bool = False, sampler: str | None = None):
    """A loader for ``split`` in {'train', 'test', 'holdout'}; iterating yields ``(x, y)`` batches.

    Both loader kinds have ``set_epoch(epoch)`` (call it before each training epoch) and
    ``num_samples`` (images this rank sees per epoch)."""
    data = getattr(bundle, split)
    sampler = sampler or (cfg.sampler if train else "instance")
    a = cfg.augment
    if uses_device_loader(cfg, bundle):
        return DeviceLoader(data.images, data.labels, batch_size, bundle.mean, bundle.std, train=train,
                            padding=a.crop_padding, flip=a.flip, rotation=a.rotation, sampler=sampler,
                            seed=seed, rank=rank, world_size=world_size, channels_last=channels_last)
    if bundle.in_memory:
        tf = array_transforms(tuple(data.images.shape[-2:]), bundle.mean, bundle.std, train, a.crop_padding,
                              a.flip, a.rotation)
        data = ArrayImageDataset(data, tf)
    return FolderLoader(data, bundle.labels_of(split), batch_size, train=train, sampler=sampler, seed=seed,
                        rank=rank, world_size=world_size, num_workers=cfg.num_workers)
