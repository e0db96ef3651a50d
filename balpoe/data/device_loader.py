"""Device-resident loader for small datasets (airbench-style).

The whole split lives on the training device as one uint8 tensor ``[N, C, H, W]``; each batch is
indexed, augmented per sample and normalised there.  Randomness comes from the per-epoch streams of
:mod:`balpoe.runtime.seeding` (``order``, ``augment``), so an epoch is reproducible and a resumed run
sees exactly the batches an uninterrupted run would.  Under ``torch.distributed`` each rank takes
the ``rank::world_size`` slice of the epoch's index order (``DistributedSampler`` semantics: the
order is padded by wrapping so every rank gets the same number of samples).
"""

from __future__ import annotations

import math

import torch

from balpoe.data.augment import augment_batch, normalize
from balpoe.data.samplers import class_balanced_indices, instance_balanced_indices
from balpoe.runtime.seeding import torch_stream


class DeviceLoader:
    """Iterate ``(x float [B, C, H, W], y int64 [B])`` batches of an in-memory uint8 dataset."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, mean, std, *,
                 train: bool = False, padding: int = 0, flip: bool = False, rotation: float = 0.0,
                 sampler: str = "instance", drop_last: bool = False, seed: int = 0, rank: int = 0,
                 world_size: int = 1, channels_last: bool = False):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError("DeviceLoader expects uint8 images [N, C, H, W]")
        self.images, self.labels = images, labels
        self.device = images.device
        self.batch_size, self.train, self.sampler = batch_size, train, sampler
        self.padding, self.flip, self.rotation = padding, flip, rotation
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=self.device)
        self.drop_last, self.seed, self.rank, self.world_size = drop_last, seed, rank, world_size
        self.channels_last = channels_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
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
        else:
            order = instance_balanced_indices(n, generator, device=self.device)
        if self.world_size > 1:
            total = self.num_samples * self.world_size
            if total > n:
                order = torch.cat([order, order[: total - n]])
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
                x = augment_batch(x, self.padding, self.flip, self.rotation, aug)
            x = normalize(x, self.mean, self.std)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx]
