"""Class-sub-folder datasets: your own images in torchvision's ``ImageFolder`` layout.

A split is a folder with one sub-folder of images per class, ``<root>/<class>/<image>`` (nested
folders inside a class are searched too).  Class names are the sub-folder names sorted as
torchvision sorts them (:func:`torchvision.datasets.folder.find_classes`), labels their positions in
that order; images are the files with torchvision's extensions
(:data:`torchvision.datasets.folder.IMG_EXTENSIONS`: .jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif,
.tiff, .webp), in :func:`~torchvision.datasets.folder.make_dataset`'s order.  The validation and
test folders take their labels from the training folder's classes and may lack some of them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

from balpoe.data.bundle import FileSplit
from balpoe.errors import BalpoeError

#: the layout, for messages
LAYOUT = "one sub-folder of images per class: <folder>/<class>/<image>.jpg"


def folder_classes(root: str | Path, key: str) -> list[str]:
    """The class sub-folder names of ``root`` (sorted as torchvision does); ``key`` is the recipe key
    that names the folder, for one-line errors (missing folder, not a folder, no sub-folder)."""
    root = Path(root).expanduser()
    if not root.exists():
        raise BalpoeError(f"recipe key '{key}': folder {root} not found (it should hold {LAYOUT})")
    if not root.is_dir():
        raise BalpoeError(f"recipe key '{key}': {root} is not a folder (it should hold {LAYOUT})")
    try:
        classes, _ = find_classes(str(root))
    except FileNotFoundError:
        raise BalpoeError(f"recipe key '{key}': folder {root} has no class sub-folder (it should hold "
                          f"{LAYOUT})") from None
    except OSError as e:
        raise BalpoeError(f"recipe key '{key}': cannot read folder {root} ({e.strerror or type(e).__name__})") from None
    return classes


def folder_split(root: str | Path, key: str, class_names: Sequence[str] | None = None,
                 train_key: str = "the training folder") -> FileSplit:
    """The images of the class folder ``root`` as a :class:`FileSplit`.

    ``class_names``: the training classes (label order) for a validation or test folder, whose every
    sub-folder must be one of them (one-line error naming the first that is not); None for the
    training folder, whose own sub-folders are the classes.  A class folder without an image is a
    one-line error naming it."""
    root = Path(root).expanduser()
    classes = folder_classes(root, key)
    names = list(classes) if class_names is None else [str(c) for c in class_names]
    label_of = {c: i for i, c in enumerate(names)}
    extra = [c for c in classes if c not in label_of]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise BalpoeError(f"recipe key '{key}': class folder {root / extra[0]}{more} is not a class of {train_key} "
                          f"({len(names)} classes); every class needs training images: add the folder there, "
                          "or remove it here")
    try:
        samples = class_images(root, {c: label_of[c] for c in classes})
    except OSError as e:
        raise BalpoeError(f"recipe key '{key}': cannot read folder {root} ({e.strerror or type(e).__name__})") from None
    labels = np.asarray([y for _, y in samples], dtype=np.int64)
    present = np.bincount(labels, minlength=len(names)) if len(labels) else np.zeros(len(names), dtype=np.int64)
    empty = [c for c in classes if present[label_of[c]] == 0]
    if empty:
        more = f" ({len(empty)} of {len(classes)} class folders are empty)" if len(empty) > 1 else ""
        raise BalpoeError(f"recipe key '{key}': class folder {root / empty[0]} holds no image{more}: add images "
                          f"({', '.join(IMG_EXTENSIONS[:3])}, ...) or remove the folder")
    return FileSplit([Path(p) for p, _ in samples], labels, names, root=root, source=f"folder {root}")


def _walk_once(folder: str):
    """``os.walk(folder, followlinks=True)`` that enters each real directory once: a symlink that
    loops back to a folder above it, or a second link to a folder already walked, is not followed
    again (``os.walk`` alone would walk a loop until the path is too long, counting its images each
    time round)."""
    seen: set[tuple[int, int]] = set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        try:
            st = os.stat(top)
        except OSError:
            dirs[:] = []
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:
            dirs[:] = []
            continue
        seen.add(key)
        keep = []
        for d in dirs:
            try:
                sd = os.stat(os.path.join(top, d))
            except OSError:
                continue
            if (sd.st_dev, sd.st_ino) not in seen:
                keep.append(d)
        dirs[:] = keep
        yield top, dirs, files


def class_images(root: str | Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """``(path, label)`` of the images in each class folder ``root/<class>`` (nested folders
    included), in :func:`torchvision.datasets.folder.make_dataset`'s order (classes sorted, then
    folders and files sorted), each real folder walked once (:func:`_walk_once`): symlinked folders
    are followed, loops and repeats are not."""
    out = []
    for cls in sorted(class_to_idx):
        walked = [(top, files) for top, _, files in _walk_once(os.path.join(str(root), cls))]
        for top, files in sorted(walked):
            for name in sorted(files):
                path = os.path.join(top, name)
                if name.lower().endswith(IMG_EXTENSIONS) and os.path.isfile(path):
                    out.append((path, class_to_idx[cls]))
    return out


def training_folder(cfg) -> tuple[Path, str]:
    """The training folder of an ``image_folder`` recipe and the key naming it: ``data.train_root``,
    or ``data.root`` (one folder, split by ``data.test_fraction``); one-line errors for neither or both."""
    train_root, root = getattr(cfg, "train_root", None), getattr(cfg, "root", None)
    if train_root and root:
        raise BalpoeError("recipe keys 'data.root' and 'data.train_root' both name the training folder of dataset "
                          "image_folder: set data.train_root (with data.test_root or data.test_fraction), or only "
                          "data.root (with data.test_fraction)")
    if not train_root and not root:
        raise BalpoeError(f"recipe key 'data.train_root' is required for dataset image_folder (a folder with {LAYOUT}; "
                          "or data.root with data.test_fraction to split one folder)")
    return (Path(os.path.expanduser(train_root)), "data.train_root") if train_root else \
        (Path(os.path.expanduser(root)), "data.root")
