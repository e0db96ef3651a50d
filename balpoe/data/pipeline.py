"""The input pipeline a dataset gets: crop, flip, rotation, colour jitter, channels, normalisation,
test-time resize / crop, and whether image files are decoded once into memory.

:func:`resolve_pipeline` turns the recipe's ``data`` section and the dataset into one
:class:`Pipeline` (printed in one line at the start of training, :meth:`Pipeline.describe`):

* built-in in-memory datasets (CIFAR, Fashion-MNIST): pad-and-crop (``crop_padding``, default 4),
  flip, rotation (default 15, as BalPoE's CIFAR recipes) on the training device; keys that only
  image files take are refused;
* the official list datasets (ImageNet-LT, Places-LT, iNaturalist 2018): the official BalPoE
  pipeline, ``RandomResizedCrop`` -> flip -> ``ColorJitter`` and ``Resize(256/224)`` ->
  ``CenterCrop`` at test time, with the dataset's constants;
* users' own images (``image_folder``, ``image_list``): the same keys, with defaults read from the
  images themselves (:func:`inspect_images`, a sample of the training split): small images (at
  most :data:`SMALL_SIDE` px) get the CIFAR-style pipeline at their own size (pad-and-crop 4 +
  flip, no jitter, the training split's own mean / std, one channel when they are grey) and are
  decoded once into uint8 tensors when they fit :data:`IN_MEMORY_BUDGET`, so that the
  :class:`~balpoe.data.device_loader.DeviceLoader` augments them on the device exactly like the
  built-in datasets; large images get the ImageNet-style pipeline above with ImageNet constants.

A key that does not apply to the pipeline chosen (``crop_padding`` with ``random_resized_crop``,
``crop_scale`` with ``pad_crop``, ``image_size`` on CIFAR, ...) is a one-line error.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torchvision import transforms as T
from torchvision.transforms import v2

from balpoe.data.augment import Cutout, folder_transform, policy_transform
from balpoe.data.bundle import ArraySplit, FileSplit
from balpoe.data.decode import open_image, read_rgb
from balpoe.errors import BalpoeError

#: images whose longer side is at most this many pixels are "small" (CIFAR, Fashion-MNIST, Tiny-ImageNet)
SMALL_SIDE = 64
#: images :func:`inspect_images` opens (headers only) to choose the automatic pipeline
SAMPLE_IMAGES = 64
#: the largest decoded size (all splits together) ``data.in_memory: auto`` loads into memory
IN_MEMORY_BUDGET = 2 * 2 ** 30
#: training images decoded to compute the normalisation constants of an image-file split kept on disk
STATS_SAMPLE = 5000
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFAULT_PADDING, DEFAULT_ROTATION = 4, 15.0
DEFAULT_SCALE, DEFAULT_RATIO = (0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0)
#: PIL modes of grey images
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


@dataclass
class Pipeline:
    """The resolved input pipeline of a dataset (:func:`resolve_pipeline`)."""
    crop: str                          # pad_crop | random_resized_crop | none
    size: int                          # [size, size] the model sees (in-memory built-ins: the images' own size)
    channels: int
    mean: tuple
    std: tuple
    flip: bool = True
    padding: int = 0                   # pad_crop
    scale: tuple = DEFAULT_SCALE       # random_resized_crop
    ratio: tuple = DEFAULT_RATIO
    rotation: float = 0.0
    color_jitter: bool = False
    test_resize: int | None = None     # image files: Resize(shorter side) before CenterCrop(size); None: as stored
    in_memory: bool = True
    files: bool = False                # the images come from files
    notes: dict = field(default_factory=dict)  # why each automatic choice was made, for describe()

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("notes")
        d["scale"], d["ratio"], d["mean"], d["std"] = list(self.scale), list(self.ratio), list(self.mean), list(self.std)
        return d

    @property
    def device_capable(self) -> bool:
        """Whether the device loader can run this training augmentation (no random-resized crop, no jitter)."""
        return self.crop in ("pad_crop", "none") and not self.color_jitter

    def describe(self, name: str, n_train: int) -> str:
        """One line: what the training and test images go through, and why."""
        grey = "grey" if self.channels == 1 else "RGB"
        if self.crop == "pad_crop" and self.padding:
            crop = f"pad-crop {self.padding}"
        elif self.crop == "random_resized_crop":
            crop = (f"random-resized-crop {self.size} scale {self.scale[0]:g}-{self.scale[1]:g} ratio "
                    f"{self.ratio[0]:.3g}-{self.ratio[1]:.3g}")
        else:
            crop = "no crop"
        ops = [crop] + (["flip"] if self.flip else []) + ([f"rotation {self.rotation:g}"] if self.rotation else []) \
            + (["colour jitter"] if self.color_jitter else [])
        stats = ",".join(f"{m:.4f}" for m in self.mean), ",".join(f"{s:.4f}" for s in self.std)
        auto = f" ({self.notes['auto']})" if self.notes.get("auto") else ""
        test = f"; test: resize {self.test_resize} + centre-crop {self.size}" if self.test_resize else ""
        where = (f"; in memory ({self.notes.get('bytes', 0) / 2 ** 20:,.1f} MiB decoded once, augmented on the device)"
                 if self.in_memory and self.files else "; decoded per epoch" if self.files else "")
        return (f"data: {name}, {n_train:,} training images {self.size}x{self.size} {grey}{auto}: {' + '.join(ops)}; "
                f"mean {stats[0]} std {stats[1]} ({self.notes.get('stats', 'the dataset constants')}){test}{where}")


# ---- looking at the images --------------------------------------------------------------------

def inspect_images(paths, k: int = SAMPLE_IMAGES) -> tuple[list[tuple[int, int]], bool]:
    """``(sizes (w, h), all_grey)`` of up to ``k`` images spread evenly over ``paths`` (headers only)."""
    n = len(paths)
    if not n:
        return [], False
    idx = np.unique(np.linspace(0, n - 1, min(k, n)).astype(np.int64))
    sizes, grey = [], True
    for i in idx:
        path = paths[int(i)]
        with open_image(path, path) as im:   # the header, with the pixel limit; one line for a bad file
            sizes.append(im.size)
            grey &= im.mode in GREY_MODES
    return sizes, grey


def luma(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 ``[3, H, W]`` -> ``[1, H, W]`` with PIL's ``convert("L")`` (ITU-R 601-2, integer rounding:
    ``(19595 R + 38470 G + 7471 B + 2**15) >> 16``); a grey image comes back unchanged."""
    if rgb.shape[0] == 1:
        return rgb
    if torch.equal(rgb[0], rgb[1]) and torch.equal(rgb[0], rgb[2]):
        return rgb[:1].clone()
    r, g, b = rgb.to(torch.int32).unbind(0)
    return ((19595 * r + 38470 * g + 7471 * b + 32768) >> 16).to(torch.uint8)[None]


