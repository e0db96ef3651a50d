"""Sampling schemes: instance-balanced (a permutation) and class-balanced (MiSLAS stage 2).

Both return index tensors, so the device-resident loader and the DataLoader path share them.
"""

from __future__ import annotations

import math

import torch

from balpoe.runtime.seeding import torch_stream


def instance_balanced_indices(num_samples: int, generator: torch.Generator, device=None) -> torch.Tensor:
    """A uniformly random permutation of ``range(num_samples)`` (every image once per epoch)."""
    return torch.randperm(num_samples, generator=generator, device=device)


def class_balanced_indices(labels: torch.Tensor, num_samples: int, generator: torch.Generator) -> torch.Tensor:
    """Class-balanced sampling: each draw picks a class uniformly at random, then an image of that
    class uniformly at random (with replacement).  ``num_samples`` draws; an epoch uses
    ``num_samples = len(labels)``.  Runs on ``labels.device`` with ``generator`` (same device)."""
    device = labels.device
    num_classes = int(labels.max().item()) + 1
    counts = torch.bincount(labels, minlength=num_classes)
    present = torch.nonzero(counts > 0).flatten()
    order = torch.argsort(labels, stable=True)  # indices grouped by class
    starts = torch.cumsum(counts, 0) - counts
    cls = present[torch.randint(len(present), (num_samples,), generator=generator, device=device)]
    offset = (torch.rand(num_samples, generator=generator, device=device) * counts[cls]).long()
    offset = torch.minimum(offset, counts[cls] - 1)
    return order[starts[cls] + offset]


class ClassBalancedSampler(torch.utils.data.Sampler[int]):
    """``torch.utils.data.Sampler`` over :func:`class_balanced_indices` for the DataLoader path.
    Call :meth:`set_epoch` before each epoch (as with ``DistributedSampler``) for a fresh draw.
    Under DDP every rank draws the same global epoch and keeps positions ``rank::world_size``
    (padded by wrapping so all ranks get ``ceil(num_samples / world_size)``)."""

    def __init__(self, labels, num_samples: int | None = None, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.total = len(self.labels) if num_samples is None else num_samples
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_samples = math.ceil(self.total / world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        idx = class_balanced_indices(self.labels, self.total, torch_stream(self.seed, self.epoch, "order"))
        padded = self.num_samples * self.world_size
        if padded > self.total:
            idx = torch.cat([idx, idx[: padded - self.total]])
        return iter(idx[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return self.num_samples
