"""Device-resident loader for small datasets (airbench-style).

The whole split lives on the training device as one uint8 tensor ``[N, C, H, W]``; each batch is
indexed, augmented per sample and normalised there.  Randomness comes from the per-epoch streams of
:mod:`balpoe.runtime.seeding` (``order``, ``augment``), so an epoch is reproducible and a resumed run
sees exactly the batches an uninterrupted run would.  Under ``torch.distributed`` each rank takes
the ``rank::world_size`` slice of the epoch's index order (``DistributedSampler`` semantics: the
order is padded by wrapping so every rank gets the same number of samples).  The ``class_aware``
sampler (MiSLAS stage 2) draws ``ceil(n / B) + 1`` full global batches an epoch
(:func:`~balpoe.data.samplers.class_aware_epoch_samples`, ``B = batch_size * world_size``).
"""

from __future__ import annotations

import math

import torch

from balpoe.data.augment import augment_batch, normalize
from balpoe.data.samplers import (class_aware_epoch_samples, class_aware_indices, class_balanced_indices,
                                  instance_balanced_indices)
from balpoe.runtime.seeding import torch_stream


class DeviceLoader:
    """Iterate ``(x float [B, C, H, W], y int64 [B])`` batches of an in-memory uint8 dataset."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, mean, std, *,
                 train: bool = False, padding: int = 0, flip: bool = False, rotation: float = 0.0,
                 sampler: str = "instance", images_per_class_visit: int = 4, drop_last: bool = False,
                 seed: int = 0, rank: int = 0,
                 world_size: int = 1, channels_last: bool = False, strong: dict | None = None):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError("DeviceLoader expects uint8 images [N, C, H, W]")
        self.images, self.labels = images, labels
        self.device = images.device
        self.batch_size, self.train, self.sampler = batch_size, train, sampler
        self.images_per_class_visit = images_per_class_visit
        self.padding, self.flip, self.rotation = padding, flip, rotation
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=self.device)
        self.drop_last, self.seed, self.rank, self.world_size = drop_last, seed, rank, world_size
        self.channels_last = channels_last
        # strong per-sample augmentation after crop/flip/rotation: policy, randaugment, cutout_length,
        # interpolation, policy_fill (augment_batch's keywords); RandAugment fills with the dataset mean by default
        self.strong = dict(strong or {})
        self.strong.setdefault("fill", tuple(round(255 * float(m)) for m in mean))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        if self.train and self.sampler == "class_aware":
            return class_aware_epoch_samples(len(self.labels), self.batch_size * self.world_size) // self.world_size
        return math.ceil(len(self.labels) / self.world_size)

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _order(self, generator: torch.Generator) -> torch.Tensor:
        n = len(self.labels)
        if not self.train:
            order = torch.arange(n, device=self.device)
        elif self.sampler == "class_balanced":
            order = class_balanced_indices(self.labels, n, generator)
        elif self.sampler == "class_aware":  # one global epoch of num_samples * world_size indices
            order = class_aware_indices(self.labels, self.num_samples * self.world_size, generator,
                                        self.images_per_class_visit)
        else:
            order = instance_balanced_indices(n, generator, device=self.device)
        if self.world_size > 1:
            total = self.num_samples * self.world_size
            if total > len(order):
                order = torch.cat([order, order[: total - len(order)]])
            order = order[self.rank::self.world_size]
        return order

    def __iter__(self):
        # the global order is identical on every rank; the augmentation draws are per rank
        order = self._order(torch_stream(self.seed, self.epoch, "order", device=self.device))
        aug = torch_stream(self.seed, self.epoch, "augment", self.rank, device=self.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.images[idx]
            if self.train:
                x = augment_batch(x, self.padding, self.flip, self.rotation, aug, **self.strong)
            x = normalize(x, self.mean, self.std)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx]
