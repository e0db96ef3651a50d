"""Test label distributions: SADE/BalPoE protocol sizes and indices, target-prior subsets, Dirichlet priors."""

import numpy as np
import pytest
import torch

from balpoe.data.lt import lt_class_counts
from balpoe.errors import BalpoeError
from balpoe.shift.distributions import (TEST_DISTRIBUTIONS, class_rank_order, dirichlet_prior, distribution_counts,
                                        distribution_prior, parse_distribution, prior_subset_indices,
                                        protocol_subset_indices)
from balpoe.shift.targets import parse_test_dists, target_sets


def test_subsets(labels, counts, spec):
    """``{name: indices}`` of the distributions named by ``spec`` (as ``balpoe eval --test-dists``)."""
    return {n: t.indices for n, t in target_sets(labels, counts, parse_test_dists(spec)).items()}


test_subsets.__test__ = False

CIFAR100_SIZES = {"forward50": 2486, "forward25": 2956, "forward10": 3876, "forward5": 4932, "forward2": 7166,
                  "uniform": 10000, "backward2": 7166, "backward5": 4932, "backward10": 3876,
                  "backward25": 2956, "backward50": 2486}
TRAIN_COUNTS = lt_class_counts(500, 100, 100)  # CIFAR-100-LT IR100, sorted: rank = class index


@pytest.fixture(scope="module")
def test_labels() -> np.ndarray:
    """A balanced CIFAR-100-like test set (100 per class) in a scrambled order."""
    return np.random.default_rng(123).permutation(np.repeat(np.arange(100), 100))


def reference_subset(labels: np.ndarray, name: str) -> list[int]:
    """Straight re-implementation of IMBALANCECIFAR100(train=False, imb_factor=1/N, reverse)."""
    np.random.seed(0)
    cls_num = 100
    img_max = len(labels) / cls_num
    reverse = name.startswith("backward")
    imb_factor = 1.0 / float(name[len("backward"):] if reverse else name[len("forward"):])
    img_num_per_cls = []
    for cls_idx in range(cls_num):
        exponent = (cls_num - 1 - cls_idx) if reverse else cls_idx
        img_num_per_cls.append(int(img_max * (imb_factor ** (exponent / (cls_num - 1.0)))))
    targets_np = np.array(labels, dtype=np.int64)
    selected = []
    for the_class, the_img_num in zip(np.unique(targets_np), img_num_per_cls):
        idx = np.where(targets_np == the_class)[0]
        np.random.shuffle(idx)
        selected.extend(idx[:the_img_num].tolist())
    return selected


def test_names_and_order():
    assert TEST_DISTRIBUTIONS == ("forward50", "forward25", "forward10", "forward5", "forward2", "uniform",
                                  "backward2", "backward5", "backward10", "backward25", "backward50")
    assert parse_distribution("forward7") == ("forward", 7.0)
    assert parse_distribution("backward2.5") == ("backward", 2.5)
    for bad in ("sideways10", "forward", "forward0.5", "Forward10", ""):
        with pytest.raises(BalpoeError):
            parse_distribution(bad)


def test_cifar100_sizes(test_labels):
    subsets = test_subsets(test_labels, TRAIN_COUNTS, "all")
    assert list(subsets) == list(TEST_DISTRIBUTIONS)
    for name, idx in subsets.items():
        assert idx.dtype == torch.int64
        assert len(idx) == CIFAR100_SIZES[name], name
        assert len(set(idx.tolist())) == len(idx)
    # per-class counts follow n_c = int(100 * (1/N)^(c/99)) (reversed for backward)
    counts = np.bincount(test_labels[subsets["forward10"].numpy()], minlength=100)
    assert counts[0] == 100 and counts[99] == 10 and (np.diff(counts) <= 0).all()
    counts_b = np.bincount(test_labels[subsets["backward10"].numpy()], minlength=100)
    assert (counts_b == counts[::-1]).all()


@pytest.mark.parametrize("name", [n for n in TEST_DISTRIBUTIONS if n != "uniform"])
def test_indices_match_reference_loop(test_labels, name):
    ours = protocol_subset_indices(test_labels, TRAIN_COUNTS, name).tolist()
    assert ours == reference_subset(test_labels, name)


def test_uniform_general_names_and_numpy_state(test_labels):
    assert torch.equal(protocol_subset_indices(test_labels, TRAIN_COUNTS, "uniform"), torch.arange(10000))
    np.random.seed(77)
    expected = np.random.rand(3)
    np.random.seed(77)
    out = test_subsets(test_labels, TRAIN_COUNTS, ["forward7", "backward7", "forward7"])
    assert np.array_equal(np.random.rand(3), expected)  # global numpy stream untouched
    assert list(out) == ["forward7", "backward7"]
    assert len(out["forward7"]) == sum(int(100 * (1 / 7) ** (c / 99)) for c in range(100))
    with pytest.raises(BalpoeError):
        test_subsets(test_labels, TRAIN_COUNTS, ["forward10", "bogus"])
    with pytest.raises(BalpoeError):
        protocol_subset_indices(test_labels, TRAIN_COUNTS[:50], "forward10")  # labels beyond class_counts


