"""Fashion-MNIST reader for the IDX format (Xiao et al. 2017; format of LeCun's MNIST page).

An IDX file is a big-endian header ``magic, dim_0, ..., dim_k`` (uint32 each) followed by the
uint8 data.  Images: magic 2051, dims ``(N, 28, 28)``; labels: magic 2049, dims ``(N,)``.  The files
are ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, gzipped (``.gz``) or not.

Where we look, in order: the recipe's ``data.root`` (files directly there or in a
``fashion-mnist`` / ``FashionMNIST/raw`` subfolder), ``$BALPOE_DATA`` (same three places), and the
Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``).  When
``data.root`` is given but the files come from elsewhere, a warning names both folders.
"""

from __future__ import annotations

import gzip
import zlib
import os
import warnings
from pathlib import Path

import numpy as np
import torchvision

from balpoe.errors import BalpoeError, short_path

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "BALPOE_DATA"
SUBDIRS = ("", "fashion-mnist", os.path.join("FashionMNIST", "raw"))
IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049

#: split -> (images stem, labels stem)
_STEMS = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def save_idx(path: str | Path, array: np.ndarray, magic: int, gz: bool = True) -> Path:
    """Write ``array`` (uint8) as an IDX file (big-endian uint32 magic and dims, then the bytes);
    ``gz`` appends ``.gz`` and compresses.  Returns the path written."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    data = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape) + array.tobytes()
    path = Path(path)
    if gz:
        path = path.with_name(path.name + ".gz")
        with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def save_fashion_mnist(root: str | Path, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                       gz: bool = True) -> Path:
    """Write ``(images uint8 [N, 28, 28] or [N, 1, 28, 28], labels [N])`` splits as the four
    Fashion-MNIST IDX files directly in ``root`` (the inverse of :func:`load_fashion_mnist`)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for (img_stem, lbl_stem), (x, y) in ((_STEMS[True], train), (_STEMS[False], test)):
        save_idx(root / img_stem, np.asarray(x, dtype=np.uint8).reshape(len(x), 28, 28), IMAGES_MAGIC, gz)
        save_idx(root / lbl_stem, np.asarray(y, dtype=np.uint8), LABELS_MAGIC, gz)
    return root


def _is(path: Path, kind: str) -> bool:
    """``path.is_file()`` / ``path.is_dir()``, False where the name cannot even be looked up (too long)."""
    try:
        return path.is_file() if kind == "file" else path.is_dir()
    except (OSError, ValueError):
        return False


def _idx_file(folder: Path, stem: str) -> Path | None:
    """The uncompressed file if present, else the ``.gz`` one, else None."""
    for name in (stem, stem + ".gz"):
        if _is(folder / name, "file"):
            return folder / name
    return None


def _complete(folder: Path) -> bool:
    return all(_idx_file(folder, s) is not None for pair in _STEMS.values() for s in pair)


def fashion_mnist_search_paths(root: str | Path | None) -> list[Path]:
    """Every folder :func:`find_fashion_mnist` tries, in order."""
    bases = [Path(root).expanduser()] if root else []
    env = os.environ.get(ENV_VAR)
    if env:
        bases.append(Path(env).expanduser())
    paths = [b / s if s else b for b in bases for s in SUBDIRS]
    return paths + [DEBIAN_DIR]


def find_fashion_mnist(root: str | Path | None) -> Path | None:
    """The first folder holding all four IDX files: ``root``, then ``$BALPOE_DATA`` (each directly
    or in ``fashion-mnist`` / ``FashionMNIST/raw``), then ``/usr/share/datasets/fashion-mnist``."""
    for p in fashion_mnist_search_paths(root):
        if _is(p, "dir") and _complete(p):
            return p
    return None