def read_image(path, channels: int) -> torch.Tensor:
    """The image file ``path`` as uint8 ``[channels, H, W]`` (:func:`~balpoe.data.decode.read_rgb`,
    then :func:`luma` for one channel)."""
    img = read_rgb(path)
    return luma(img) if channels == 1 else img


class _Decoded(torch.utils.data.Dataset):
    """uint8 ``[C, size, size]`` test-geometry images of a :class:`FileSplit` (for loading into memory)."""

    def __init__(self, paths, channels: int, resize: int, size: int):
        self.paths, self.channels = list(paths), channels
        self.geometry = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(size)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.geometry(read_image(self.paths[i], self.channels))


def decode_split(split: FileSplit, pipe: Pipeline, idx=None, workers: int = 0) -> ArraySplit:
    """The images of ``split`` (those at ``idx``) decoded once at the pipeline's test geometry
    (``Resize(test_resize)`` -> ``CenterCrop(size)``) into an :class:`ArraySplit` of uint8
    ``[N, C, size, size]``."""
    paths = split.paths if idx is None else [split.paths[i] for i in idx]
    labels = np.asarray(split.labels, dtype=np.int64)
    labels = labels if idx is None else labels[np.asarray(idx, dtype=np.int64)]
    ds = _Decoded(paths, pipe.channels, pipe.test_resize, pipe.size)
    out = torch.empty((len(ds), pipe.channels, pipe.size, pipe.size), dtype=torch.uint8)
    workers = min(workers, os.cpu_count() or 1) if len(ds) >= 20_000 else 0
    loader = torch.utils.data.DataLoader(ds, batch_size=256, num_workers=workers)
    at = 0
    for batch in loader:
        out[at:at + len(batch)] = batch
        at += len(batch)
    return ArraySplit(out.numpy(), labels, list(split.class_names))


