"""Class-balanced sampling (MiSLAS stage 2): classes uniform, images uniform within a class."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from balpoe.data.lt import lt_class_counts
from balpoe.data.samplers import ClassBalancedSampler, class_balanced_indices, instance_balanced_indices

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
