"""Sampling schemes: instance-balanced (a permutation), class-balanced and class-aware (MiSLAS stage 2).

Each returns index tensors, so the device-resident loader and the DataLoader path share them:

* ``instance``: every image once per epoch (:func:`instance_balanced_indices`);
* ``class_balanced``: class and image drawn independently, with replacement, ``n`` draws an epoch
  (:func:`class_balanced_indices`);
* ``class_aware``: the official MiSLAS stage-2 stream (``ClassAwareSampler`` of the decoupling code,
  Kang et al. 2020, used by ``datasets/cifar10.py`` etc. of dvlab-research/MiSLAS): classes visited
  in shuffled cycles, a few images per visit, each class's images cycled without replacement
  (:func:`class_aware_indices`), ``ceil(n / B) + 1`` batches an epoch (:func:`class_aware_epoch_samples`).

Both balanced samplers give every class the same expected share of the stream (a uniform label prior).
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


def class_aware_epoch_samples(num_images: int, batch_size: int) -> int:
    """Images of one class-aware epoch: ``(ceil(num_images / batch_size) + 1) * batch_size``, i.e.
    ``ceil(n / B) + 1`` full batches (``batch_size``: the global batch ``B``).

    The official MiSLAS stage 2 (``train_stage2.py``) sets ``end_steps = ceil(n / B)`` and leaves the
    loop after batch ``i > end_steps``, so it trains on ``end_steps + 1`` batches; its
    ``ClassAwareSampler.__len__`` (``max_c N_c * C``) is never reached."""
    if num_images < 1 or batch_size < 1:
        raise ValueError(f"class-aware epoch of {num_images} images in batches of {batch_size}")
    return (math.ceil(num_images / batch_size) + 1) * batch_size


def class_aware_indices(labels: torch.Tensor, num_samples: int, generator: torch.Generator,
                        images_per_visit: int = 4) -> torch.Tensor:
    """Class-aware sampling, the official MiSLAS stage-2 stream (``ClassAwareSampler`` with
    ``num_samples_cls = images_per_visit``, 4 in MiSLAS), ``num_samples`` indices:

    * classes are visited in cycles: each cycle is a fresh random permutation of the classes that
      have images, so over any stretch of visits the class counts differ by at most one visit;
    * each visit yields the next ``images_per_visit`` images of that class (consecutive in the stream);
    * each class's images are cycled without replacement: a fresh random permutation of the class,
      then another one when it is used up (so no image repeats before all of its class were used).

    Deterministic for ``generator``'s state; runs on ``labels.device`` (``generator`` on the same
    device).  Difference from the official sampler, on purpose: its cycles continue across epochs
    (Python ``random``, one sampler object for the run); here every epoch starts fresh cycles from
    its own ``order`` stream, so an epoch replays exactly (resume, DDP)."""
    if images_per_visit < 1:
        raise ValueError(f"images_per_visit must be >= 1, got {images_per_visit}")
    device = labels.device
    num_classes = int(labels.max().item()) + 1
    counts = torch.bincount(labels, minlength=num_classes)
    present = torch.nonzero(counts > 0).flatten()
    C = len(present)
    visits = math.ceil(num_samples / images_per_visit)
    rounds = math.ceil(visits / C)
    # class of each visit: `rounds` shuffled cycles of the present classes; visit v is round v // C
    cycle = torch.argsort(torch.rand(rounds, C, generator=generator, device=device), dim=1)
    visit_cls = present[cycle.flatten()[:visits]]                              # [V] class ids
    # per class, a stream of `need` positions: ceil(need / N_c) random permutations of its images
    # laid end to end (position p of class c is its image perm_{p // N_c}[p % N_c])
    need = rounds * images_per_visit
    n_c = counts[present]                                                      # [C]
    reps = (need + n_c - 1) // n_c                                             # permutations per class
    seg_len = n_c.repeat_interleave(reps)                                      # [S] one segment per permutation
    seg_cls = torch.arange(C, device=device).repeat_interleave(reps)           # [S]
    seg_id = torch.arange(len(seg_len), device=device).repeat_interleave(seg_len)  # [M] slot -> segment
    seg_start = torch.cumsum(seg_len, 0) - seg_len
    within = torch.arange(len(seg_id), device=device) - seg_start[seg_id]      # slot's rank in its segment
    by_class = torch.argsort(labels, stable=True)                              # images grouped by class
    class_start = torch.cumsum(counts, 0) - counts
    members = by_class[class_start[present][seg_cls[seg_id]] + within]         # [M] image of each slot, in order
    # shuffle each segment: sort by (segment, random key)
    keys = torch.rand(len(seg_id), generator=generator, device=device)
    perm = torch.argsort(keys)
    perm = perm[torch.argsort(seg_id[perm], stable=True)]
    stream = members[perm]                                                     # classes' streams end to end
    stream_start = torch.cumsum(n_c * reps, 0) - n_c * reps                    # [C] first slot of each class
    # draw d: visit v = d // k, j = d % k; class rank r; position p = (v // C) * k + j in class r's stream
    d = torch.arange(num_samples, device=device)
    v, j = d // images_per_visit, d % images_per_visit
    rank_of = torch.empty(num_classes, dtype=torch.long, device=device)
    rank_of[present] = torch.arange(C, device=device)
    r = rank_of[visit_cls[v]]
    return stream[stream_start[r] + (v // C) * images_per_visit + j]


class _EpochSampler(torch.utils.data.Sampler[int]):
    """A ``torch.utils.data.Sampler`` drawing one global epoch of ``total`` indices from the ``order``
    stream of :mod:`balpoe.runtime.seeding`; call :meth:`set_epoch` before each epoch (as with
    ``DistributedSampler``).  Under DDP every rank draws the same global epoch and keeps positions
    ``rank::world_size`` (padded by wrapping so all ranks get ``ceil(total / world_size)``)."""

    def __init__(self, labels, total: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.total = total
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_samples = math.ceil(self.total / world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def __iter__(self):
        idx = self._indices(torch_stream(self.seed, self.epoch, "order"))
        padded = self.num_samples * self.world_size
        if padded > self.total:
            idx = torch.cat([idx, idx[: padded - self.total]])
        return iter(idx[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return self.num_samples


class ClassBalancedSampler(_EpochSampler):
    """``torch.utils.data.Sampler`` over :func:`class_balanced_indices` for the DataLoader path
    (``num_samples`` draws a global epoch, default ``len(labels)``); ``set_epoch`` and DDP sharding
    as :class:`_EpochSampler`."""

    def __init__(self, labels, num_samples: int | None = None, seed: int = 0, rank: int = 0, world_size: int = 1):
        labels = torch.as_tensor(labels, dtype=torch.long)
        super().__init__(labels, len(labels) if num_samples is None else num_samples, seed, rank, world_size)

    def _indices(self, generator: torch.Generator) -> torch.Tensor:
        return class_balanced_indices(self.labels, self.total, generator)


class ClassAwareSampler(_EpochSampler):
    """``torch.utils.data.Sampler`` over :func:`class_aware_indices` for the DataLoader path: a
    global epoch of ``num_samples`` indices (default :func:`class_aware_epoch_samples` of
    ``len(labels)`` with ``batch_size``, the global batch), ``images_per_visit`` images per class
    visit; ``set_epoch`` and DDP sharding as :class:`_EpochSampler`."""

    def __init__(self, labels, batch_size: int = 1, images_per_visit: int = 4, num_samples: int | None = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        labels = torch.as_tensor(labels, dtype=torch.long)
        total = class_aware_epoch_samples(len(labels), batch_size) if num_samples is None else num_samples
        super().__init__(labels, total, seed, rank, world_size)
        self.images_per_visit = images_per_visit

    def _indices(self, generator: torch.Generator) -> torch.Tensor:
        return class_aware_indices(self.labels, self.total, generator, self.images_per_visit)
