"""Class-balanced sampling (MiSLAS stage 2): classes uniform, images uniform within a class; and the
official MiSLAS class-aware sampler (classes in shuffled cycles, images cycled without replacement)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from balpoe.data.device_loader import DeviceLoader
from balpoe.data.folder_loader import FolderLoader
from balpoe.data.lt import lt_class_counts
from balpoe.data.samplers import (ClassAwareSampler, ClassBalancedSampler, class_aware_epoch_samples,
                                  class_aware_indices, class_balanced_indices, instance_balanced_indices)
from balpoe.runtime.seeding import torch_stream

Z_999 = 3.090232306167813  # standard normal quantile at 0.999 (one-sided p = 0.001)
# chi-square critical values at p = 0.001 from the standard table (Abramowitz & Stegun, Table 26.8;
# NIST/SEMATECH e-Handbook, Sec. 1.3.6.7.4)
CHI2_CRIT_001 = {9: 27.877, 19: 43.820, 49: 85.351}


def chi2_critical(df: int) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at 1 - 0.001:
    df * (1 - 2/(9 df) + z * sqrt(2/(9 df)))**3 (relative error < 1% for df >= 9, ~2e-5 at df = 1000)."""
    return df * (1 - 2 / (9 * df) + Z_999 * math.sqrt(2 / (9 * df))) ** 3


def chi2_statistic(observed: torch.Tensor, expected: torch.Tensor) -> float:
    observed, expected = observed.double(), expected.double()
    return float(((observed - expected) ** 2 / expected).sum())


def lt_labels(num_classes=20, n_max=500, imb=100, seed=0) -> torch.Tensor:
    counts = lt_class_counts(n_max, num_classes, imb)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]  # unsorted


def class_uniformity_stat(drawn_labels: torch.Tensor, classes: torch.Tensor) -> tuple[float, int]:
    obs = torch.bincount(drawn_labels, minlength=int(classes.max()) + 1)[classes]
    expected = torch.full((len(classes),), len(drawn_labels) / len(classes), dtype=torch.float64)
    return chi2_statistic(obs, expected), len(classes) - 1


def test_wilson_hilferty_matches_table():
    for df, crit in CHI2_CRIT_001.items():
        assert chi2_critical(df) == pytest.approx(crit, rel=1e-2)


def test_classes_drawn_uniformly():
    labels = lt_labels()
    counts = torch.bincount(labels)
    assert counts.max() / counts.min() >= 90  # really long-tailed
    idx = class_balanced_indices(labels, 100_000, torch.Generator().manual_seed(1))
    assert idx.shape == (100_000,) and idx.dtype == torch.long
    assert idx.min() >= 0 and idx.max() < len(labels)
    stat, df = class_uniformity_stat(labels[idx], torch.arange(20))
    assert df == 19
    assert stat < CHI2_CRIT_001[19], stat
    # the same test rejects instance-balanced draws (it has the power to see the long tail)
    inst = torch.randint(0, len(labels), (100_000,), generator=torch.Generator().manual_seed(1))
    assert class_uniformity_stat(labels[inst], torch.arange(20))[0] > 100 * CHI2_CRIT_001[19]


