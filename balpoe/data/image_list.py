"""Image-list datasets: ImageNet-LT, Places-LT (Liu et al. 2019, OLTR) and iNaturalist 2018.

Each split is a text file with one ``relative/path.jpg <label>`` line per image, the path
relative to a ``root`` folder (the format of the OLTR / classifier-balancing / BalPoE list files).
Transforms follow the official BalPoE data loaders.
"""

from __future__ import annotations

import contextlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from balpoe.data.bundle import FileSplit
from balpoe.data.decode import load_pil, read_rgb, tensor_transform
from balpoe.data.pipeline import luma
from balpoe.errors import BalpoeError, short_path, shown
from balpoe.runtime.console import ThroughputColumn, console

#: dataset name -> (train list, test list), the conventional file names
LIST_FILES: dict[str, tuple[str, str]] = {
    "imagenet_lt": ("ImageNet_LT_train.txt", "ImageNet_LT_test.txt"),
    "places_lt": ("Places_LT_train.txt", "Places_LT_test.txt"),
    "inat": ("iNaturalist18_train.txt", "iNaturalist18_val.txt"),
}
#: dataset name -> the conventional validation list (20 images per class for ImageNet-LT and Places-LT):
#: the calibration holdout when it is present (iNaturalist 2018's validation set is its test set)
VAL_LIST_FILES: dict[str, str] = {"imagenet_lt": "ImageNet_LT_val.txt", "places_lt": "Places_LT_val.txt"}
#: where to get each dataset's list files and images (said when they are missing)
DATA_SOURCES: dict[str, str] = {
    "imagenet_lt": "the ImageNet_LT_*.txt lists are published with OLTR "
                   "(github.com/zhmiao/OpenLongTailRecognition-OLTR) and the images are ImageNet-2012's (image-net.org), under data.root as the lists name them",
    "places_lt": "the Places_LT_*.txt lists are published with OLTR (github.com/zhmiao/OpenLongTailRecognition-OLTR) "
                 "and the images are Places365-Standard's (places2.csail.mit.edu), under data.root as the lists "
                 "name them",
    "inat": "the iNaturalist18_*.txt lists are published with classifier-balancing "
            "(github.com/facebookresearch/classifier-balancing) and the images are iNaturalist 2018's "
            "(github.com/visipedia/inat_comp), under data.root as the lists name them",
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: iNaturalist 2018 RGB statistics used by the classifier-balancing / BalPoE loaders
INAT_MEAN = (0.466, 0.471, 0.380)
INAT_STD = (0.195, 0.194, 0.192)


#: labels of list files are class numbers below this (iNaturalist 2021 has 10,000 classes): a label
#: sizes per-class tables, so a huge one would ask for memory in proportion
MAX_CLASSES = 1_000_000
_LABEL = re.compile(r"[0-9]+", re.ASCII)


def read_image_list(list_file: str | Path) -> tuple[list[str], np.ndarray]:
    """Parse a ``path label`` list file; returns the relative paths and int64 labels.

    Blank lines are skipped; the label is the last whitespace-separated field (so a path may
    contain spaces), written in ASCII digits (not ``²`` or other Unicode digits), below
    :data:`MAX_CLASSES`.  A malformed line raises :class:`BalpoeError` naming ``file:line``.
    """
    list_file = Path(list_file)
    try:
        text = list_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BalpoeError(f"image list file not found: {list_file}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BalpoeError(f"cannot read image list file {list_file}: {type(e).__name__}") from None
    paths: list[str] = []
    labels: list[int] = []
    for lineno, line in enumerate(text.split("\n"), start=1):  # line numbers as editors count them
        line = line.strip()
        if not line:
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not _LABEL.fullmatch(parts[1]):
            raise BalpoeError(f"{short_path(list_file)}:{lineno}: expected '<relative/path> <label>' with the label "
                              f"in digits 0-9, got {shown(line, 80)}")
        if len(parts[1]) > 7 or int(parts[1]) >= MAX_CLASSES:
            raise BalpoeError(f"{short_path(list_file)}:{lineno}: label {shown(parts[1], 40)} is not a class number "
                              f"below {MAX_CLASSES:,}")
        paths.append(parts[0])
        labels.append(int(parts[1]))
    return paths, np.asarray(labels, dtype=np.int64)


def list_split(root: str | Path, list_file: str | Path, num_classes: int | None = None,
               class_names: Sequence[str] | None = None) -> FileSplit:
    """A :class:`FileSplit` from a list file whose paths are relative to ``root``.

    Class names are ``class_names`` (label order; a label beyond them is a one-line error naming the
    file), else the label numbers (``"0"``, ``"1"``, ...), ``num_classes`` of them (default: max
    label + 1)."""
    rel, labels = read_image_list(list_file)
    root = Path(root).expanduser()
    if class_names is not None:
        bad = np.flatnonzero(labels >= len(class_names))
        if len(bad):
            raise BalpoeError(f"image list file {list_file}: label {int(labels[bad[0]])} (image {rel[bad[0]]!r}) "
                              f"has no class name: the class-names file names {len(class_names)} classes (labels 0.."
                              f"{len(class_names) - 1})")
        names = [str(n) for n in class_names]
    else:
        n = num_classes if num_classes is not None else (int(labels.max()) + 1 if len(labels) else 0)
        names = [str(i) for i in range(n)]
    return FileSplit([root / p for p in rel], labels, names, root=root, source=f"list file {list_file}")


def check_list_images(split: FileSplit, list_file: str | Path, hint: str = "") -> FileSplit:
    """``split`` (from ``list_file``) lists at least one image and its first image is there; otherwise
    a one-line error naming the file, the image looked for and (``hint``) how to get the data."""
    how = f"; {hint}" if hint else ""
    if not len(split.labels):
        raise BalpoeError(f"image list file {list_file} lists no image (expected '<relative/path> <label>' lines)")
    first = Path(split.paths[0])
    if not first.is_file():
        raise BalpoeError(f"image list file {list_file}: its first image is not there: looked for {first} (the "
                          f"list's paths are relative to data.root, here {split.root}){how}")
    return split


def read_class_names(path: str | Path) -> list[str]:
    """One class name per line (label order; surrounding blank lines ignored); a missing or unreadable
    file, a blank line between names or a repeated name is a one-line error."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BalpoeError(f"recipe key 'data.class_names': file {path} not found (one class name per line, in "
                          "label order)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BalpoeError(f"recipe key 'data.class_names': cannot read {path} ({type(e).__name__})") from None
    names = [line.strip() for line in text.strip().splitlines()]
    if not names:
        raise BalpoeError(f"recipe key 'data.class_names': {path} names no class (one name per line, in label order)")
    if "" in names:
        raise BalpoeError(f"recipe key 'data.class_names': {path} line {names.index('') + 1} is blank (one name per "
                          "line, in label order)")
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in seen:
            raise BalpoeError(f"recipe key 'data.class_names': {path} names {n!r} twice (lines {seen[n] + 1} and "
                              f"{i + 1})")
        seen[n] = i
    return names


def find_list_file(given: str | Path, root: str | Path | None, key: str) -> Path:
    """The list file ``given`` in a recipe key: absolute, or relative to ``data.root`` (tried first) or
    to the working directory; a one-line error naming every place looked at."""
    p = Path(given).expanduser()
    tried = [p] if p.is_absolute() or root is None else [Path(root).expanduser() / p, p]
    for t in tried:
        if t.is_file():
            return t
    shown = " or ".join(str(t) for t in tried)
    raise BalpoeError(f"recipe key '{key}': list file not found: looked for {shown} (a text file of "
                      "'<relative/path> <label>' lines)")


def match_image_list(list_file: str | Path, paths: Sequence[str | Path], labels: np.ndarray,
                     root: str | Path | None) -> np.ndarray:
    """Indices into the images ``paths`` (with ``labels``) of the images a ``path label`` list file
    names, in the file's order.

    Published test-distribution lists (e.g. the forward/backward test subsets of ImageNet-LT and
    iNaturalist used by SADE and BalPoE) are subsets of the balanced test list: each line's path,
    taken relative to ``root`` like the test list's own, is looked up among ``paths``.  An image
    that is not among them, or whose label differs, is a one-line error naming the first one."""
    rel, want = read_image_list(list_file)
    if not len(rel):
        raise BalpoeError(f"test list {list_file} lists no image")
    base = Path(root).expanduser() if root is not None else Path()
    index = {os.path.normpath(str(p)): i for i, p in enumerate(paths)}
    labels = np.asarray(labels)
    out = np.empty(len(rel), dtype=np.int64)
    for j, (r, y) in enumerate(zip(rel, want.tolist())):
        i = index.get(os.path.normpath(str(base / r)))
        if i is None:
            raise BalpoeError(f"test list {list_file}: image {r!r} (line {j + 1}, {len(rel)} lines) is not in the "
                              f"test set ({len(paths)} images under {base}): a test-distribution list must be a "
                              "subset of the test split")
        if int(labels[i]) != y:
            raise BalpoeError(f"test list {list_file}: image {r!r} (line {j + 1}) has label {y}, the test split says "
                              f"{int(labels[i])}")
        out[j] = i
    return out


#: image decoders of the image-file path
DECODERS = ("tensor", "pil")


class ImageListDataset(torch.utils.data.Dataset):
    """``(transform(image), label)`` pairs of a :class:`FileSplit`.

    ``decode="tensor"`` (default) decodes with torchvision into uint8 tensors
    (:func:`~balpoe.data.decode.read_rgb`) and runs the transform on them
    (:func:`~balpoe.data.decode.tensor_transform`: the same random draws as the PIL pipeline,
    1.35x the images per core for the standard pipeline, 1.1x with RandAugment;
    ``benchmarks/input_pipeline.py``); ``"pil"`` opens every image with PIL as RGB."""

    def __init__(self, split: FileSplit, transform: Callable | None = None, decode: str = "tensor",
                 channels: int = 3):
        if decode not in DECODERS:
            raise BalpoeError(f"image decoder must be one of {', '.join(DECODERS)}; got {decode!r}")
        self.channels = channels  # 1: grey, PIL's convert("L")
        self.paths, self.labels = list(split.paths), np.asarray(split.labels, dtype=np.int64)
        self.class_names = list(split.class_names)
        self.root, self.source = split.root, split.source
        self.decode, self.pil_transform = decode, transform
        self.transform = tensor_transform(transform) if decode == "tensor" and transform is not None else transform

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx: Sequence[int], transform: Callable | None = None) -> "ImageListDataset":
        """The images at ``idx``, with ``transform`` (default: this dataset's)."""
        idx = np.asarray(idx, dtype=np.int64)
        split = FileSplit([self.paths[i] for i in idx], self.labels[idx], self.class_names, self.root, self.source)
        return ImageListDataset(split, self.pil_transform if transform is None else transform, self.decode,
                                self.channels)

    def load(self, index: int) -> Image.Image:
        """The PIL image at ``index``, RGB or grey (``channels``), no transform
        (:func:`~balpoe.data.decode.load_pil`: the pixel limit, and a one-line error naming a file
        that cannot be decoded)."""
        return load_pil(self.paths[index]).convert("L" if self.channels == 1 else "RGB")

    def decode_every(self, threads: int = 1, what: str = "images") -> None:
        """Decode every image in full with this dataset's decoder (``threads`` at a time: PIL and
        torchvision release the GIL while decoding), the images dropped: a missing or foreign file,
        or one whose pixel data are damaged behind a valid header, is a one-line
        :class:`BalpoeError` naming it now, not when the split is first read.  Used before training
        on the splits read only at evaluation (``what`` names them on the progress bar)."""
        read = read_rgb if self.decode == "tensor" else load_pil

        def decode(path) -> None:  # returns nothing: no decoded image waits for the in-order loop below
            read(path)

        # a bar only where someone watches a long check (a disabled rich bar still writes a newline
        # when it stops, which would come before a one-line error)
        progress = Progress(TextColumn(f"[bold]checking {what}"), BarColumn(), MofNCompleteColumn(),
                            ThroughputColumn(), TimeRemainingColumn(), console=console, transient=True) \
            if console.is_terminal and len(self.paths) >= 1000 else None
        with progress or contextlib.nullcontext(), ThreadPoolExecutor(max(1, threads)) as pool:
            task = progress.add_task("decode", total=len(self.paths)) if progress is not None else None
            for _ in pool.map(decode, self.paths):  # in order: the first bad file of the list is named
                if progress is not None:
                    progress.advance(task)

    def __getitem__(self, index: int):
        if self.transform is None:
            return self.load(index), int(self.labels[index])
        if self.decode != "tensor":
            img = self.load(index)
        else:
            img = read_rgb(self.paths[index])
            if self.channels == 1:
                img = luma(img)
        return self.transform(img), int(self.labels[index])


def default_list_files(name: str, root: str | Path) -> tuple[Path, Path]:
    """``(train_list, test_list)`` under ``root`` with the conventional names (e.g.
    ``ImageNet_LT_train.txt`` / ``ImageNet_LT_test.txt``); a missing one raises :class:`BalpoeError`
    saying where the files come from."""
    return conventional_list(name, root, "train"), conventional_list(name, root, "test")


def conventional_list(name: str, root: str | Path, split: str) -> Path:
    """The conventional ``split`` list file (``"train"`` / ``"test"``) of dataset ``name`` under
    ``root``; a missing one is a one-line error naming the file and where to get it."""
    if name not in LIST_FILES:
        raise BalpoeError(f"no conventional list files for dataset {name!r} (known: {', '.join(LIST_FILES)})")
    p = Path(root).expanduser() / LIST_FILES[name][0 if split == "train" else 1]
    if not p.is_file():
        where = DATA_SOURCES.get(name, "put the '<path> <label>' list there")
        raise BalpoeError(f"{name} list file not found: {p} (looked for {', '.join(LIST_FILES[name])} in data.root "
                          f"{Path(root).expanduser()}; {where})")
    return p


def conventional_val_list(name: str, root: str | Path | None) -> Path | None:
    """The conventional validation list of dataset ``name`` under ``root`` (``ImageNet_LT_val.txt``,
    ``Places_LT_val.txt``) when it is there, else None."""
    if name not in VAL_LIST_FILES or root is None:
        return None
    p = Path(root).expanduser() / VAL_LIST_FILES[name]
    return p if p.is_file() else None
