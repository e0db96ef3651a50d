"""Image-list datasets: ImageNet-LT, Places-LT (Liu et al. 2019, OLTR) and iNaturalist 2018.

Each split is a text file with one ``relative/path.jpg <label>`` line per image, the path
relative to a ``root`` folder (the format of the OLTR / classifier-balancing / BalPoE list files).
Transforms follow the official BalPoE data loaders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torchvision import transforms as T

from balpoe.errors import BalpoeError

KINDS = ("imagenet_lt", "places_lt", "inat")

#: kind -> (train list, test list), the conventional file names
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


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise BalpoeError(f"image-list dataset kind must be one of {KINDS}, got {kind!r}")


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


class ImageListDataset(torch.utils.data.Dataset):
    """``(transform(image), label)`` pairs from a list file; images are opened with PIL as RGB."""

    def __init__(self, root: str | Path, list_file: str | Path, transform: Callable | None = None):
        self.root = Path(root).expanduser()
        self.list_file = Path(list_file)
        self.paths, self.labels = read_image_list(self.list_file)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        """``max(label) + 1`` (0 for an empty list)."""
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def load(self, index: int):
        """The PIL RGB image at ``index`` (no transform)."""
        from PIL import Image

        path = self.root / self.paths[index]
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except FileNotFoundError:
            raise BalpoeError(f"image listed in {self.list_file} not found: {path}") from None
        except OSError as e:
            raise BalpoeError(f"cannot read image {path}: {e}".replace("\n", " ")) from None

    def __getitem__(self, index: int):
        img = self.load(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[index])


def build_transforms(kind: str, train: bool, image_size: int = 224) -> T.Compose:
    """Train / test transforms of the official BalPoE loaders.

    Train: ``RandomResizedCrop`` + flip (+ ``ColorJitter(0.4, 0.4, 0.4, 0)`` for ImageNet-LT and
    Places-LT).  Test: ``Resize(256)`` + ``CenterCrop(224)`` (scaled by ``image_size / 224``).
    Then ``ToTensor`` and ``Normalize`` (ImageNet statistics; iNaturalist 2018 statistics for iNat).
    """
    _check_kind(kind)
    mean, std = (INAT_MEAN, INAT_STD) if kind == "inat" else (IMAGENET_MEAN, IMAGENET_STD)
    if train:
        ops: list = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
        if kind != "inat":
            ops.append(T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0))
    else:
        ops = [T.Resize(int(round(image_size * 256 / 224))), T.CenterCrop(image_size)]
    return T.Compose(ops + [T.ToTensor(), T.Normalize(mean, std)])


def default_list_files(kind: str, root: str | Path) -> tuple[Path, Path]:
    """``(train_list, test_list)`` under ``root`` with the conventional names (e.g.
    ``ImageNet_LT_train.txt`` / ``ImageNet_LT_test.txt``); a missing one raises :class:`BalpoeError`."""
    _check_kind(kind)
    root = Path(root).expanduser()
    files = tuple(root / name for name in LIST_FILES[kind])
    for p in files:
        if not p.is_file():
            raise BalpoeError(f"{kind} list file not found: {p} (put the '<path> <label>' list there)")
    return files  # type: ignore[return-value]
