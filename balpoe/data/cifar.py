"""CIFAR-10 / CIFAR-100 readers for the python-pickle layout (Krizhevsky 2009).

The extracted archives look like::

    root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    root/cifar-100-python/{train, test, meta}

Each batch is a pickled dict (written by Python 2, read with ``encoding="bytes"``) whose
``b"data"`` is a uint8 array ``[N, 3072]`` (row-major R, G, B planes of 32x32) and whose labels
are ``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100).

Reading a pickle can run any code the file names, so these files are read with a restricted reader
(:class:`_CifarUnpickler`): it builds dicts, lists, strings, numbers and numpy arrays of plain
number types, and refuses every other global by name with a one-line error, before importing it.
What it builds is then checked (keys, array shape and dtype, label type and range, class names).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import torchvision

from balpoe.errors import BalpoeError, clip, short_path, shown

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


#: the largest CIFAR file read (the real ones: 31 MB per CIFAR-10 batch, 155 MB for CIFAR-100's ``train``)
MAX_FILE_BYTES = 512 * 2 ** 20
#: the longest class name read from a meta file
MAX_NAME_CHARS = 1000

try:  # numpy >= 2 names the module numpy._core; pickles written by numpy 1 (the real CIFAR files) numpy.core
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - numpy 1
    from numpy.core.multiarray import _reconstruct as _np_reconstruct


class _Refused(pickle.UnpicklingError):
    """A pickle asked for something a CIFAR file never holds."""


class _NdarrayType:
    """Stands for ``numpy.ndarray`` in a CIFAR pickle: an argument of ``_reconstruct`` only, never
    called (calling the real class with a pickled shape would allocate any size)."""


def _reconstruct(subtype, shape, typecode):
    """numpy's ``_reconstruct(ndarray, (0,), b'b')``, the empty array a pickled array starts from."""
    if not isinstance(subtype, _NdarrayType) or shape != (0,):
        raise _Refused("numpy._reconstruct with arguments numpy never pickles")
    return _np_reconstruct(np.ndarray, (0,), typecode)


def _dtype(spec, align=False, copy=False):
    """``numpy.dtype(spec)`` of a plain number type (no Python objects, no fields)."""
    if not isinstance(spec, (str, bytes)) or len(spec) > 8:
        raise _Refused("numpy.dtype of something that is not a short type code")
    d = np.dtype(spec.decode("ascii", "replace") if isinstance(spec, bytes) else spec, bool(align), bool(copy))
    if d.hasobject or d.names is not None or d.subdtype is not None or d.kind not in "biuf":
        raise _Refused(f"numpy.dtype {d}, not a plain number type")
    return d


def _latin1(text, encoding):
    """``_codecs.encode(text, 'latin1')``: how Python 3 writes bytes into a protocol-2 pickle."""
    if type(text) is not str or encoding not in ("latin1", "latin-1", b"latin1", b"latin-1"):
        raise _Refused("_codecs.encode other than of a string to latin-1")
    return text.encode("latin-1")


