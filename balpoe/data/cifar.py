"""CIFAR-10 / CIFAR-100 readers for the python-pickle layout (Krizhevsky 2009).

The extracted archives look like::

    root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    root/cifar-100-python/{train, test, meta}

Each batch is a pickled dict (written by Python 2, read with ``encoding="bytes"``) whose
``b"data"`` is a uint8 array ``[N, 3072]`` (row-major R, G, B planes of 32x32) and whose labels
are ``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torchvision

from balpoe.errors import BalpoeError, short_path

#: per variant: folder, train files, test files, meta file, label key, names key
_LAYOUT: dict[int, tuple[str, tuple[str, ...], tuple[str, ...], str, bytes, bytes]] = {
    10: ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
         "batches.meta", b"labels", b"label_names"),
    100: ("cifar-100-python", ("train",), ("test",), "meta", b"fine_labels", b"fine_label_names"),
}

_IMAGE_BYTES = 3 * 32 * 32


def cifar_dir(root: str | Path, num_classes: int) -> Path:
    """The folder the extracted CIFAR-``num_classes`` archive lives in under ``root``."""
    if num_classes not in _LAYOUT:
        raise BalpoeError(f"CIFAR has 10 or 100 classes, got num_classes={num_classes}")
    return Path(root).expanduser() / _LAYOUT[num_classes][0]


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False where the name cannot even be looked up (too long)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise BalpoeError(f"CIFAR file missing: {path}") from None
    except Exception as e:  # truncated / not a pickle / wrong protocol
        raise BalpoeError(f"cannot read CIFAR file {path}: {type(e).__name__}: {e}".replace("\n", " ")) from None
    if not isinstance(obj, dict):
        raise BalpoeError(f"cannot read CIFAR file {path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _read_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    if b"data" not in d or label_key not in d:
        raise BalpoeError(f"cannot read CIFAR file {path}: missing key b'data' or {label_key!r}")
    data = np.asarray(d[b"data"])
    labels = np.asarray(d[label_key], dtype=np.int64).reshape(-1)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _IMAGE_BYTES:
        raise BalpoeError(f"cannot read CIFAR file {path}: b'data' should be uint8 [N, {_IMAGE_BYTES}], "
                          f"got {data.dtype} {list(data.shape)}")
    if len(labels) != len(data):
        raise BalpoeError(f"cannot read CIFAR file {path}: {len(data)} images but {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32), labels


def _download(root: Path, num_classes: int, train: bool) -> None:
    cls = torchvision.datasets.CIFAR10 if num_classes == 10 else torchvision.datasets.CIFAR100
    try:
        cls(str(root), train=train, download=True)
    except Exception as e:
        raise BalpoeError(f"could not download CIFAR-{num_classes} into {root}: "
                          f"{type(e).__name__}: {e}".replace("\n", " ")) from None


def load_cifar(root: str | Path, num_classes: int, train: bool,
               download: bool = False) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Load CIFAR-10/100 from ``root`` (the folder that holds the extracted archive).

    Returns images uint8 ``[N, 3, 32, 32]``, labels int64 ``[N]`` and the class names.  If the
    files are missing, ``download=True`` fetches them with torchvision; otherwise a
    :class:`BalpoeError` says where we looked.
    """
    folder = cifar_dir(root, num_classes)
    _, train_files, test_files, meta_file, label_key, names_key = _LAYOUT[num_classes]
    files = [folder / n for n in (train_files if train else test_files)] + [folder / meta_file]
    if not all(_is_file(p) for p in files):
        if not download:
            missing = next(p for p in files if not _is_file(p))
            raise BalpoeError(
                f"CIFAR-{num_classes} not found: {short_path(missing)} is missing; set data.download: true or "
                f"extract the python version of the archive so that {short_path(folder)} exists")
        _download(Path(root).expanduser(), num_classes, train)
    batches = [_read_batch(p, label_key) for p in files[:-1]]
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    meta = _unpickle(files[-1])
    if names_key not in meta:
        raise BalpoeError(f"cannot read CIFAR file {files[-1]}: missing key {names_key!r}")
    names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in meta[names_key]]
    if len(names) != num_classes:
        raise BalpoeError(f"cannot read CIFAR file {files[-1]}: {len(names)} class names, expected {num_classes}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise BalpoeError(f"CIFAR-{num_classes} labels in {folder} fall outside 0..{num_classes - 1}")
    return images, labels, names


def _dump(obj: dict, path: Path) -> None:
    """Pickle protocol 2, as the original (Python 2) CIFAR files."""
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def save_cifar(root: str | Path, num_classes: int, train: tuple[np.ndarray, np.ndarray],
               test: tuple[np.ndarray, np.ndarray], class_names: list[str] | None = None) -> Path:
    """Write ``(images uint8 [N, 3, 32, 32], labels [N])`` splits in the CIFAR-10/100 pickle layout
    under ``root`` (the inverse of :func:`load_cifar`; CIFAR-10's training set in five batches,
    CIFAR-100 with coarse labels ``fine // 5``); returns ``root``.  Used for synthetic data in the
    real format (tests, the speed benchmark)."""
    if num_classes not in _LAYOUT:
        raise ValueError("CIFAR has 10 or 100 classes")
    root = Path(root)
    (train_x, train_y), (test_x, test_y) = [(np.ascontiguousarray(x, dtype=np.uint8).reshape(len(x), _IMAGE_BYTES),
                                            np.asarray(y, dtype=np.int64)) for x, y in (train, test)]
    class_names = class_names or [f"class_{c:02d}" for c in range(num_classes)]
    label_names = [n.encode() for n in class_names]

    def names(prefix: bytes, n: int) -> list[bytes]:
        return [b"%s_%06d.png" % (prefix, i) for i in range(n)]

    folder = root / _LAYOUT[num_classes][0]
    folder.mkdir(parents=True, exist_ok=True)
    if num_classes == 10:
        parts = np.array_split(np.arange(len(train_y)), 5)
        for i, idx in enumerate(parts, start=1):
            _dump({b"batch_label": b"training batch %d of 5" % i, b"labels": train_y[idx].tolist(),
                   b"data": train_x[idx], b"filenames": names(b"train%d" % i, len(idx))},
                  folder / f"data_batch_{i}")
        _dump({b"batch_label": b"testing batch 1 of 1", b"labels": test_y.tolist(),
               b"data": test_x, b"filenames": names(b"test", len(test_y))}, folder / "test_batch")
        _dump({b"num_cases_per_batch": len(parts[0]), b"num_vis": _IMAGE_BYTES, b"label_names": label_names},
              folder / "batches.meta")
    else:
        for split, y, x in (("train", train_y, train_x), ("test", test_y, test_x)):
            _dump({b"filenames": names(split.encode(), len(y)), b"batch_label": split.encode(),
                   b"fine_labels": y.tolist(), b"coarse_labels": (y // 5).tolist(), b"data": x},
                  folder / split)
        _dump({b"fine_label_names": label_names,
               b"coarse_label_names": [b"superclass_%02d" % c for c in range(20)]}, folder / "meta")
    return root