def test_images_uniform_within_each_class():
    labels = lt_labels()
    idx = class_balanced_indices(labels, 100_000, torch.Generator().manual_seed(2))
    hits = torch.bincount(idx, minlength=len(labels))  # draws of each image
    stat, df = 0.0, 0
    for c in range(20):
        members = torch.nonzero(labels == c).flatten()
        obs = hits[members]
        if len(members) > 1:  # given the class's draws, its images are a uniform multinomial
            stat += chi2_statistic(obs, torch.full((len(members),), obs.sum().item() / len(members)))
            df += len(members) - 1
        assert (obs > 0).all()  # every image of the class can be drawn (>= 5000/500 expected each)
    assert df == len(labels) - 20
    assert stat < chi2_critical(df), (stat, df, chi2_critical(df))
    # power check: a sampler biased to the first half of each class is rejected
    biased = hits.clone().double()
    for c in range(20):
        members = torch.nonzero(labels == c).flatten()
        biased[members[: len(members) // 2]] *= 1.5
    stat_b = sum(chi2_statistic(biased[m], torch.full((len(m),), biased[m].sum().item() / len(m)))
                 for m in (torch.nonzero(labels == c).flatten() for c in range(20)) if len(m) > 1)
    assert stat_b > chi2_critical(df)


def test_absent_classes_never_drawn():
    labels = torch.tensor([0] * 50 + [2] * 5 + [5] * 1 + [3] * 20)  # classes 1 and 4 have no image
    idx = class_balanced_indices(labels, 60_000, torch.Generator().manual_seed(3))
    drawn = labels[idx]
    assert set(drawn.unique().tolist()) == {0, 2, 3, 5}
    stat, df = class_uniformity_stat(drawn, torch.tensor([0, 2, 3, 5]))
    assert df == 3 and stat < 16.266  # chi-square(3) at p = 0.001 (same table)
    assert (idx[drawn == 5] == 55).all()  # the single image of class 5


def test_deterministic_for_a_generator_seed():
    labels = lt_labels()
    a = class_balanced_indices(labels, 1000, torch.Generator().manual_seed(4))
    b = class_balanced_indices(labels, 1000, torch.Generator().manual_seed(4))
    c = class_balanced_indices(labels, 1000, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, c)
    perm = instance_balanced_indices(len(labels), torch.Generator().manual_seed(4))
    assert torch.equal(perm.sort().values, torch.arange(len(labels)))


def test_class_balanced_sampler():
    labels = lt_labels(num_classes=10, n_max=300, imb=50)
    sampler = ClassBalancedSampler(labels.numpy(), num_samples=60_000, seed=7)
    assert len(sampler) == 60_000
    sampler.set_epoch(0)
    first = list(sampler)
    assert len(first) == 60_000 and all(isinstance(i, int) for i in first[:10])
    assert first == list(sampler)  # same epoch, same draw
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    for draw in (first, second):
        stat, df = class_uniformity_stat(labels[torch.tensor(draw)], torch.arange(10))
        assert df == 9 and stat < CHI2_CRIT_001[9], stat
    # default: one epoch = len(labels) draws; list input works
    plain = ClassBalancedSampler(labels.tolist())
    assert len(plain) == len(labels) == len(list(plain))
    loader = torch.utils.data.DataLoader(np.arange(len(labels)), batch_size=64, sampler=plain)
    assert sum(len(b) for b in loader) == len(labels)


def test_class_balanced_sampler_shards_one_global_draw_across_ranks():
    from balpoe.data.samplers import ClassBalancedSampler
    labels = torch.tensor([0] * 40 + [1] * 7 + [2] * 2)
    full = list(ClassBalancedSampler(labels, seed=4))
    shards = [ClassBalancedSampler(labels, seed=4, rank=r, world_size=2) for r in range(2)]
    a, b = list(shards[0]), list(shards[1])
    assert len(a) == len(b) == len(shards[0]) == 25
    padded = full + full[:1]
    assert a == padded[0::2] and b == padded[1::2]


# ------------------------------------------------------------------ class-aware (official MiSLAS stage 2)

def check_class_aware(labels: torch.Tensor, idx: torch.Tensor, k: int) -> None:
    """The structure of the official ClassAwareSampler stream: runs of ``k`` images of one class,
    classes visited in shuffled cycles of all present classes, each class's images cycled without
    replacement."""
    present = torch.unique(labels)
    C = len(present)
    drawn = labels[idx]
    visits = [drawn[v:v + k] for v in range(0, len(idx), k)]
    assert all((vis == vis[0]).all() for vis in visits)  # one class per visit
    visit_cls = torch.stack([vis[0] for vis in visits])
    for start in range(0, len(visit_cls), C):  # each cycle: every class once (the last may be cut short)
        cycle = visit_cls[start:start + C]
        assert len(torch.unique(cycle)) == len(cycle)
        if len(cycle) == C:
            assert torch.equal(cycle.sort().values, present)
    counts = torch.bincount(drawn, minlength=int(labels.max()) + 1)[present]
    assert counts.max() - counts.min() <= k  # per epoch the classes differ by at most one visit
    for c in present.tolist():
        members = torch.nonzero(labels == c).flatten()
        seq = idx[drawn == c]  # class c's images in the order drawn
        n_c = len(members)
        for s in range(0, len(seq), n_c):  # no image repeats before all of the class were used
            chunk = seq[s:s + n_c]
            assert len(torch.unique(chunk)) == len(chunk)
            assert torch.isin(chunk, members).all()
            if len(chunk) == n_c:
                assert torch.equal(chunk.sort().values, members.sort().values)


@pytest.mark.parametrize("k", [1, 4, 5])
def test_class_aware_stream_structure(k):
    labels = lt_labels(num_classes=10, n_max=200, imb=50)  # 200 .. 4 images
    for seed in range(3):
        n = class_aware_epoch_samples(len(labels), 64)
        idx = class_aware_indices(labels, n, torch.Generator().manual_seed(seed), k)
        assert idx.shape == (n,) and idx.dtype == torch.long
        check_class_aware(labels, idx, k)
    # a stream that is not a multiple of k, and one much longer than an epoch (many cycles per class)
    check_class_aware(labels, class_aware_indices(labels, 1001, torch.Generator().manual_seed(9), k)[:1001 // k * k], k)
    check_class_aware(labels, class_aware_indices(labels, 20_000, torch.Generator().manual_seed(9), k), k)


def test_class_aware_absent_and_single_image_classes():
    labels = torch.tensor([0] * 50 + [2] * 5 + [5] * 1 + [3] * 20)  # classes 1 and 4 have no image
    idx = class_aware_indices(labels, 4000, torch.Generator().manual_seed(3), 4)
    drawn = labels[idx]
    assert set(drawn.unique().tolist()) == {0, 2, 3, 5}
    assert (idx[drawn == 5] == 55).all()  # the single image of class 5 (4 times a visit, as the official)
    check_class_aware(labels, idx, 4)
    with pytest.raises(ValueError):
        class_aware_indices(labels, 10, torch.Generator(), 0)


def test_class_aware_is_uniform_over_classes_and_images():
    # each visit cycle is a uniformly random permutation; each class cycle a uniformly random
    # permutation of its images: the first visited class and class 0's first image are uniform.
    labels = torch.tensor([0] * 6 + [1] * 3 + [2] * 2 + [3] * 1)
    first_cls, first_img = [], []
    for s in range(1200):
        idx = class_aware_indices(labels, 8, torch.Generator().manual_seed(s), 1)
        first_cls.append(int(labels[idx[0]]))
        first_img.append(int(idx[labels[idx] == 0][0]) if (labels[idx] == 0).any() else -1)
    obs = torch.bincount(torch.tensor(first_cls), minlength=4)
    assert chi2_statistic(obs, torch.full((4,), 300.0)) < 16.266  # chi-square(3) at p = 0.001
    imgs = torch.tensor([i for i in first_img if i >= 0])
    assert len(imgs) == 1200  # 8 visits of 4 classes: class 0 always visited
    assert chi2_statistic(torch.bincount(imgs, minlength=6), torch.full((6,), 200.0)) < 20.515  # chi2(5), p=.001


def test_class_aware_epoch_length_is_the_official_one():
    # official train_stage2.py: end_steps = ceil(n / B), loop until i > end_steps -> ceil(n/B) + 1 batches
    assert class_aware_epoch_samples(12_406, 128) == 98 * 128   # CIFAR-10-LT IR100: 97 + 1 batches
    assert class_aware_epoch_samples(256, 128) == 3 * 128
    labels = lt_labels(num_classes=10, n_max=100, imb=10)
    n = len(labels)
    images = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    dl = DeviceLoader(images, labels, 32, [0.5], [0.25], train=True, sampler="class_aware")
    assert len(dl) == math.ceil(n / 32) + 1 and dl.num_samples == len(dl) * 32
    batches = [y for _, y in dl]
    assert len(batches) == len(dl) and all(len(y) == 32 for y in batches)  # full batches only
    # evaluation loaders ignore the sampler
    assert len(DeviceLoader(images, labels, 32, [0.5], [0.25], sampler="class_aware")) == math.ceil(n / 32)
    sampler = ClassAwareSampler(labels, 32, seed=1)
    assert len(sampler) == len(list(sampler)) == (math.ceil(n / 32) + 1) * 32
    loader = torch.utils.data.DataLoader(np.arange(n), batch_size=32, sampler=sampler)
    assert len(loader) == math.ceil(n / 32) + 1


def test_class_aware_is_deterministic_per_epoch_from_the_order_stream():
    labels = lt_labels(num_classes=10, n_max=100, imb=10)
    images = torch.arange(len(labels), dtype=torch.uint8)[:, None, None, None].expand(-1, 1, 1, 1).contiguous()
    dl = DeviceLoader(images, labels, 16, [0.0], [1 / 255], train=True, sampler="class_aware", seed=3,
                      images_per_class_visit=2)

    def epoch(e: int) -> torch.Tensor:
        dl.set_epoch(e)
        return torch.cat([y for _, y in dl])

    assert torch.equal(epoch(0), epoch(0)) and not torch.equal(epoch(0), epoch(1))
    total = dl.num_samples
    order = dl._order(torch_stream(3, 1, "order"))
    assert torch.equal(order, class_aware_indices(labels, total, torch_stream(3, 1, "order"), 2))
    assert torch.equal(labels[order], epoch(1))
    check_class_aware(labels, order, 2)
    # the DataLoader path's sampler draws the same global order
    sampler = ClassAwareSampler(labels, 16, images_per_visit=2, seed=3)
    sampler.set_epoch(1)
    assert list(sampler) == order.tolist()
    sampler.set_epoch(2)
    assert list(sampler) != order.tolist()


@pytest.mark.parametrize("world_size", [2, 3])
def test_class_aware_shards_one_global_order_across_ranks(world_size):
    labels = lt_labels(num_classes=10, n_max=100, imb=10)
    n, b = len(labels), 8
    images = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    total = class_aware_epoch_samples(n, b * world_size)
    full = class_aware_indices(labels, total, torch_stream(5, 0, "order"), 4)
    loaders = [DeviceLoader(images, labels, b, [0.5], [0.25], train=True, sampler="class_aware", seed=5,
                            rank=r, world_size=world_size) for r in range(world_size)]
    samplers = [ClassAwareSampler(labels, b * world_size, seed=5, rank=r, world_size=world_size)
                for r in range(world_size)]
    shards = [dl._order(torch_stream(5, 0, "order")) for dl in loaders]
    for r in range(world_size):
        assert torch.equal(shards[r], full[r::world_size])  # disjoint positions of one global order
        assert list(samplers[r]) == full[r::world_size].tolist()
        assert len(loaders[r]) == math.ceil(n / (b * world_size)) + 1 == len(samplers[r]) // b
    interleaved = torch.stack(shards, 1).flatten()  # covering: the shards interleave back to the order
    assert torch.equal(interleaved, full)


def test_class_aware_on_the_dataloader_path():
    labels = lt_labels(num_classes=10, n_max=60, imb=10)
    n = len(labels)
    dataset = torch.utils.data.TensorDataset(torch.arange(n), labels)
    fl = FolderLoader(dataset, labels, 16, train=True, sampler="class_aware", seed=2, images_per_class_visit=3)
    assert isinstance(fl.sampler, ClassAwareSampler) and fl.sampler.images_per_visit == 3
    assert len(fl) == math.ceil(n / 16) + 1 and fl.num_samples == len(fl) * 16
    fl.set_epoch(4)
    idx = torch.cat([i for i, _ in fl])
    assert torch.equal(idx, class_aware_indices(labels, fl.num_samples, torch_stream(2, 4, "order"), 3))
    check_class_aware(labels, idx, 3)