#: the largest IDX data read (Fashion-MNIST's training images: 47 MB): a gzipped file is never
#: decompressed beyond it, however much its header or its stream claims
MAX_IDX_BYTES = 256 * 2 ** 20


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """Read one IDX file with the expected magic number (2051 images, 2049 labels) as uint8; the
    header's sizes are checked before the data are read (at most :data:`MAX_IDX_BYTES`)."""
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            head = f.read(4)
            if len(head) < 4:
                raise BalpoeError(f"cannot read IDX file {path}: only {len(head)} bytes")
            got = int.from_bytes(head, "big")
            if got != magic:
                raise BalpoeError(f"bad magic number {got} in IDX file {path} (expected {magic})")
            ndim = head[3]
            dim_bytes = f.read(4 * ndim)
            if len(dim_bytes) < 4 * ndim:
                raise BalpoeError(f"cannot read IDX file {path}: truncated header")
            dims = [int.from_bytes(dim_bytes[4 * i: 4 * i + 4], "big") for i in range(ndim)]
            size = 1
            for d in dims:
                size *= d
            if size > MAX_IDX_BYTES:
                raise BalpoeError(f"IDX file {path}: header {dims} says {size:,} data bytes, more than the "
                                  f"{MAX_IDX_BYTES:,} read from a Fashion-MNIST file")
            raw = f.read(size + 1)
    except FileNotFoundError:
        raise BalpoeError(f"Fashion-MNIST file missing: {path}") from None
    except (OSError, EOFError, zlib.error) as e:  # truncated or not gzip
        raise BalpoeError(f"cannot read IDX file {path}: {type(e).__name__}: {e}".replace("\n", " ")) from None
    if len(raw) != size:
        more = "more than" if len(raw) > size else ""
        raise BalpoeError(f"IDX file {path} has {more}{' ' if more else ''}{len(raw)} data bytes, header {dims} says "
                          f"{size}")
    return np.frombuffer(raw, dtype=np.uint8).reshape(dims)


def _read_split(folder: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    img_stem, lbl_stem = _STEMS[train]
    img_path = _idx_file(folder, img_stem) or folder / (img_stem + ".gz")
    lbl_path = _idx_file(folder, lbl_stem) or folder / (lbl_stem + ".gz")
    images = read_idx(img_path, IMAGES_MAGIC)
    labels = read_idx(lbl_path, LABELS_MAGIC)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise BalpoeError(f"IDX file {img_path} should hold N x 28 x 28 images, header says {list(images.shape)}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise BalpoeError(f"IDX file {lbl_path} holds {labels.size} labels for {len(images)} images in {img_path}")
    if len(labels) and labels.max() >= len(CLASS_NAMES):
        raise BalpoeError(f"IDX file {lbl_path} has label {int(labels.max())}, Fashion-MNIST has 10 classes")
    return images.reshape(-1, 1, 28, 28).copy(), labels.astype(np.int64)


def load_fashion_mnist(root: str | Path | None, train: bool,
                       download: bool = False) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Load Fashion-MNIST: images uint8 ``[N, 1, 28, 28]``, labels int64 ``[N]``, class names.

    If no copy is found and ``download`` is true, torchvision downloads it into ``root`` (or
    ``$BALPOE_DATA``, or ``./data``) under ``FashionMNIST/raw``.
    """
    folder = find_fashion_mnist(root)
    if folder is None:
        if not download:
            looked = ", ".join(short_path(p) for p in fashion_mnist_search_paths(root))
            raise BalpoeError(
                f"Fashion-MNIST IDX files not found (looked in: {looked}); install them with "
                f"`apt-get install dataset-fashion-mnist`, set ${ENV_VAR} to a folder holding them, "
                f"or set data.download: true")
        target = Path(root or os.environ.get(ENV_VAR) or "data").expanduser()
        try:
            torchvision.datasets.FashionMNIST(str(target), train=train, download=True)
        except Exception as e:
            raise BalpoeError(f"could not download Fashion-MNIST into {target}: "
                              f"{type(e).__name__}: {e}".replace("\n", " ")) from None
        folder = target / "FashionMNIST" / "raw"
        if not _complete(folder):
            raise BalpoeError(f"Fashion-MNIST download finished but the IDX files are not in {folder}")
    if root and folder not in fashion_mnist_search_paths(root)[:len(SUBDIRS)]:
        given = Path(root).expanduser()
        why = "does not exist" if not (_is(given, "dir") or _is(given, "file")) else \
            "holds no complete set of Fashion-MNIST IDX files"
        warnings.warn(f"data.root '{short_path(given)}' {why}; using the Fashion-MNIST files in {short_path(folder)}",
                      UserWarning, stacklevel=2)
    images, labels = _read_split(folder, train)
    return images, labels, list(CLASS_NAMES)