def channel_stats(images: torch.Tensor | np.ndarray) -> tuple[tuple, tuple]:
    """Per-channel mean and standard deviation (population) of uint8 images ``[N, C, H, W]``, in [0, 1]."""
    x = torch.as_tensor(images)
    c = x.shape[1]
    flat = x.transpose(0, 1).reshape(c, -1).double() / 255.0
    mean, std = flat.mean(1), flat.std(1, unbiased=False).clamp_min(1e-3)
    return tuple(round(float(m), 4) for m in mean), tuple(round(float(s), 4) for s in std)


# ---- resolving ----------------------------------------------------------------------------------

def _refuse(key: str, why: str) -> BalpoeError:
    return BalpoeError(f"recipe key '{key}' {why}")


def _check_crop_keys(a, crop: str, name: str) -> None:
    """Keys of one crop that do not apply to the chosen one are refused."""
    if crop != "pad_crop" and a.crop_padding is not None:
        raise _refuse("data.augment.crop_padding", f"does not apply to the crop {crop} of dataset {name!r} (it "
                      "pads the pad_crop crop): remove it or set data.augment.crop: pad_crop")
    if crop != "random_resized_crop":
        for key in ("crop_scale", "crop_ratio"):
            if getattr(a, key) is not None:
                raise _refuse(f"data.augment.{key}", f"does not apply to the crop {crop} of dataset {name!r}: remove "
                              "it or set data.augment.crop: random_resized_crop")


def _given_stats(cfg, channels: int, name: str):
    if cfg.mean is None:
        return None
    if len(cfg.mean) != channels:
        raise _refuse("data.mean", f"has {len(cfg.mean)} values but dataset {name!r} has {channels} channel(s)")
    return tuple(cfg.mean), tuple(cfg.std)


def array_pipeline(cfg, name: str, train: ArraySplit, keep, spec_mean, spec_std) -> Pipeline:
    """The pipeline of a built-in in-memory dataset (pad-and-crop, flip, rotation on the device);
    keys that only image files take are one-line errors."""
    a = cfg.augment
    for key, value in (("data.image_size", cfg.image_size), ("data.channels", cfg.channels),
                       ("data.test_crop_fraction", cfg.test_crop_fraction)):
        if value is not None:
            raise _refuse(key, f"does not apply to dataset {name!r}: its images are in memory at their own size "
                          f"({'x'.join(map(str, train.images.shape[1:]))})")
    if cfg.in_memory is False:
        raise _refuse("data.in_memory", f"is false but dataset {name!r} is always in memory (data.loader: dataloader "
                      "serves it through a DataLoader)")
    if a.color_jitter:
        raise _refuse("data.augment.color_jitter", f"does not apply to dataset {name!r} (colour jitter is an "
                      "image-file augmentation)")
    if a.crop == "random_resized_crop":
        raise _refuse("data.augment.crop", f"random_resized_crop does not apply to dataset {name!r} (in memory: "
                      "pad_crop or none)")
    crop = "pad_crop" if a.crop == "auto" else a.crop
    _check_crop_keys(a, crop, name)
    c, h = int(train.images.shape[1]), int(train.images.shape[2])
    stats, note = _given_stats(cfg, c, name), "given"
    if stats is None and cfg.normalize == "computed":
        stats, note = channel_stats(train.images[keep]), "computed on the training split"
    elif stats is None and cfg.normalize == "imagenet":
        stats, note = _imagenet(c), "ImageNet constants"
    elif stats is None:
        stats, note = (tuple(spec_mean), tuple(spec_std)), "the dataset constants"
    padding = (DEFAULT_PADDING if a.crop_padding is None else a.crop_padding) if crop == "pad_crop" else 0
    rotation = DEFAULT_ROTATION if a.rotation is None else a.rotation
    return Pipeline(crop, h, c, stats[0], stats[1], flip=a.flip, padding=padding, rotation=rotation,
                    notes={"stats": note})


