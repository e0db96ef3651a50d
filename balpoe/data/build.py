"""Recipe ``data`` section -> :class:`~balpoe.data.bundle.DataBundle` -> loaders.

The dataset comes from the registry (:mod:`balpoe.data.registry`).  Small datasets (an
:class:`~balpoe.data.bundle.ArraySplit`) become a long-tailed uint8 training tensor and a balanced
test tensor on the training device, served by :class:`~balpoe.data.device_loader.DeviceLoader`;
image-file datasets (a :class:`~balpoe.data.bundle.FileSplit`) a ``DataLoader`` with torchvision
transforms (:class:`~balpoe.data.folder_loader.FolderLoader`), or, when small enough
(``data.in_memory``), are decoded once and served like the in-memory datasets.  What the images go
through is one :class:`~balpoe.data.pipeline.Pipeline` (:mod:`balpoe.data.pipeline`).
"""

from __future__ import annotations

import numpy as np
import torch

from balpoe.data.bundle import ArraySplit, DataBundle, FileSplit, ImageArrays
from balpoe.data.device_loader import DeviceLoader
from balpoe.data.folder_loader import ArrayImageDataset, FolderLoader, array_transforms
from balpoe.data.image_list import ImageListDataset
from balpoe.data.lt import lt_class_counts, lt_subsample_indices, stratified_holdout
from balpoe.data.pipeline import (Pipeline, array_pipeline, channel_stats, decode_split, file_stats,
                                  pipeline_transform, resolve_pipeline)
from balpoe.data.registry import FILE_KEYS, check_dataset_keys, get_dataset
from balpoe.errors import BalpoeError, quoted
from balpoe.recipe import DataConfig


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


def _names(class_names: list[str], classes) -> str:
    shown = [repr(str(class_names[c]) if c < len(class_names) else str(c))[:40] for c in classes]
    return ", ".join(shown[:4]) + (f" and {len(shown) - 4} more" if len(shown) > 4 else "")


def check_lt_subsample(have: np.ndarray, want: list[int], class_names: list[str], imb_factor: float) -> None:
    """Every class has the images its long-tailed count asks for (``data.lt_subsample`` on data
    that are not balanced); a one-line error naming the first short class otherwise."""
    short = [c for c, (h, w) in enumerate(zip(have.tolist(), want)) if h < w]
    if short:
        c = short[0]
        raise BalpoeError(f"recipe key 'data.lt_subsample': class {_names(class_names, [c])} (label {c}) has "
                          f"{int(have[c])} training images but the long-tailed split (imb_factor {imb_factor:g}, "
                          f"classes in label order from {want[0]} images down) asks for {want[c]} ({len(short)} "
                          "classes short); LT subsampling expects balanced classes: set data.lt_subsample: false "
                          "to keep the imbalance as found")


