"""Long-tailed subsampling (Cao et al. 2019 / official IMBALANCECIFAR) and many/medium/few groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from balpoe.data.lt import class_groups, lt_class_counts, lt_subsample_indices, stratified_holdout
from balpoe.errors import BalpoeError


def reference_indices(targets: np.ndarray, img_num_per_cls: list[int], seed: int = 0) -> np.ndarray:
    """The reference construction (IMBALANCECIFAR.gen_imbalanced_data), written out plainly."""
    np.random.seed(seed)
    selected = []
    for the_class, the_img_num in zip(range(len(img_num_per_cls)), img_num_per_cls):
        idx = np.where(targets == the_class)[0]
        np.random.shuffle(idx)
        selected.append(idx[:the_img_num])
    return np.concatenate(selected)


def cifar_like_labels(num_classes: int, per_class: int, seed: int) -> np.ndarray:
    """Labels laid out like CIFAR's training set: ``per_class`` of each class in a shuffled order."""
    labels = np.repeat(np.arange(num_classes), per_class)
    np.random.default_rng(seed).shuffle(labels)
    return labels


@pytest.mark.parametrize("n_max,num_classes,imb,total", [
    (500, 100, 100, 10_847), (500, 100, 50, 12_608), (500, 100, 10, 19_573), (5000, 10, 100, 12_406),
])
def test_totals_match_published_splits(n_max, num_classes, imb, total):
    counts = lt_class_counts(n_max, num_classes, imb)
    assert len(counts) == num_classes
    assert sum(counts) == total
    assert counts[0] == n_max
    assert counts[-1] == int(n_max / imb)
    assert all(a >= b for a, b in zip(counts, counts[1:]))


def test_per_class_counts_first_and_last():
    assert lt_class_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    c100 = lt_class_counts(500, 100, 100)
    assert c100[:3] == [500, 477, 455] and c100[-3:] == [5, 5, 5]
    c10 = lt_class_counts(500, 100, 10)
    assert c10[:3] == [500, 488, 477] and c10[-3:] == [52, 51, 50]
    assert lt_class_counts(500, 100, 1) == [500] * 100
    assert lt_class_counts(7, 1, 100) == [7]


def test_step_profile():
    assert lt_class_counts(5000, 10, 100, "step") == [5000] * 5 + [50] * 5
    assert lt_class_counts(500, 100, 10, "step") == [500] * 50 + [50] * 50
    assert lt_class_counts(500, 5, 10, "step") == [500] * 2 + [50] * 3


@pytest.mark.parametrize("kwargs", [dict(imb_factor=0.5), dict(imb_factor=10, profile="linear")])
def test_count_errors_are_one_line(kwargs):
    with pytest.raises(BalpoeError) as e:
        lt_class_counts(500, 100, **kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("num_classes,per_class,imb,seed", [(100, 500, 100, 0), (100, 500, 10, 0), (10, 5000, 100, 0),
                                                            (10, 5000, 50, 3)])
def test_indices_equal_reference(num_classes, per_class, imb, seed):
    labels = cifar_like_labels(num_classes, per_class, seed=1)
    counts = lt_class_counts(per_class, num_classes, imb)
    expected = reference_indices(labels, counts, seed)
    np.random.seed(12345)  # something other than the seed the call uses
    got = lt_subsample_indices(labels, counts, seed=seed)
    np.testing.assert_array_equal(got, expected)
    assert np.bincount(labels[got], minlength=num_classes).tolist() == counts
    assert len(np.unique(got)) == len(got) == sum(counts)


def test_indices_accept_torch_and_list_labels():
    labels = cifar_like_labels(10, 50, seed=2)
    counts = lt_class_counts(50, 10, 10)
    expected = reference_indices(labels, counts)
    np.testing.assert_array_equal(lt_subsample_indices(torch.from_numpy(labels), counts), expected)
    np.testing.assert_array_equal(lt_subsample_indices(labels.tolist(), counts), expected)


def test_global_numpy_rng_state_is_unchanged():
    labels = cifar_like_labels(100, 500, seed=1)
    np.random.seed(2024)
    before = np.random.get_state()
    lt_subsample_indices(labels, lt_class_counts(500, 100, 100))
    after = np.random.get_state()
    assert before[0] == after[0]
    np.testing.assert_array_equal(before[1], after[1])
    assert before[2:] == after[2:]
    np.random.seed(2024)
    expected_next = np.random.rand(3)
    np.random.set_state(after)
    np.testing.assert_array_equal(np.random.rand(3), expected_next)


def test_too_many_requested_is_an_error():
    labels = cifar_like_labels(3, 10, seed=0)
    with pytest.raises(BalpoeError, match="class 1 has 10 images") as e:
        lt_subsample_indices(labels, [10, 11, 1])
    assert "\n" not in str(e.value)


def test_class_groups_thresholds_and_boundaries():
    groups = class_groups([500, 101, 100, 50, 20, 19, 1, 0])
    assert groups.tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    assert groups.dtype == torch.long
    assert class_groups(torch.tensor([10, 30]), many_threshold=20, few_threshold=15).tolist() == [2, 0]


def test_cifar100_ir100_group_sizes():
    groups = class_groups(lt_class_counts(500, 100, 100))
    assert torch.bincount(groups, minlength=3).tolist() == [35, 35, 30]
    # the groups are contiguous: many = classes 0..34, medium 35..69, few 70..99
    assert groups.tolist() == [0] * 35 + [1] * 35 + [2] * 30


def test_stratified_holdout_is_stratified_and_disjoint():
    counts = [500, 200, 50, 10, 5, 1]
    labels = torch.from_numpy(np.random.default_rng(0).permutation(np.repeat(np.arange(6), counts)))
    kept, held = stratified_holdout(labels, 0.2, seed=0)
    assert kept.dtype == held.dtype == np.int64
    assert len(set(kept.tolist()) & set(held.tolist())) == 0
    assert sorted(kept.tolist() + held.tolist()) == list(range(len(labels)))
    held_counts = torch.bincount(labels[torch.from_numpy(held)], minlength=6).tolist()
    assert held_counts == [100, 40, 10, 2, 1, 0]  # floor(0.2 n_c); the single image stays in training
    kept2, held2 = stratified_holdout(labels, 0.2, seed=0)
    assert np.array_equal(held, held2)
    assert not np.array_equal(held, stratified_holdout(labels, 0.2, seed=1)[1])
    _, held_min = stratified_holdout(labels, 0.01, seed=0, min_per_class=2)
    assert torch.bincount(labels[torch.from_numpy(held_min)], minlength=6).tolist() == [5, 2, 2, 2, 2, 0]
    with pytest.raises(BalpoeError):
        stratified_holdout(labels, 1.0)