def _imagenet(channels: int) -> tuple[tuple, tuple]:
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (round(sum(IMAGENET_MEAN) / 3, 4),), (round(sum(IMAGENET_STD) / 3, 4),)


def resolve_pipeline(cfg, name: str, train: FileSplit, *, official: bool, spec_mean, spec_std, spec_jitter: bool,
                     n_images: int, device: torch.device | None = None) -> Pipeline:
    """The pipeline of an image-file dataset (module docstring); ``official``: the official list
    datasets (always the ImageNet-style pipeline with the dataset's constants and 3 channels);
    ``n_images``: images of all splits together (for the memory budget).  Normalisation constants
    to be computed are left as None (:func:`finish_stats`)."""
    a = cfg.augment
    notes: dict = {}
    if official:
        small, grey = False, False
    else:
        sizes, grey = inspect_images(train.paths)
        longest = max((max(s) for s in sizes), default=0)
        small = 0 < longest <= SMALL_SIDE
        kind = "small" if small else "large"
        notes["auto"] = (f"auto: {kind}{' grey' if grey else ''} images, longest side {longest} px in "
                         f"{len(sizes)} sampled")
    crop = a.crop if a.crop != "auto" else "pad_crop" if small else "random_resized_crop"
    _check_crop_keys(a, crop, name)
    if cfg.image_size is not None:
        size = cfg.image_size
    elif small:
        size = int(np.median([min(s) for s in sizes]))
    else:
        size = 224
    channels = cfg.channels or (1 if grey else 3)
    if official and channels != 3:
        raise _refuse("data.channels", f"is {channels} but dataset {name!r} is RGB (its pretrained backbones and "
                      "constants are)")
    jitter = a.color_jitter
    if jitter is None:
        jitter = (spec_jitter or a.policy == "randaugment") if not small else False
    if cfg.test_crop_fraction is not None:
        test_resize = int(round(size / cfg.test_crop_fraction))
    elif crop == "random_resized_crop":
        test_resize = int(round(size * 256 / 224))
    else:
        test_resize = size
    stats = _given_stats(cfg, channels, name)
    if stats is not None:
        notes["stats"] = "given"
    elif cfg.normalize == "computed" or (cfg.normalize == "auto" and small):
        stats, notes["stats"] = (None, None), "computed on the training split"  # finished by the caller
    elif cfg.normalize == "imagenet" or not official:
        stats, notes["stats"] = _imagenet(channels), "ImageNet constants"
    else:
        stats, notes["stats"] = (tuple(spec_mean), tuple(spec_std)), "the dataset constants"
    pipe = Pipeline(crop, size, channels, stats[0], stats[1], flip=a.flip,
                    padding=(DEFAULT_PADDING if a.crop_padding is None else a.crop_padding) if crop == "pad_crop" else 0,
                    scale=tuple(a.crop_scale or DEFAULT_SCALE), ratio=tuple(a.crop_ratio or DEFAULT_RATIO),
                    rotation=0.0 if a.rotation is None else a.rotation, color_jitter=bool(jitter),
                    test_resize=test_resize, in_memory=False, files=True, notes=notes)
    nbytes = n_images * channels * size * size
    pipe.notes["bytes"] = nbytes
    if cfg.in_memory is True and not pipe.device_capable:
        what = "random_resized_crop" if pipe.crop == "random_resized_crop" else "colour jitter"
        raise _refuse("data.in_memory", f"is true but the pipeline has {what}, which runs on image files only: set "
                      "data.augment.crop: pad_crop and data.augment.color_jitter: false, or data.in_memory: auto")
    if cfg.in_memory == "auto":
        budget = IN_MEMORY_BUDGET
        if device is not None and torch.device(device).type == "cuda":
            free, _ = torch.cuda.mem_get_info(torch.device(device))
            budget = min(budget, free // 4)
        pipe.in_memory = pipe.device_capable and nbytes <= budget and not official
    else:
        pipe.in_memory = bool(cfg.in_memory)
    return pipe


def file_stats(split: FileSplit, pipe: Pipeline, idx, seed: int = 0) -> tuple[tuple, tuple]:
    """Mean / std of up to :data:`STATS_SAMPLE` training images (``idx`` of ``split``) at the test geometry."""
    idx = np.asarray(idx, dtype=np.int64)
    if len(idx) > STATS_SAMPLE:
        idx = np.sort(np.random.default_rng(seed).choice(idx, STATS_SAMPLE, replace=False))
    return channel_stats(decode_split(split, pipe, idx).images)


def pipeline_transform(pipe: Pipeline, train: bool, augment) -> T.Compose:
    """The torchvision transform of an image-file pipeline kept on disk (PIL-style ops; the image
    dataset runs them on tensors, :func:`~balpoe.data.decode.tensor_transform`).

    ``random_resized_crop``: :func:`~balpoe.data.augment.folder_transform` (the official pipeline
    with the defaults).  ``pad_crop`` / ``none``: ``Resize(test_resize)`` -> ``CenterCrop(size)`` ->
    ``RandomCrop(size, padding)`` -> flip -> rotation -> jitter -> policy -> ``ToTensor`` -> Cutout ->
    ``Normalize``; the test transform is the first two, ``ToTensor`` and ``Normalize``."""
    a = augment
    policy_fill = None if a.fill is None else tuple(a.fill)
    if pipe.crop == "random_resized_crop":
        return folder_transform(train, pipe.mean, pipe.std, pipe.size, color_jitter=pipe.color_jitter,
                                policy=a.policy, randaugment=a.randaugment, cutout_length=a.cutout,
                                interpolation=a.interpolation, flip=pipe.flip, scale=pipe.scale, ratio=pipe.ratio,
                                rotation=pipe.rotation, test_resize=pipe.test_resize, policy_fill=policy_fill)
    ops: list = [T.Resize(pipe.test_resize), T.CenterCrop(pipe.size)]
    if train:
        if pipe.crop == "pad_crop" and pipe.padding:
            ops.append(T.RandomCrop(pipe.size, padding=pipe.padding))
        if pipe.flip:
            ops.append(T.RandomHorizontalFlip())
        if pipe.rotation:
            ops.append(T.RandomRotation(pipe.rotation))
        if pipe.color_jitter:
            ops.append(T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0))
        strong = policy_transform(a.policy, a.randaugment, tuple(round(255 * m) for m in pipe.mean), a.interpolation,
                                  policy_fill)
        if strong is not None:
            ops.append(strong)
    ops.append(T.ToTensor())
    if train and a.cutout:
        ops.append(Cutout(a.cutout))
    return T.Compose(ops + [T.Normalize(pipe.mean, pipe.std)])

