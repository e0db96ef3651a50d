"""Recipe -> datasets -> loaders.

In-memory datasets (CIFAR-10/100, Fashion-MNIST) become a long-tailed uint8 training tensor and
a balanced test tensor on the training device, served by :class:`DeviceLoader`.  Image-folder
datasets (ImageNet-LT, Places-LT, iNaturalist 2018) are read from their txt lists and served by a
``torch.utils.data.DataLoader`` with PIL transforms and worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from balpoe.data.device_loader import DeviceLoader
from balpoe.data.lt import lt_class_counts, lt_subsample_indices
from balpoe.data.samplers import ClassBalancedSampler
from balpoe.errors import BalpoeError

# Normalisation constants.  The official BalPoE code normalises CIFAR-100 with CIFAR-10's statistics.
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

IN_MEMORY = {"cifar10": 10, "cifar100": 100, "fashion_mnist": 10}
FOLDER = ("imagenet_lt", "places_lt", "inat")


@dataclass
class ImageArrays:
    """An in-memory split: uint8 images ``[N, C, H, W]`` and int64 labels ``[N]``."""
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device) -> "ImageArrays":
        return ImageArrays(self.images.to(device), self.labels.to(device))

    def subset(self, idx) -> "ImageArrays":
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.labels.device)
        return ImageArrays(self.images[idx], self.labels[idx])


@dataclass
class DataBundle:
    """Everything downstream needs to know about the data."""
    name: str
    num_classes: int
    in_chans: int
    class_counts: torch.Tensor          # training counts after LT subsampling, [C]
    mean: tuple
    std: tuple
    class_names: list[str]
    train: object                       # ImageArrays, or a torch Dataset for folder datasets
    test: object
    holdout: object | None = None       # held-out labelled slice of the LT training split
    in_memory: bool = True
    extra: dict = field(default_factory=dict)


def _stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, holdout): ``floor(fraction * n_c)`` images of each class held out."""
    rng = np.random.default_rng(seed)
    keep, hold = [], []
    for c in np.unique(labels):
        idx = np.where(labels == c)[0]
        idx = idx[rng.permutation(len(idx))]
        k = int(np.floor(fraction * len(idx)))
        hold.append(idx[:k])
        keep.append(idx[k:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(hold))


def _load_in_memory(cfg, train: bool):
    if cfg.dataset in ("cifar10", "cifar100"):
        from balpoe.data.cifar import load_cifar
        root = cfg.root or "data"
        return load_cifar(root, IN_MEMORY[cfg.dataset], train=train, download=cfg.download)
    from balpoe.data.fashion_mnist import load_fashion_mnist
    return load_fashion_mnist(cfg.root, train=train, download=cfg.download)


def build_data(cfg, device: torch.device | str = "cpu", seed: int = 0) -> DataBundle:
    """Build the LT training split, the balanced test split and (optionally) a held-out slice."""
    if cfg.dataset in IN_MEMORY:
        return _build_in_memory(cfg, torch.device(device), seed)
    if cfg.dataset in FOLDER:
        return _build_folder(cfg, seed)
    raise BalpoeError(f"recipe key 'data.dataset' is unknown: {cfg.dataset!r}")


def _build_in_memory(cfg, device: torch.device, seed: int) -> DataBundle:
    num_classes = IN_MEMORY[cfg.dataset]
    images, labels, names = _load_in_memory(cfg, train=True)
    n_max = int(np.bincount(labels, minlength=num_classes).max())
    counts = lt_class_counts(n_max, num_classes, cfg.imb_factor, cfg.imb_profile)
    keep = lt_subsample_indices(labels, counts)
    images, labels = images[keep], labels[keep]
    holdout = None
    if cfg.holdout_fraction > 0:
        tr, ho = _stratified_holdout(labels, cfg.holdout_fraction, seed)
        holdout = ImageArrays(torch.from_numpy(images[ho]), torch.from_numpy(labels[ho]).long()).to(device)
        images, labels = images[tr], labels[tr]
    train = ImageArrays(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels).long()).to(device)
    test_images, test_labels, _ = _load_in_memory(cfg, train=False)
    test = ImageArrays(torch.from_numpy(np.ascontiguousarray(test_images)), torch.from_numpy(test_labels).long()).to(device)
    mean, std = (FASHION_MNIST_MEAN, FASHION_MNIST_STD) if cfg.dataset == "fashion_mnist" else (CIFAR_MEAN, CIFAR_STD)
    return DataBundle(cfg.dataset, num_classes, int(images.shape[1]),
                      torch.bincount(train.labels.cpu(), minlength=num_classes), mean, std, list(names),
                      train, test, holdout, in_memory=True)


