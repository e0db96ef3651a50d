"""``data.groups: ranges``: many/medium/few by class-index ranges, as the official MiSLAS code.

Official (dvlab-research/MiSLAS ``train_stage1.py`` lines 412-416, the same in ``train_stage2.py``):
``acc_classes = correct / class_num``; ``head_acc = acc_classes[head_class_idx[0]:head_class_idx[1]].mean()``
and likewise for ``med_class_idx`` / ``tail_class_idx``; ``config/cifar100/*.yaml``: [0, 36], [36, 71],
[71, 100]; ``config/cifar10/*.yaml``: [0, 3], [3, 7], [7, 10].
"""

import numpy as np
import pytest
import torch

from balpoe.data.lt import class_groups, lt_class_counts
from balpoe.errors import BalpoeError
from balpoe.evaluate.metrics import classification_report
from balpoe.evaluate.report import analysis_from_logits
from balpoe.recipe import load_recipe, recipe_from_dict


def _official_groups(logits, labels, num_classes, head, med, tail):
    pred = logits.argmax(1).numpy()
    y = labels.numpy()
    correct = np.bincount(y, weights=(pred == y).astype(float), minlength=num_classes)
    class_num = np.bincount(y, minlength=num_classes)
    acc_classes = correct / class_num
    return [acc_classes[a:b].mean() * 100 for a, b in (head, med, tail)]


def test_ranges_equal_the_official_index_slices():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(100).repeat(20)
    logits = torch.randn(2000, 100, generator=g) + 3.0 * torch.nn.functional.one_hot(labels, 100) * (
        torch.rand(2000, 1, generator=g) < 0.5)
    counts = lt_class_counts(500, 100, 10, "exp")
    rep = classification_report(logits, labels, torch.tensor(counts), group_ranges=(36, 71))
    want = _official_groups(logits, labels, 100, (0, 36), (36, 71), (71, 100))
    assert [rep["many"], rep["medium"], rep["few"]] == pytest.approx(want, abs=1e-9)


def test_count_rule_stays_the_default_and_differs_on_cifar100_ir10():
    counts = torch.tensor(lt_class_counts(500, 100, 10, "exp"))  # 500 ... 50 images: nothing below 20
    by_count = class_groups(counts)
    assert (by_count == 2).sum() == 0  # an empty few group
    by_range = class_groups(counts, ranges=(36, 71))
    assert by_range.tolist() == [0] * 36 + [1] * 35 + [2] * 29
    labels = torch.arange(100)
    rep = classification_report(torch.eye(100), labels, counts)
    assert np.isnan(rep["few"])


def test_analysis_records_the_groups():
    counts = torch.tensor(lt_class_counts(5000, 10, 100, "exp"))
    logits = torch.randn(1, 50, 10)
    labels = torch.arange(10).repeat(5)
    out = analysis_from_logits(logits, labels, counts, [str(i) for i in range(10)], many_threshold=100,
                               few_threshold=20, group_ranges=(3, 7))
    assert out["group_ranges"] == [3, 7] and out["class_group"] == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]


def test_recipe_keys_are_validated():
    r = recipe_from_dict({"data": {"groups": "ranges", "group_ranges": [36, 71]}})
    assert r.data.groups == "ranges" and r.data.group_ranges == [36, 71]
    with pytest.raises(BalpoeError, match=r"recipe key 'data.group_ranges' must be two boundaries \[a, b\]"):
        recipe_from_dict({"data": {"groups": "ranges", "group_ranges": [71, 36]}})
    with pytest.raises(BalpoeError, match="recipe key 'data.group_ranges' must be two boundaries"):
        recipe_from_dict({"data": {"groups": "ranges"}})
    with pytest.raises(BalpoeError, match=r"recipe key 'data.group_ranges' \[36, 171\] must satisfy"):
        class_groups(torch.ones(100), ranges=(36, 171))


@pytest.mark.parametrize("name, ranges", [("cifar100_lt_ir10", [36, 71]), ("cifar100_lt_ir100", [36, 71]),
                                          ("cifar10_lt_ir50", [3, 7])])
def test_mislas_cifar_recipes_use_the_official_ranges(name, ranges):
    for stage in (1, 2):
        r = load_recipe(f"recipes/mislas/{name}_stage{stage}.yaml")
        assert r.data.groups == "ranges" and r.data.group_ranges == ranges
