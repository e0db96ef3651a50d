"""The ``DataLoader`` path: image-file datasets, and in-memory arrays served one PIL image at a time.

:class:`FolderLoader` wraps a ``torch.utils.data.DataLoader`` with the interface of
:class:`~balpoe.data.device_loader.DeviceLoader` (``set_epoch``, ``num_samples``, ``len``,
iteration over ``(x, y)`` batches), so the trainer does not care which one it has.
:class:`ArrayImageDataset` with :func:`array_transforms` is the official code's pipeline for
CIFAR-style arrays (PIL + torchvision transforms in worker processes): the reference the
device-resident path is compared against (``data.loader: dataloader``).
"""

from __future__ import annotations

import math
import re

import torch
from PIL import Image
from torchvision import transforms as T

from balpoe.data.augment import Cutout, policy_transform
from balpoe.data.bundle import ImageArrays
from balpoe.data.samplers import ClassAwareSampler, ClassBalancedSampler
from balpoe.errors import BalpoeError, clip
from balpoe.runtime.seeding import stream_seed


class ArrayImageDataset(torch.utils.data.Dataset):
    """In-memory uint8 images ``[N, C, H, W]`` served through PIL and torchvision transforms."""

    def __init__(self, arrays: ImageArrays, transform):
        self.images, self.labels, self.transform = arrays.images.cpu(), arrays.labels.cpu(), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = self.images[i].permute(1, 2, 0).numpy()
        img = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)
        return self.transform(img), self.labels[i]


def array_transforms(size: tuple[int, int], mean, std, train: bool, padding: int = 0, flip: bool = False,
                     rotation: float = 0.0, policy: str = "none", randaugment: str = "rand-n2-m10-mstd0.5",
                     cutout_length: int = 0, interpolation: str | None = None,
                     policy_fill: tuple[int, ...] | None = None) -> T.Compose:
    """torchvision twin of the device path: ``RandomCrop(size, padding)`` -> ``RandomHorizontalFlip``
    -> ``RandomRotation(rotation)`` -> policy (:func:`~balpoe.data.augment.policy_transform`) ->
    ``ToTensor`` -> Cutout (train only) -> ``Normalize(mean, std)``."""
    ops = []
    if train:
        if padding:
            ops.append(T.RandomCrop(size, padding=padding))
        if flip:
            ops.append(T.RandomHorizontalFlip())
        if rotation:
            ops.append(T.RandomRotation(rotation))
        strong = policy_transform(policy, randaugment, tuple(round(255 * m) for m in mean), interpolation,
                                  policy_fill)
        if strong is not None:
            ops.append(strong)
    ops.append(T.ToTensor())
    if train and cutout_length:
        ops.append(Cutout(cutout_length))
    return T.Compose(ops + [T.Normalize(mean, std)])


class FolderLoader:
    """A ``DataLoader`` over ``dataset`` with per-epoch seeding and DDP sharding.

    Training: shuffled (``sampler='instance'``), class-balanced (``'class_balanced'``,
    :class:`~balpoe.data.samplers.ClassBalancedSampler`) or class-aware (``'class_aware'``,
    :class:`~balpoe.data.samplers.ClassAwareSampler`: ``ceil(n / B) + 1`` global batches of
    ``B = batch_size * world_size``, ``images_per_class_visit`` images per class visit); under DDP
    ``DistributedSampler`` semantics.  The shuffle and the sampler are re-seeded in
    :meth:`set_epoch` from the ``order`` stream of :mod:`balpoe.runtime.seeding`."""

    def __init__(self, dataset, labels: torch.Tensor, batch_size: int, *, train: bool, sampler: str = "instance",
                 seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 images_per_class_visit: int = 4):
        self.seed, self.world_size = seed, world_size
        if train and sampler == "class_balanced":
            self.sampler = ClassBalancedSampler(labels, seed=seed, rank=rank, world_size=world_size)
        elif train and sampler == "class_aware":
            self.sampler = ClassAwareSampler(labels, batch_size * world_size, images_per_class_visit, seed=seed,
                                             rank=rank, world_size=world_size)
        elif world_size > 1:
            self.sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                                               shuffle=train, seed=seed)
        else:
            self.sampler = None
        self.generator = torch.Generator().manual_seed(seed)
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=train and self.sampler is None, sampler=self.sampler,
            generator=self.generator, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
            persistent_workers=num_workers > 0, drop_last=False)
        self.batch_size = batch_size

    def set_epoch(self, epoch: int) -> None:
        if self.sampler is not None and hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        self.generator.manual_seed(stream_seed(self.seed, epoch, "order"))

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        return len(self.sampler) if self.sampler is not None else math.ceil(len(self.loader.dataset) / self.world_size)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        """The ``DataLoader``'s batches; a one-line :class:`BalpoeError` raised in a worker process
        (an unreadable image) stays one line here, without the worker's traceback that the
        ``DataLoader`` appends to it, and a worker that dies is a one-line error too."""
        it = iter(self.loader)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except BalpoeError as e:
                raise BalpoeError(worker_message(str(e))) from None
            except RuntimeError as e:
                if not str(e).startswith("DataLoader worker"):
                    raise
                raise BalpoeError(f"a data-loading worker process died ({clip(str(e).splitlines()[0])}): a native "
                                  "decoder crashed on a file? data.num_workers: 0 shows which") from None
            yield batch


def worker_message(text: str) -> str:
    """The one-line message of an error raised in a ``DataLoader`` worker: the ``DataLoader`` re-raises
    it as ``"Caught BalpoeError in DataLoader worker process 0.\\nOriginal Traceback ...\\n
    balpoe.errors.BalpoeError: <message>"``, whose last line holds the message."""
    if "\nOriginal Traceback" not in text:
        return text
    last = next((line for line in reversed(text.splitlines()) if line.strip()), text)
    return _EXCEPTION_PREFIX.sub("", last, count=1)


_EXCEPTION_PREFIX = re.compile(r"^[\w.]+: ")  # the exception class, as a traceback names it