def _build_folder(cfg, seed: int) -> DataBundle:
    from balpoe.data.image_list import ImageListDataset, build_transforms, default_list_files, read_image_list
    if not cfg.root:
        raise BalpoeError(f"recipe key 'data.root' is required for {cfg.dataset} (the dataset's image root)")
    train_list, test_list = default_list_files(cfg.dataset, cfg.root)
    _, train_labels = read_image_list(train_list)
    num_classes = int(train_labels.max()) + 1
    train_tf = build_transforms(cfg.dataset, train=True, image_size=cfg.image_size)
    test_tf = build_transforms(cfg.dataset, train=False, image_size=cfg.image_size)
    train = ImageListDataset(cfg.root, train_list, train_tf)
    test = ImageListDataset(cfg.root, test_list, test_tf)
    holdout = None
    if cfg.holdout_fraction > 0:
        tr, ho = _stratified_holdout(np.asarray(train_labels), cfg.holdout_fraction, seed)
        holdout = torch.utils.data.Subset(ImageListDataset(cfg.root, train_list, test_tf), ho.tolist())
        train = torch.utils.data.Subset(train, tr.tolist())
        train_labels = np.asarray(train_labels)[tr]
    counts = torch.bincount(torch.as_tensor(np.asarray(train_labels), dtype=torch.long), minlength=num_classes)
    return DataBundle(cfg.dataset, num_classes, 3, counts, IMAGENET_MEAN, IMAGENET_STD,
                      [str(i) for i in range(num_classes)], train, test, holdout, in_memory=False,
                      extra={"train_labels": np.asarray(train_labels)})


def use_device_loader(cfg, bundle: DataBundle) -> bool:
    if cfg.loader == "device" and not bundle.in_memory:
        raise BalpoeError(f"recipe key 'data.loader' is 'device' but {bundle.name} is an image-folder dataset")
    return bundle.in_memory and cfg.loader != "dataloader"


class ArrayImageDataset(torch.utils.data.Dataset):
    """In-memory uint8 images served through PIL and torchvision transforms, one sample at a time.

    This is the official code's pipeline (``data.loader: dataloader``): the reference the
    device-resident path is compared against.
    """

    def __init__(self, arrays: ImageArrays, transform):
        self.images, self.labels, self.transform = arrays.images.cpu(), arrays.labels.cpu(), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image
        img = self.images[i].permute(1, 2, 0).numpy()
        img = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)
        return self.transform(img), self.labels[i]


def array_transforms(bundle: DataBundle, cfg, train: bool):
    """torchvision equivalent of the device path: RandomCrop(pad) -> flip -> RandomRotation -> normalise."""
    from torchvision import transforms as T
    size = tuple(bundle.train.images.shape[-2:]) if isinstance(bundle.train, ImageArrays) else None
    ops = []
    if train:
        a = cfg.augment
        if a.crop_padding:
            ops.append(T.RandomCrop(size, padding=a.crop_padding))
        if a.flip:
            ops.append(T.RandomHorizontalFlip())
        if a.rotation:
            ops.append(T.RandomRotation(a.rotation))
    ops += [T.ToTensor(), T.Normalize(bundle.mean, bundle.std)]
    return T.Compose(ops)


def build_loader(bundle: DataBundle, split: str, batch_size: int, cfg, *, train: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1, channels_last: bool = False,
                 sampler: str | None = None):
    """A loader for ``split`` in {'train', 'test', 'holdout'}; iterating yields ``(x, y)`` batches.

    Call ``loader.set_epoch(epoch)`` (both loader kinds support it) before each training epoch.
    """
    data = getattr(bundle, split)
    sampler = sampler or (cfg.sampler if train else "instance")
    if use_device_loader(cfg, bundle):
        a = cfg.augment
        return DeviceLoader(data.images, data.labels, batch_size, bundle.mean, bundle.std, train=train,
                            padding=a.crop_padding, flip=a.flip, rotation=a.rotation, sampler=sampler,
                            seed=seed, rank=rank, world_size=world_size, channels_last=channels_last)
    dataset = ArrayImageDataset(data, array_transforms(bundle, cfg, train)) if bundle.in_memory else data
    labels = data.labels.cpu() if bundle.in_memory else None
    if train and sampler == "class_balanced":
        if labels is None:
            labels = torch.as_tensor(bundle.extra["train_labels"])
        samp = ClassBalancedSampler(labels, seed=seed, rank=rank, world_size=world_size)
    elif world_size > 1 or train:
        samp = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=train,
                                                   seed=seed) if world_size > 1 else None
    else:
        samp = None
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=train and samp is None,
                                         sampler=samp, generator=generator, num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available(),
                                         persistent_workers=cfg.num_workers > 0, drop_last=False)
    return _EpochLoader(loader, samp, seed)


class _EpochLoader:
    """Wraps a DataLoader with ``set_epoch`` (seeding the shuffle and the sampler per epoch)."""

    def __init__(self, loader, sampler, seed: int):
        self.loader, self.sampler, self.seed = loader, sampler, seed
        self.batch_size = loader.batch_size

    def set_epoch(self, epoch: int) -> None:
        if self.sampler is not None and hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        self.loader.generator.manual_seed(self.seed * 1_000_003 + epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)
