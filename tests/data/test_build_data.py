"""``build_data`` and the readers' handling of the recipe's ``data`` section: impossible imbalance
ratios, a ``data.root`` that does not exist."""

from __future__ import annotations

import warnings

import pytest

import balpoe.data.fashion_mnist as fm
from balpoe.data.build import build_data, largest_imb_factor
from balpoe.errors import BalpoeError
from balpoe.recipe import recipe_from_dict
from formats import CIFAR10_NAMES, write_fashion_mnist


def _data(**section):
    return recipe_from_dict({"data": section}).data


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(BalpoeError) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) <= 400, msg
    return msg


def test_imb_factor_that_empties_classes_is_refused(cifar_root):
    # 40 images per class: class i keeps int(40 * 1e-6 ** (i / 9)), zero from class 3 (cat) on.
    msg = _error(build_data, _data(dataset="cifar10", root=str(cifar_root), imb_factor=10 ** 6))
    assert msg == ("recipe key 'data.imb_factor' (1e+06) leaves 7 of 10 classes without a training image (cat, deer, "
                   "dog, frog, horse, ship and 1 more); with 40 images in the largest class the largest usable "
                   "imb_factor (exp profile) is 40")
    assert build_data(_data(dataset="cifar10", root=str(cifar_root), imb_factor=40)).class_counts.min() == 1
    msg = _error(build_data, _data(dataset="cifar10", root=str(cifar_root), imb_factor=41))
    assert "leaves 1 of 10 classes without a training image (truck)" in msg and msg.endswith("is 40")
    msg = _error(build_data, _data(dataset="cifar10", root=str(cifar_root), imb_factor=50, imb_profile="step"))
    assert f"leaves 5 of 10 classes without a training image ({', '.join(CIFAR10_NAMES[5:])})" in msg
    assert msg.endswith("the largest usable imb_factor (step profile) is 40")


@pytest.mark.parametrize("profile", ["exp", "step"])
def test_largest_imb_factor_is_about_n_max(profile):
    assert largest_imb_factor(5000, 10, profile) == 5000 and largest_imb_factor(500, 100, profile) == 500
    assert largest_imb_factor(49, 10, profile) == 48  # 49 * (1 / 49) rounds below 1
    assert largest_imb_factor(0, 10, profile) == 0


@pytest.fixture
def fm_env(monkeypatch, tmp_path, fm_small_root):
    """Fashion-MNIST only in $BALPOE_DATA (no Debian copy)."""
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setenv("BALPOE_DATA", str(fm_small_root))
    return fm_small_root


def test_fashion_mnist_root_that_does_not_exist_warns(fm_env, tmp_path):
    missing = tmp_path / "nope"
    with pytest.warns(UserWarning) as record:
        bundle = build_data(_data(dataset="fashion_mnist", root=str(missing), imb_factor=1))
    assert bundle.class_counts.tolist() == [30] * 10  # the files from $BALPOE_DATA
    messages = {str(w.message) for w in record}
    assert messages == {f"data.root '{missing}' does not exist; using the Fashion-MNIST files in {fm_env}"}
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.warns(UserWarning, match=f"data.root '{empty}' holds no complete set of Fashion-MNIST IDX files; "
                                         f"using the Fashion-MNIST files in {fm_env}"):
        build_data(_data(dataset="fashion_mnist", root=str(empty), imb_factor=1))
    given = write_fashion_mnist(tmp_path / "given", 2, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a root holding the files, or no root at all: silent
        assert build_data(_data(dataset="fashion_mnist", root=str(given), imb_factor=1)).class_counts.sum() == 20
        build_data(_data(dataset="fashion_mnist", imb_factor=1))


def test_fashion_mnist_root_with_an_impossible_name_is_not_a_crash(fm_env, tmp_path):
    long = tmp_path / ("x" * 300)  # ENAMETOOLONG on lookup
    with pytest.warns(UserWarning, match="does not exist; using the Fashion-MNIST files in"):
        build_data(_data(dataset="fashion_mnist", root=str(long), imb_factor=1))


def test_cifar_root_that_does_not_exist_names_the_missing_file(tmp_path):
    missing = tmp_path / "nope"
    msg = _error(build_data, _data(dataset="cifar10", root=str(missing)))
    assert msg.startswith(f"CIFAR-10 not found: {missing / 'cifar-10-batches-py' / 'data_batch_1'} is missing")
    msg = _error(build_data, _data(dataset="cifar100", root=str(tmp_path / ("y" * 300))))
    assert msg.startswith("CIFAR-100 not found: ") and "..." in msg