#: (module, name) -> what a CIFAR pickle gets for it: the globals the real files reference (numpy's
#: array reconstruction, numpy.ndarray, numpy.dtype; numpy >= 2 writes numpy._core) and the latin-1
#: encoding of bytes in protocol-2 pickles written by Python 3 (:func:`save_cifar`)
_GLOBALS = {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy", "ndarray"): _NdarrayType(), ("numpy", "dtype"): _dtype, ("_codecs", "encode"): _latin1}
_BYTE_ORDERS = ("|", "<", ">", "=", b"|", b"<", b">", b"=")


class _CifarUnpickler(pickle._Unpickler):
    """A pickle reader that builds only what CIFAR files hold: dicts, lists, tuples, numbers, bytes
    and strings, and numpy arrays of plain number types.

    ``find_class`` admits only :data:`_GLOBALS` (anything else is refused by name, before it is
    imported), and ``BUILD`` only sets the state of those arrays and dtypes.  It is the pure-Python
    reader of :mod:`pickle` on the file's bytes in memory: its memo is a dict (the C reader
    allocates a table as large as any index a file names) and it reads iteratively, so deeply
    nested containers cost memory in proportion to the file, never recursion."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module, name):
        if (module, name) not in _GLOBALS:
            raise _Refused(f"the Python global {clip(module, 80)}.{clip(name, 80)}")
        return _GLOBALS[module, name]

    def persistent_load(self, pid):
        raise _Refused("a persistent id")

    def _load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is np.ndarray:
            ok = (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], np.dtype)
                  and not state[2].hasobject and isinstance(state[4], bytes))
        elif isinstance(inst, np.dtype):
            ok = (isinstance(state, tuple) and len(state) == 8 and state[0] == 3 and state[1] in _BYTE_ORDERS
                  and state[2:5] == (None, None, None) and state[7] == 0)
        else:
            ok = False
        if not ok:
            raise _Refused(f"setting the state of a {type(inst).__name__} in a way numpy never pickles")
        inst.__setstate__(state)

    dispatch[pickle.BUILD[0]] = _load_build


def _unpickle(path: Path) -> dict:
    """The dict pickled in CIFAR file ``path``, read with :class:`_CifarUnpickler` (a file that asks
    for anything else is a one-line error naming it and what it asked for); keys as bytes."""
    where = f"CIFAR file {short_path(path, 240)}"
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise BalpoeError(f"{where} is missing") from None
    except OSError as e:
        raise BalpoeError(f"cannot read {where}: {clip(e.strerror or type(e).__name__)}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise BalpoeError(f"cannot read {where}: larger than {MAX_FILE_BYTES:,} bytes, which no CIFAR file is")
    try:
        obj = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except _Refused as e:
        raise BalpoeError(f"cannot read {where}: refused {e} (a CIFAR file holds only a dict of numpy arrays, "
                          "lists and strings; data files are read without running code)") from None
    except (Exception, RecursionError) as e:  # truncated / not a pickle / wrong protocol / out of memory
        raise BalpoeError(f"cannot read {where}: {type(e).__name__}: {clip(e)}") from None
    finally:
        del raw
    if not isinstance(obj, dict):
        raise BalpoeError(f"cannot read {where}: expected a pickled dict, got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if not isinstance(k, (bytes, str)):
            raise BalpoeError(f"cannot read {where}: a key of its dict is a {type(k).__name__}, not a string")
        out[k.encode("utf-8", "replace") if isinstance(k, str) else k] = v
    return out


def _labels(value, where: str, key: bytes, n: int, num_classes: int) -> np.ndarray:
    """A batch's labels (a list of ints, or a 1-D integer array) as int64 ``[n]`` in ``0..num_classes-1``."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or value.dtype.kind not in "iu":
            raise BalpoeError(f"cannot read {where}: {key!r} should be a list of integers, got a {value.dtype} array "
                              f"of shape {list(value.shape)}")
        labels = value.astype(np.int64)
    elif isinstance(value, list):
        bad = next((v for v in value if type(v) is not int), None)
        if bad is not None:
            raise BalpoeError(f"cannot read {where}: {key!r} should be a list of integers, it holds a "
                              f"{type(bad).__name__}")
        out = next((i for i, v in enumerate(value) if not 0 <= v < num_classes), None)
        if out is not None:
            raise BalpoeError(f"cannot read {where}: label {shown(value[out], 40)} (image {out}) is outside "
                              f"0..{num_classes - 1}")
        labels = np.asarray(value, dtype=np.int64)
    else:
        raise BalpoeError(f"cannot read {where}: {key!r} should be a list of integers, got {type(value).__name__}")
    if len(labels) != n:
        raise BalpoeError(f"cannot read {where}: {n} images but {len(labels)} labels")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise BalpoeError(f"cannot read {where}: label {int(labels[bad[0]])} (image {int(bad[0])}) is outside "
                          f"0..{num_classes - 1}")
    return labels


def _read_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    where = f"CIFAR file {short_path(path, 240)}"
    if b"data" not in d or label_key not in d:
        raise BalpoeError(f"cannot read {where}: missing key b'data' or {label_key!r}")
    data = d[b"data"]
    if not isinstance(data, np.ndarray):
        raise BalpoeError(f"cannot read {where}: b'data' should be a uint8 array [N, {_IMAGE_BYTES}], got "
                          f"{type(data).__name__}")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _IMAGE_BYTES:
        raise BalpoeError(f"cannot read {where}: b'data' should be uint8 [N, {_IMAGE_BYTES}], "
                          f"got {data.dtype} {list(data.shape)}")
    labels = _labels(d[label_key], where, label_key, len(data), num_classes)
    return data.reshape(-1, 3, 32, 32), labels


def _class_names(path: Path, names_key: bytes, num_classes: int) -> list[str]:
    meta = _unpickle(path)
    where = f"CIFAR file {short_path(path, 240)}"
    if names_key not in meta:
        raise BalpoeError(f"cannot read {where}: missing key {names_key!r}")
    raw = meta[names_key]
    if not isinstance(raw, list) or len(raw) != num_classes:
        got = f"{len(raw)} class names" if isinstance(raw, list) else f"a {type(raw).__name__}"
        raise BalpoeError(f"cannot read {where}: {names_key!r} should be a list of {num_classes} class names, "
                          f"got {got}")
    names = []
    for i, n in enumerate(raw):
        if not isinstance(n, (bytes, str)) or len(n) > MAX_NAME_CHARS:
            raise BalpoeError(f"cannot read {where}: class name {i} should be a string of at most {MAX_NAME_CHARS} "
                              "characters")
        try:
            names.append(n.decode("utf-8") if isinstance(n, bytes) else n)
        except UnicodeDecodeError:
            raise BalpoeError(f"cannot read {where}: class name {i} is not UTF-8 text") from None
    return names


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
    names = _class_names(files[-1], names_key, num_classes)
    batches = [_read_batch(p, label_key, num_classes) for p in files[:-1]]
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
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
