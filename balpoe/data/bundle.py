"""What a dataset reader returns (:class:`ArraySplit`, :class:`FileSplit`) and what the rest of
the library receives (:class:`DataBundle`, whose in-memory splits are :class:`ImageArrays`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class ArraySplit:
    """One split of a small dataset, held in memory: uint8 images ``[N, C, H, W]``, int64 labels
    ``[N]`` and the class names (label order)."""
    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]


@dataclass
class FileSplit:
    """One split of an image-file dataset: image paths, int64 labels ``[N]``, class names; ``root``:
    the folder relative paths (list files) are taken from; ``source``: where the split was read
    (``"list file 'train.txt'"``, ``"folder 'data/train'"``), for messages."""
    paths: list[Path]
    labels: np.ndarray
    class_names: list[str]
    root: Path | None = None
    source: str = ""


@dataclass
class ImageArrays:
    """An in-memory split on the training device: uint8 images ``[N, C, H, W]``, int64 labels ``[N]``."""
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device) -> "ImageArrays":
        return ImageArrays(self.images.to(device), self.labels.to(device))

    def subset(self, idx) -> "ImageArrays":
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.labels.device)
        return ImageArrays(self.images[idx], self.labels[idx])


@dataclass
class DataBundle:
    """Everything downstream needs to know about the data."""
    name: str
    num_classes: int
    in_chans: int
    class_counts: torch.Tensor          # training images per class after LT subsampling, int64 [C]
    mean: tuple
    std: tuple
    class_names: list[str]
    train: object                       # ImageArrays, or an ImageListDataset for image-file datasets
    test: object
    holdout: object | None = None       # held-out labelled slice of the LT training split, or the validation split
    in_memory: bool = True
    holdout_note: str | None = None     # what ``holdout`` is when it is not a slice of the training split
    pipeline: object | None = None      # balpoe.data.pipeline.Pipeline: augmentation, size, normalisation

    def labels_of(self, split: str) -> torch.Tensor:
        """int64 labels (CPU) of ``split`` in {'train', 'test', 'holdout'}."""
        labels = getattr(self, split).labels
        return labels.cpu().long() if isinstance(labels, torch.Tensor) else torch.as_tensor(labels, dtype=torch.long)
