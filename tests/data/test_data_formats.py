"""Readers of the real on-disk formats (CIFAR pickles, Fashion-MNIST IDX, image-list txt files),
checked against the writers in ``tests/formats.py``."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import transforms as T

import balpoe.data.fashion_mnist as fm
from balpoe.data.cifar import load_cifar
from balpoe.data.fashion_mnist import find_fashion_mnist, load_fashion_mnist, read_idx
from balpoe.data.pipeline import pipeline_transform, resolve_pipeline
from balpoe.data.registry import get_dataset
from balpoe.data.image_list import ImageListDataset, default_list_files, list_split, read_image_list
from balpoe.errors import BalpoeError
from balpoe.recipe import recipe_from_dict
from formats import (CIFAR10_NAMES, write_cifar, write_cifar_arrays, write_fashion_mnist,
                     write_fashion_mnist_arrays, write_idx, write_image_list)


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(BalpoeError) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


def random_split(rng, n, num_classes, shape):
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8), rng.integers(0, num_classes, size=n)


def nearest_mean_accuracy(train_x, train_y, test_x, test_y, num_classes) -> float:
    a = train_x.reshape(len(train_x), -1).astype(np.float32)
    b = test_x.reshape(len(test_x), -1).astype(np.float32)
    means = np.stack([a[train_y == c].mean(0) for c in range(num_classes)])
    pred = ((b[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    return float((pred == test_y).mean())


# ----------------------------------------------------------------------------------- CIFAR

@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_round_trip_exact(tmp_path, num_classes):
    rng = np.random.default_rng(0)
    train = random_split(rng, 203, num_classes, (3, 32, 32))
    test = random_split(rng, 41, num_classes, (3, 32, 32))
    root = write_cifar_arrays(tmp_path, num_classes, train, test)
    for split, (x, y) in ((True, train), (False, test)):
        images, labels, names = load_cifar(root, num_classes, train=split)
        assert images.dtype == np.uint8 and images.shape == (len(x), 3, 32, 32)
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(images, x)
        np.testing.assert_array_equal(labels, y)
        assert len(names) == num_classes
    if num_classes == 10:
        assert names == CIFAR10_NAMES


def test_cifar_files_have_the_real_layout(tmp_path):
    counts = [9, 8, 7, 6, 5, 4, 3, 2, 1, 1]
    root = write_cifar(tmp_path, 10, counts, 3)
    folder = root / "cifar-10-batches-py"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"])
    with open(folder / "data_batch_1", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    assert {b"batch_label", b"labels", b"data", b"filenames"} <= set(batch)
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape[1] == 3072
    assert isinstance(batch[b"labels"], list)
    images, labels, _ = load_cifar(root, 10, train=True)
    assert np.bincount(labels, minlength=10).tolist() == counts
    # row-major: the first 1024 bytes are the red plane, row by row
    np.testing.assert_array_equal(batch[b"data"][0, :1024].reshape(32, 32), images[0, 0])
    np.testing.assert_array_equal(batch[b"data"][0], images[0].reshape(-1))
    _, test_labels, _ = load_cifar(root, 10, train=False)
    assert np.bincount(test_labels).tolist() == [3] * 10

    root100 = write_cifar(tmp_path / "c100", 100, 2, 1)
    with open(root100 / "cifar-100-python" / "train", "rb") as f:
        d = pickle.load(f, encoding="bytes")
    assert {b"fine_labels", b"coarse_labels", b"data", b"filenames", b"batch_label"} <= set(d)
    with open(root100 / "cifar-100-python" / "meta", "rb") as f:
        meta = pickle.load(f, encoding="bytes")
    assert len(meta[b"fine_label_names"]) == 100 and len(meta[b"coarse_label_names"]) == 20


def test_writers_are_deterministic_and_learnable(tmp_path):
    a = load_cifar(write_cifar(tmp_path / "a", 100, 4, 2, seed=5), 100, train=True)
    b = load_cifar(write_cifar(tmp_path / "b", 100, 4, 2, seed=5), 100, train=True)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    test = load_cifar(tmp_path / "a", 100, train=False)
    assert nearest_mean_accuracy(a[0], a[1], test[0], test[1], 100) >= 0.95
    root = write_fashion_mnist(tmp_path / "fm", 5, 3)
    tr, te = load_fashion_mnist(root, True), load_fashion_mnist(root, False)
    assert nearest_mean_accuracy(tr[0], tr[1], te[0], te[1], 10) >= 0.95
    # class-dependent mean brightness: class 9 is brighter than class 0
    assert tr[0][tr[1] == 9].mean() > tr[0][tr[1] == 0].mean() + 50


def test_cifar_missing_dir_error(tmp_path):
    msg = one_line_error(load_cifar, tmp_path / "nowhere", 100, True)
    assert str(tmp_path / "nowhere" / "cifar-100-python") in msg
    assert "data.download: true" in msg
    msg = one_line_error(load_cifar, tmp_path, 10, False)
    assert str(tmp_path / "cifar-10-batches-py") in msg


def test_cifar_corrupt_file_error(tmp_path):
    root = write_cifar(tmp_path, 10, 3, 2)
    bad = root / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(bad.read_bytes()[:100])
    msg = one_line_error(load_cifar, root, 10, True)
    assert str(bad) in msg
    load_cifar(root, 10, False)  # the test split is still fine
    bad.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    assert str(bad) in one_line_error(load_cifar, root, 10, True)


def test_cifar_bad_num_classes(tmp_path):
    assert "num_classes=20" in one_line_error(load_cifar, tmp_path, 20, True)


def test_cifar_download_goes_through_torchvision(tmp_path, monkeypatch):
    calls = []

    class FakeCIFAR100:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            write_cifar(root, 100, 2, 1)

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", FakeCIFAR100)
    images, labels, _ = load_cifar(tmp_path, 100, train=False, download=True)
    assert calls == [(str(tmp_path), False, True)]
    assert images.shape == (100, 3, 32, 32)
    load_cifar(tmp_path, 100, train=True, download=True)  # files present now: no second download
    assert len(calls) == 1

    class Offline:
        def __init__(self, *a, **k):
            raise RuntimeError("network\nunreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    msg = one_line_error(load_cifar, tmp_path / "x", 10, True, download=True)
    assert str(tmp_path / "x") in msg and "network" in msg


# ------------------------------------------------------------------------------ Fashion-MNIST

@pytest.fixture
def no_debian(monkeypatch, tmp_path):
    """Hide the Debian copy and $BALPOE_DATA, so lookups only see what the test sets up."""
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.delenv("BALPOE_DATA", raising=False)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_round_trip_exact(tmp_path, gz):
    rng = np.random.default_rng(1)
    train = random_split(rng, 70, 10, (28, 28))
    test = random_split(rng, 30, 10, (28, 28))
    root = write_fashion_mnist_arrays(tmp_path, train, test, gz=gz)
    suffix = ".gz" if gz else ""
    assert (root / f"train-images-idx3-ubyte{suffix}").is_file()
    for split, (x, y) in ((True, train), (False, test)):
        images, labels, names = load_fashion_mnist(root, split)
        assert images.dtype == np.uint8 and images.shape == (len(x), 1, 28, 28)
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(images[:, 0], x)
        np.testing.assert_array_equal(labels, y)
        assert names[0] == "T-shirt/top" and names[9] == "Ankle boot" and len(names) == 10


def test_fashion_mnist_idx_headers(tmp_path):
    root = write_fashion_mnist(tmp_path, 3, 2)
    with gzip.open(root / "train-images-idx3-ubyte.gz", "rb") as f:
        raw = f.read()
    assert raw[:16] == (2051).to_bytes(4, "big") + (30).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    assert len(raw) == 16 + 30 * 28 * 28
    with gzip.open(root / "t10k-labels-idx1-ubyte.gz", "rb") as f:
        raw = f.read()
    assert raw[:8] == (2049).to_bytes(4, "big") + (20).to_bytes(4, "big") and len(raw) == 28


def test_fashion_mnist_lookup_order(tmp_path, monkeypatch, no_debian):
    given = write_fashion_mnist(tmp_path / "given", 1, 1)
    env = tmp_path / "env"
    write_fashion_mnist(env / "fashion-mnist", 1, 1)
    debian = write_fashion_mnist(tmp_path / "debian", 1, 1)

    assert find_fashion_mnist(None) is None
    monkeypatch.setattr(fm, "DEBIAN_DIR", debian)
    assert find_fashion_mnist(None) == debian
    assert find_fashion_mnist(tmp_path / "empty") == debian
    monkeypatch.setenv("BALPOE_DATA", str(env))
    assert find_fashion_mnist(None) == env / "fashion-mnist"
    assert find_fashion_mnist(tmp_path / "empty") == env / "fashion-mnist"
    assert find_fashion_mnist(given) == given

    # files directly in $BALPOE_DATA win over its subfolders; FashionMNIST/raw is accepted too
    write_fashion_mnist(env, 1, 1, gz=False)
    assert find_fashion_mnist(None) == env
    raw = write_fashion_mnist(tmp_path / "tv" / "FashionMNIST" / "raw", 1, 1)
    monkeypatch.setenv("BALPOE_DATA", str(tmp_path / "tv"))
    assert find_fashion_mnist(None) == raw
    assert find_fashion_mnist(tmp_path / "tv") == raw  # data.root also accepts the subfolders


def test_fashion_mnist_incomplete_folder_is_skipped(tmp_path, monkeypatch, no_debian):
    partial = write_fashion_mnist(tmp_path / "partial", 1, 1)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    debian = write_fashion_mnist(tmp_path / "debian", 1, 1)
    assert find_fashion_mnist(partial) is None
    monkeypatch.setattr(fm, "DEBIAN_DIR", debian)
    assert find_fashion_mnist(partial) == debian


def test_fashion_mnist_not_found_error(tmp_path, monkeypatch, no_debian):
    monkeypatch.setenv("BALPOE_DATA", str(tmp_path / "envdir"))
    msg = one_line_error(load_fashion_mnist, tmp_path / "rootdir", True)
    for where in (tmp_path / "rootdir", tmp_path / "envdir", tmp_path / "envdir" / "fashion-mnist",
                  tmp_path / "no-debian"):
        assert str(where) in msg
    assert msg.index(str(tmp_path / "rootdir")) < msg.index(str(tmp_path / "envdir"))
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "$BALPOE_DATA" in msg and "data.download: true" in msg


def test_fashion_mnist_bad_files(tmp_path, no_debian):
    root = write_fashion_mnist(tmp_path, 2, 2, gz=False)
    images = root / "train-images-idx3-ubyte"
    good = images.read_bytes()

    images.write_bytes((2049).to_bytes(4, "big") + good[4:])
    msg = one_line_error(load_fashion_mnist, root, True)
    assert str(images) in msg and "2049" in msg and "2051" in msg

    images.write_bytes(good[:-5])
    assert str(images) in one_line_error(load_fashion_mnist, root, True)

    labels = root / "train-labels-idx1-ubyte"
    write_idx(labels, np.zeros(19, np.uint8), 2049, gz=False)
    images.write_bytes(good)
    assert str(labels) in one_line_error(load_fashion_mnist, root, True)
    load_fashion_mnist(root, False)

    (root / "t10k-images-idx3-ubyte").unlink()
    gz = root / "t10k-images-idx3-ubyte.gz"
    gz.write_bytes(b"not gzip at all")
    assert str(gz) in one_line_error(load_fashion_mnist, root, False)
    assert str(gz) in one_line_error(read_idx, gz, 2051)


def test_fashion_mnist_download_goes_through_torchvision(tmp_path, monkeypatch, no_debian):
    calls = []

    class FakeFashionMNIST:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            write_fashion_mnist(Path(root) / "FashionMNIST" / "raw", 2, 1)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashionMNIST)
    images, labels, _ = load_fashion_mnist(tmp_path, train=True, download=True)
    assert calls == [(str(tmp_path), True, True)] and images.shape == (20, 1, 28, 28)
    assert find_fashion_mnist(tmp_path) == tmp_path / "FashionMNIST" / "raw"
    load_fashion_mnist(tmp_path, train=False, download=True)
    assert len(calls) == 1


@pytest.mark.skipif(not fm.DEBIAN_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_debian_copy_loads(monkeypatch):
    monkeypatch.delenv("BALPOE_DATA", raising=False)
    assert find_fashion_mnist(None) == fm.DEBIAN_DIR
    train = load_fashion_mnist(None, True)
    test = load_fashion_mnist(None, False)
    assert train[0].shape == (60000, 1, 28, 28) and test[0].shape == (10000, 1, 28, 28)
    assert np.bincount(train[1]).tolist() == [6000] * 10
    assert np.bincount(test[1]).tolist() == [1000] * 10


# ------------------------------------------------------------------------------- image lists

@pytest.mark.parametrize("kind", ["imagenet_lt", "places_lt", "inat"])
def test_image_list_written_and_read(tmp_path, kind):
    counts = [4, 2, 1]
    root = write_image_list(tmp_path, kind, 3, counts, 2, size=16)
    train_list, test_list = default_list_files(kind, root)
    paths, labels = read_image_list(train_list)
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == counts
    assert all((root / p).is_file() and not Path(p).is_absolute() for p in paths)
    ds = ImageListDataset(list_split(root, test_list), transform=T.ToTensor())
    assert len(ds) == 6 and ds.class_names == ["0", "1", "2"]
    x, y = ds[5]
    assert x.shape == (3, 16, 16) and y == 2
    suffix = {"imagenet_lt": ".JPEG", "places_lt": ".jpg", "inat": ".jpg"}[kind]
    assert paths[0].endswith(suffix)


def test_image_list_jpeg_close_to_png(tmp_path):
    jpg = ImageListDataset(_split(write_image_list(tmp_path / "j", "imagenet_lt", 2, 2, 1)))
    png = ImageListDataset(_split(write_image_list(tmp_path / "p", "imagenet_lt", 2, 2, 1, image_format="PNG")))
    for i in range(len(jpg)):
        a = np.asarray(jpg.load(i), dtype=np.float32)
        b = np.asarray(png.load(i), dtype=np.float32)
        assert a.shape == b.shape == (32, 32, 3)
        assert np.abs(a - b).mean() < 6  # quality 95, no chroma subsampling
        blocks = lambda x: x.reshape(4, 8, 4, 8, 3).mean((1, 3))  # noqa: E731  (the class signal)
        assert np.abs(blocks(a) - blocks(b)).max() < 3


def _split(root: Path):
    return list_split(root, default_list_files("imagenet_lt", root)[0])


def test_image_list_dataset_exact_pixels_and_rgb(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, size=(5, 7), dtype=np.uint8)
    (tmp_path / "a b").mkdir()
    Image.fromarray(rgb).save(tmp_path / "a b" / "rgb.png")
    Image.fromarray(gray).save(tmp_path / "gray.png")
    lst = tmp_path / "list.txt"
    lst.write_text("a b/rgb.png 3\n\n  gray.png\t0  \n")
    paths, labels = read_image_list(lst)
    assert paths == ["a b/rgb.png", "gray.png"] and labels.tolist() == [3, 0]
    ds = ImageListDataset(list_split(tmp_path, lst))
    img, y = ds[0]
    assert y == 3 and img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), rgb)
    np.testing.assert_array_equal(np.asarray(ds[1][0]), np.repeat(gray[:, :, None], 3, axis=2))


@pytest.mark.parametrize("bad_line", ["train/a.jpg", "train/a.jpg cat", "train/a.jpg -1", "7"])
def test_malformed_list_line(tmp_path, bad_line):
    lst = tmp_path / "ImageNet_LT_train.txt"
    lst.write_text(f"train/ok.jpg 0\n\n{bad_line}\ntrain/ok2.jpg 1\n")
    msg = one_line_error(read_image_list, lst)
    assert f"{lst}:3" in msg


def test_missing_list_and_image_files(tmp_path):
    assert str(tmp_path / "none.txt") in one_line_error(read_image_list, tmp_path / "none.txt")
    lst = tmp_path / "l.txt"
    lst.write_text("missing/img.jpg 0\n")
    ds = ImageListDataset(list_split(tmp_path, lst))
    assert str(tmp_path / "missing" / "img.jpg") in one_line_error(ds.__getitem__, 0)


def test_default_list_files(tmp_path):
    expected = {"imagenet_lt": ("ImageNet_LT_train.txt", "ImageNet_LT_test.txt"),
                "places_lt": ("Places_LT_train.txt", "Places_LT_test.txt"),
                "inat": ("iNaturalist18_train.txt", "iNaturalist18_val.txt")}
    for kind, names in expected.items():
        msg = one_line_error(default_list_files, kind, tmp_path)
        assert str(tmp_path / names[0]) in msg
        for n in names:
            (tmp_path / n).write_text("x.jpg 0\n")
        assert default_list_files(kind, tmp_path) == (tmp_path / names[0], tmp_path / names[1])
    (tmp_path / "Places_LT_test.txt").unlink()
    assert str(tmp_path / "Places_LT_test.txt") in one_line_error(default_list_files, "places_lt", tmp_path)
    assert "'cifar'" in one_line_error(default_list_files, "cifar", tmp_path)


def official_transform(name: str, train: bool, image_size: int = 224):
    """The train / test transform that data loading gives the official list dataset ``name`` (its
    pipeline resolved from a recipe with defaults, as ``build_data`` does)."""
    spec = get_dataset(name)
    cfg = recipe_from_dict({"data": {"dataset": name, "image_size": image_size}}).data
    pipe = resolve_pipeline(cfg, name, None, official=True, spec_mean=spec.mean, spec_std=spec.std,
                            spec_jitter=spec.color_jitter, n_images=0)
    return pipeline_transform(pipe, train, cfg.augment)


def _ops(tf):
    return [type(t) for t in tf.transforms]


def test_build_transforms_follow_balpoe():
    tr = official_transform("imagenet_lt", train=True)
    assert _ops(tr) == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.ColorJitter, T.ToTensor, T.Normalize]
    assert tr.transforms[0].size == (224, 224)
    cj = tr.transforms[2]
    assert cj.brightness == cj.contrast == cj.saturation == pytest.approx((0.6, 1.4)) and cj.hue is None
    assert list(tr.transforms[-1].mean) == [0.485, 0.456, 0.406]
    assert list(tr.transforms[-1].std) == [0.229, 0.224, 0.225]
    assert _ops(official_transform("places_lt", train=True)) == _ops(tr)
    inat = official_transform("inat", train=True)
    assert _ops(inat) == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    for kind in ("imagenet_lt", "places_lt", "inat"):
        te = official_transform(kind, train=False)
        assert _ops(te) == [T.Resize, T.CenterCrop, T.ToTensor, T.Normalize]
        assert te.transforms[0].size == 256 and te.transforms[1].size == (224, 224)
    small = official_transform("imagenet_lt", train=False, image_size=112)
    assert small.transforms[0].size == 128 and small.transforms[1].size == (112, 112)


def test_dataloader_batches(tmp_path):
    root = write_image_list(tmp_path, "places_lt", 2, 3, 1, size=40)
    train_list, test_list = default_list_files("places_lt", root)
    for lst, train in ((train_list, True), (test_list, False)):
        ds = ImageListDataset(list_split(root, lst), official_transform("places_lt", train, image_size=32))
        x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)))
        assert x.shape == (min(4, len(ds)), 3, 32, 32) and x.dtype == torch.float32
        assert y.dtype == torch.int64