def check_split_labels(split, num_classes: int, what: str, train_source: str) -> None:
    """Labels of a test / validation split lie in the training classes ``[0, num_classes)``."""
    labels = np.asarray(split.labels, dtype=np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        where = getattr(split, "source", "") or what
        raise BalpoeError(f"{where}: label {int(labels[bad[0]])} of the {what} is not a training class (the training "
                          f"split{' ' + train_source if train_source else ''} has {num_classes} classes, labels 0.."
                          f"{num_classes - 1}); every class needs training images")


def build_data(cfg: DataConfig, device: torch.device | str = "cpu", seed: int = 0) -> DataBundle:
    """The long-tailed training split, the test split and the calibration holdout for the recipe's
    ``data`` section ``cfg``.

    * Test split: the dataset's own, or (``data.test_fraction > 0``) a stratified slice of the full
      training split (seeded with ``seed``), taken before any long-tailed subsampling.
    * Training split: long-tailed by subsampling (``DatasetSpec.subsample_lt``, overridden by
      ``data.lt_subsample``; Cao et al. 2019, classes in label order) or as found.
    * Holdout: the dataset's validation split when there is one (``DatasetSpec.read_val``:
      ``data.val_root`` / ``data.val_list`` / ``ImageNet_LT_val.txt``), else (``data.holdout_fraction
      > 0``) a stratified slice of the long-tailed training split, else None."""
    spec = get_dataset(cfg.dataset)
    check_dataset_keys(cfg.dataset, spec, cfg)
    train = spec.read(cfg, "train")
    labels = np.asarray(train.labels, dtype=np.int64)
    class_names = list(train.class_names)
    num_classes = len(class_names)
    train_source = getattr(train, "source", "")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise BalpoeError(f"dataset {cfg.dataset!r}: training labels must lie in [0, {num_classes})")
    pool, test_idx = np.arange(len(labels)), None
    test_fraction = getattr(cfg, "test_fraction", 0.0) or 0.0
    if test_fraction > 0:
        pool, test_idx = stratified_holdout(labels, test_fraction, seed, min_per_class=1)
    keep = pool
    subsample = getattr(cfg, "lt_subsample", None)
    if spec.subsample_lt if subsample is None else subsample:
        have = np.bincount(labels[pool], minlength=num_classes)
        n_max = int(have.max()) if len(pool) else 0
        lt_counts = lt_class_counts(n_max, num_classes, cfg.imb_factor, cfg.imb_profile)
        check_no_empty_class(lt_counts, class_names, n_max, cfg.imb_factor, cfg.imb_profile)
        check_lt_subsample(have, lt_counts, class_names, cfg.imb_factor)
        keep = pool[lt_subsample_indices(labels[pool], lt_counts)]
    elif len(keep):
        absent = np.flatnonzero(np.bincount(labels[keep], minlength=num_classes) == 0)
        if len(absent):
            raise BalpoeError(f"{train_source or 'the training split'}: {len(absent)} of {num_classes} classes have no "
                              f"training image ({_names(class_names, absent)}, label {int(absent[0])}); every class "
                              "needs training images: give it some, or renumber the labels without it")
    val = spec.read_val(cfg) if spec.read_val is not None else None
    hold, holdout_note = None, None
    if val is not None:
        check_split_labels(val, num_classes, "validation split", train_source)
        holdout_note = f"validation split ({getattr(val, 'source', '') or cfg.dataset}, {len(val.labels)} images)"
    elif cfg.holdout_fraction > 0:
        kept, held = stratified_holdout(labels[keep], cfg.holdout_fraction, seed)
        keep, hold = keep[kept], keep[held]
    test = spec.read(cfg, "test") if test_idx is None else None
    if test is not None:
        check_split_labels(test, num_classes, "test split", train_source)
    counts = torch.bincount(torch.from_numpy(labels[keep]), minlength=num_classes)
    dev = torch.device(device)
    if isinstance(train, FileSplit):
        n_images = len(keep) + (0 if hold is None else len(hold)) + (len(test_idx) if test is None else len(test.labels)) \
            + (0 if val is None else len(val.labels))
        pipe = resolve_pipeline(cfg, cfg.dataset, train, official=not spec.auto_pipeline, spec_mean=spec.mean,
                                spec_std=spec.std, spec_jitter=spec.color_jitter, n_images=n_images, device=dev)
        if test is not None:
            test.class_names = list(class_names)
        if val is not None:
            val.class_names = list(class_names)
        if not pipe.in_memory:
            return _file_bundle(cfg, pipe, train, keep, hold, test, test_idx, val, counts, class_names, holdout_note)
        # small image files: decoded once (at the test geometry) and served like the built-in datasets
        workers = cfg.num_workers
        train_arrays = decode_split(train, pipe, keep, workers)
        hold_arrays = None if hold is None else decode_split(train, pipe, hold, workers)
        test_files = FileSplit([train.paths[i] for i in test_idx], labels[test_idx], class_names, train.root) \
            if test is None else test
        test = decode_split(test_files, pipe, None, workers)
        val = None if val is None else decode_split(val, pipe, None, workers)
        train, keep, hold, test_idx = train_arrays, np.arange(len(keep)), None, None
        if pipe.mean is None:
            pipe.mean, pipe.std = channel_stats(train.images)
    else:
        pipe = array_pipeline(cfg, cfg.dataset, train, keep, spec.mean, spec.std)
        hold_arrays = None

    def arrays(split: ArraySplit, idx=None) -> ImageArrays:
        x, y = (split.images, split.labels) if idx is None else (split.images[idx], split.labels[idx])
        return ImageArrays(torch.from_numpy(np.ascontiguousarray(x)),
                           torch.from_numpy(np.asarray(y, dtype=np.int64))).to(dev)

    holdout = arrays(val) if val is not None else arrays(hold_arrays) if hold_arrays is not None else \
        None if hold is None else arrays(train, hold)
    test_arrays = arrays(train, test_idx) if test is None else arrays(test)
    if pipe.files:  # decoded image files: test-distribution list files match the test images by path
        test_arrays.paths, test_arrays.root = list(test_files.paths), test_files.root
    return DataBundle(cfg.dataset, num_classes, int(train.images.shape[1]), counts, pipe.mean, pipe.std,
                      class_names, arrays(train, keep), test_arrays, holdout, in_memory=True,
                      holdout_note=holdout_note, pipeline=pipe)


def _file_bundle(cfg: DataConfig, pipe: Pipeline, train: FileSplit, keep, hold, test, test_idx, val, counts, class_names,
                 holdout_note) -> DataBundle:
    """The bundle of image files read per epoch through a DataLoader (:func:`build_data`)."""
    if pipe.mean is None:
        pipe.mean, pipe.std = file_stats(train, pipe, keep)
    train_tf = pipeline_transform(pipe, True, cfg.augment)
    test_tf = pipeline_transform(pipe, False, cfg.augment)
    full = ImageListDataset(train, train_tf, cfg.decode, pipe.channels)
    if val is not None:
        holdout = ImageListDataset(val, test_tf, cfg.decode, pipe.channels)
    else:
        holdout = None if hold is None else full.subset(hold, test_tf)
    test_set = full.subset(test_idx, test_tf) if test is None else \
        ImageListDataset(test, test_tf, cfg.decode, pipe.channels)
    return DataBundle(cfg.dataset, len(class_names), pipe.channels, counts, pipe.mean, pipe.std, class_names,
                      full.subset(keep), test_set, holdout, in_memory=False, holdout_note=holdout_note, pipeline=pipe)


#: the data keys that say where data files are read from
LOCATION_KEYS = ("root", *FILE_KEYS, "test_lists")


def stored_location_keys(cfg: DataConfig, given: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """The location keys (``data.root`` always, the others when set) of recipe section ``cfg`` that
    the user did not give (``given``: keys such as ``data.root`` set on the command line)."""
    return [f"data.{k}" for k in LOCATION_KEYS if (k == "root" or getattr(cfg, k, None)) and f"data.{k}" not in given]


def data_location(cfg: DataConfig, given: set[str] | frozenset[str] = frozenset(), stored_in: str = "") -> str:
    """One line saying where the data of recipe section ``cfg`` are read from: ``data.root`` (null:
    the dataset's default place, ``./data`` for CIFAR) and every other location key that is set,
    each marked with where its value came from: ``given`` holds the keys the user set (``data.root``,
    ...); the others came from ``stored_in`` (e.g. "checkpoint 'model.safetensors'") when it is not
    empty.  Evaluation and prediction rebuild data from the recipe stored in a checkpoint: this line
    says which folder that recipe chose, so a model file never silently picks where data come from."""
    parts = []
    for key in LOCATION_KEYS:
        value = getattr(cfg, key, None)
        if key != "root" and not value:
            continue
        shown_value = (quoted(value, 120) if isinstance(value, str) else ", ".join(quoted(v, 60) for v in value[:3])
                       + (f" and {len(value) - 3} more" if len(value) > 3 else "")) if value else \
            "null (the dataset's default place, ./data for CIFAR)"
        parts.append(f"data.{key} {shown_value}" + (" (given here)" if f"data.{key}" in given else ""))
    line = f"data: {cfg.dataset} from " + ", ".join(parts)
    stored = stored_location_keys(cfg, given)
    if stored_in and stored:
        line += f"; {stored_origin(stored, stored_in)} (override {stored[0]} to read from elsewhere)"
    return line


def stored_origin(stored: list[str], stored_in: str) -> str:
    """``"data.root as stored in the recipe of checkpoint 'x', not given here"``."""
    return f"{', '.join(stored)} as stored in the recipe of {stored_in}, not given here"


def input_size(bundle: DataBundle, cfg: DataConfig) -> list[int]:
    """``[C, H, W]`` of the images the model sees at test time: the in-memory images' size, or the
    image-file datasets' crop ``data.image_size``."""
    if bundle.in_memory:
        return [int(d) for d in bundle.train.images.shape[1:]]
    size = bundle.pipeline.size if bundle.pipeline is not None else int(cfg.image_size or 224)
    return [bundle.in_chans, size, size]


def uses_device_loader(cfg: DataConfig, bundle: DataBundle) -> bool:
    """Whether ``bundle`` is served from the device (in-memory data, unless ``data.loader: dataloader``)."""
    if cfg.loader == "device" and not bundle.in_memory:
        raise BalpoeError(f"recipe key 'data.loader' is 'device' but {bundle.name} is an image-file dataset")
    return bundle.in_memory and cfg.loader != "dataloader"


def build_loader(bundle: DataBundle, split: str, batch_size: int, cfg: DataConfig, *, train: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1, channels_last: bool = False, sampler: str | None = None):
    """A loader for ``split`` in {'train', 'test', 'holdout'}; iterating yields ``(x, y)`` batches.

    Both loader kinds have ``set_epoch(epoch)`` (call it before each training epoch) and
    ``num_samples`` (images this rank sees per epoch)."""
    data = getattr(bundle, split)
    sampler = sampler or (cfg.sampler if train else "instance")
    a, pipe = cfg.augment, bundle.pipeline
    padding, flip, rotation = (pipe.padding, pipe.flip, pipe.rotation) if pipe is not None else \
        (a.crop_padding or 0, a.flip, a.rotation or 0.0)
    policy_fill = None if a.fill is None else tuple(a.fill)
    if policy_fill is not None and len(policy_fill) not in (1, bundle.in_chans):
        raise BalpoeError(f"recipe key 'data.augment.fill' needs one value or one per channel ({bundle.in_chans}), "
                          f"got {len(policy_fill)}")
    if uses_device_loader(cfg, bundle):
        strong = {"policy": a.policy, "randaugment": a.randaugment, "cutout_length": a.cutout,
                  "interpolation": a.interpolation, "policy_fill": policy_fill}
        return DeviceLoader(data.images, data.labels, batch_size, bundle.mean, bundle.std, train=train,
                            padding=padding, flip=flip, rotation=rotation, sampler=sampler,
                            images_per_class_visit=cfg.images_per_class_visit,
                            seed=seed, rank=rank, world_size=world_size, channels_last=channels_last,
                            strong=strong)
    if bundle.in_memory:
        tf = array_transforms(tuple(data.images.shape[-2:]), bundle.mean, bundle.std, train, padding,
                              flip, rotation, a.policy, a.randaugment, a.cutout, a.interpolation, policy_fill)
        data = ArrayImageDataset(data, tf)
    return FolderLoader(data, bundle.labels_of(split), batch_size, train=train, sampler=sampler, seed=seed,
                        images_per_class_visit=cfg.images_per_class_visit,
                        rank=rank, world_size=world_size, num_workers=cfg.num_workers)
