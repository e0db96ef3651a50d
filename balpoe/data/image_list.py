"""Image-list datasets: ImageNet-LT, Places-LT (Liu et al. 2019, OLTR) and iNaturalist 2018.

Each split is a text file with one ``relative/path.jpg <label>`` line per image, the path
relative to a ``root`` folder (the format of the OLTR / classifier-balancing / BalPoE list files).
Transforms follow the official BalPoE data loaders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from balpoe.data.bundle import FileSplit
from balpoe.errors import BalpoeError

#: dataset name -> (train list, test list), the conventional file names
LIST_FILES: dict[str, tuple[str, str]] = {
    "imagenet_lt": ("ImageNet_LT_train.txt", "ImageNet_LT_test.txt"),
    "places_lt": ("Places_LT_train.txt", "Places_LT_test.txt"),
    "inat": ("iNaturalist18_train.txt", "iNaturalist18_val.txt"),
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: iNaturalist 2018 RGB statistics used by the classifier-balancing / BalPoE loaders
INAT_MEAN = (0.466, 0.471, 0.380)
INAT_STD = (0.195, 0.194, 0.192)


def read_image_list(list_file: str | Path) -> tuple[list[str], np.ndarray]:
    """Parse a ``path label`` list file; returns the relative paths and int64 labels.

    Blank lines are skipped; the label is the last whitespace-separated field (so a path may
    contain spaces).  A malformed line raises :class:`BalpoeError` naming ``file:line``.
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
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not parts[1].isdigit():
            shown = line if len(line) <= 80 else line[:77] + "..."
            raise BalpoeError(f"{list_file}:{lineno}: expected '<relative/path> <label>', got {shown!r}")
        paths.append(parts[0])
        labels.append(int(parts[1]))
    return paths, np.asarray(labels, dtype=np.int64)


def list_split(root: str | Path, list_file: str | Path, num_classes: int | None = None) -> FileSplit:
    """A :class:`FileSplit` from a list file whose paths are relative to ``root``; class names
    are the label numbers (``"0"``, ``"1"``, ...), ``num_classes`` of them (default: max label + 1)."""
    rel, labels = read_image_list(list_file)
    root = Path(root).expanduser()
    n = num_classes if num_classes is not None else (int(labels.max()) + 1 if len(labels) else 0)
    return FileSplit([root / p for p in rel], labels, [str(i) for i in range(n)])


class ImageListDataset(torch.utils.data.Dataset):
    """``(transform(image), label)`` pairs of a :class:`FileSplit`; images are opened with PIL as RGB."""

    def __init__(self, split: FileSplit, transform: Callable | None = None):
        self.paths, self.labels = list(split.paths), np.asarray(split.labels, dtype=np.int64)
        self.class_names = list(split.class_names)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx: Sequence[int], transform: Callable | None = None) -> "ImageListDataset":
        """The images at ``idx``, with ``transform`` (default: this dataset's)."""
        idx = np.asarray(idx, dtype=np.int64)
        split = FileSplit([self.paths[i] for i in idx], self.labels[idx], self.class_names)
        return ImageListDataset(split, self.transform if transform is None else transform)

    def load(self, index: int) -> Image.Image:
        """The PIL RGB image at ``index`` (no transform)."""
        path = self.paths[index]
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except FileNotFoundError:
            raise BalpoeError(f"image not found: {path}") from None
        except OSError as e:
            raise BalpoeError(f"cannot read image {path}: {e}".replace("\n", " ")) from None

    def __getitem__(self, index: int):
        img = self.load(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[index])


def build_transforms(train: bool, mean: Sequence[float], std: Sequence[float], image_size: int = 224,
                     color_jitter: bool = True) -> T.Compose:
    """Train / test transforms of the official BalPoE loaders.

    Train: ``RandomResizedCrop`` + flip (+ ``ColorJitter(0.4, 0.4, 0.4, 0)`` where ``color_jitter``:
    ImageNet-LT and Places-LT).  Test: ``Resize(256)`` + ``CenterCrop(224)`` (scaled by
    ``image_size / 224``).  Then ``ToTensor`` and ``Normalize(mean, std)``.
    """
    if train:
        ops: list = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
        if color_jitter:
            ops.append(T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0))
    else:
        ops = [T.Resize(int(round(image_size * 256 / 224))), T.CenterCrop(image_size)]
    return T.Compose(ops + [T.ToTensor(), T.Normalize(mean, std)])


def default_list_files(name: str, root: str | Path) -> tuple[Path, Path]:
    """``(train_list, test_list)`` under ``root`` with the conventional names (e.g.
    ``ImageNet_LT_train.txt`` / ``ImageNet_LT_test.txt``); a missing one raises :class:`BalpoeError`."""
    if name not in LIST_FILES:
        raise BalpoeError(f"no conventional list files for dataset {name!r} (known: {', '.join(LIST_FILES)})")
    root = Path(root).expanduser()
    files = tuple(root / f for f in LIST_FILES[name])
    for p in files:
        if not p.is_file():
            raise BalpoeError(f"{name} list file not found: {p} (put the '<path> <label>' list there)")
    return files  # type: ignore[return-value]