def test_rank_order_from_class_counts():
    counts = [5, 50, 20, 50, 1]  # head = class 1 (stable: before class 3), tail = class 4
    assert class_rank_order(counts).tolist() == [1, 3, 2, 0, 4]
    labels = np.repeat(np.arange(5), 10)
    idx = protocol_subset_indices(labels, counts, "forward10")
    kept = np.bincount(labels[idx.numpy()], minlength=5)
    per_rank = distribution_counts("forward10", 10, 5)
    assert kept.tolist() == [per_rank[3], per_rank[0], per_rank[2], per_rank[1], per_rank[4]]
    q = distribution_prior("forward10", counts, n_max=10)
    assert torch.allclose(q, torch.tensor(kept / kept.sum(), dtype=torch.float64))


def test_prior_subset_largest_and_given_size():
    labels = np.repeat(np.arange(4), 100)
    idx = prior_subset_indices(labels, [0.5, 0.3, 0.2, 0.0], seed=1)
    assert np.bincount(labels[idx.numpy()], minlength=4).tolist() == [100, 60, 40, 0]
    idx = prior_subset_indices(labels, [5, 3, 2, 0], seed=1, size=50)  # weights need not sum to 1
    assert np.bincount(labels[idx.numpy()], minlength=4).tolist() == [25, 15, 10, 0]
    assert len(set(idx.tolist())) == 50
    # largest-remainder rounding: counts sum to the requested size exactly
    idx = prior_subset_indices(labels, [1, 1, 1, 0], seed=0, size=100)
    assert sorted(np.bincount(labels[idx.numpy()], minlength=4).tolist()) == [0, 33, 33, 34]
    assert torch.equal(prior_subset_indices(labels, [1, 2, 3, 4], seed=5),
                       prior_subset_indices(labels, [1, 2, 3, 4], seed=5))
    assert not torch.equal(prior_subset_indices(labels, [1, 2, 3, 4], seed=5),
                           prior_subset_indices(labels, [1, 2, 3, 4], seed=6))


def test_prior_subset_follows_a_long_tailed_prior():
    labels = np.repeat(np.arange(100), 100)
    q = np.array(TRAIN_COUNTS, dtype=float)
    idx = prior_subset_indices(labels, q)
    got = np.bincount(labels[idx.numpy()], minlength=100)
    assert got[0] == 100 and got.sum() == int(np.floor(q.sum() / q.max() * 100 + 1e-9))
    assert np.abs(got / got.sum() - q / q.sum()).max() < 1.0 / got.sum() + 1e-12


def test_prior_subset_errors():
    labels = np.repeat(np.arange(3), 10)
    with pytest.raises(BalpoeError, match="non-negative"):
        prior_subset_indices(labels, [1, -1, 1])
    with pytest.raises(BalpoeError, match="sum to 0"):
        prior_subset_indices(labels, [0, 0, 0])
    with pytest.raises(BalpoeError):
        prior_subset_indices(labels, [1, 1])  # labels go up to 2: prior too short
    with pytest.raises(BalpoeError, match="not possible"):
        prior_subset_indices(labels, [1, 1, 1], size=31)


def test_dirichlet_prior():
    base = torch.softmax(torch.linspace(2, -2, 50, dtype=torch.float64), 0)
    q = dirichlet_prior(base, 1000.0, seed=3)
    assert q.dtype == torch.float64 and q.shape == (50,)
    assert abs(float(q.sum()) - 1.0) < 1e-12 and (q > 0).all()
    assert torch.equal(q, dirichlet_prior(base, 1000.0, seed=3))
    assert not torch.equal(q, dirichlet_prior(base, 1000.0, seed=4))
    # Dir(alpha = base * c): mean = base, var = base (1 - base) / (c + 1)
    draws = torch.stack([dirichlet_prior(base, 500.0, seed=s) for s in range(400)])
    se = (base * (1 - base) / 501.0 / 400).sqrt()
    assert ((draws.mean(0) - base).abs() / se).max() < 4.5
    ratio = draws.var(0) / (base * (1 - base) / 501.0)
    assert 0.75 < float(ratio.mean()) < 1.25
    zero = dirichlet_prior([1.0, 0.0, 1.0], 10.0, seed=0)
    assert zero[1] == 0
    with pytest.raises(BalpoeError):
        dirichlet_prior(base, 0.0)
    with pytest.raises(BalpoeError):
        dirichlet_prior([1.0, -1.0], 10.0)
