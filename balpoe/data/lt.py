"""Long-tailed subsampling (Cao et al. 2019, as in the official BalPoE/MiSLAS code), class groups
and stratified held-out slices.

Class ``i`` (0 = head) keeps ``n_i = int(n_max * (1/IF) ** (i / (C - 1)))`` images for the
exponential profile; the step profile keeps ``n_max`` for the first half of the classes and
``int(n_max / IF)`` for the rest.  Which images are kept follows the reference construction
exactly: numpy's legacy global generator is seeded once with 0, then for each class in order
its indices are shuffled with ``np.random.shuffle`` and the first ``n_i`` are kept.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from balpoe.data.groups import GROUP_NAMES, group_indices
from balpoe.errors import BalpoeError

PROFILES = ("exp", "step")


def lt_class_counts(n_max: int, num_classes: int, imb_factor: float, profile: str = "exp") -> list[int]:
    """Per-class image counts of a long-tailed split (class 0 is the most frequent).

    ``imb_factor`` is the imbalance ratio N_max / N_min (e.g. 100); ``imb_factor = 1`` is balanced.
    """
    if imb_factor < 1:
        raise BalpoeError(f"imb_factor must be >= 1 (N_max / N_min), got {imb_factor}")
    if profile not in PROFILES:
        raise BalpoeError(f"imbalance profile must be one of {PROFILES}, got {profile!r}")
    ratio = 1.0 / imb_factor
    if profile == "exp":
        if num_classes == 1:
            return [int(n_max)]
        return [int(n_max * ratio ** (i / (num_classes - 1.0))) for i in range(num_classes)]
    half = num_classes // 2
    return [int(n_max) if i < half else int(n_max * ratio) for i in range(num_classes)]


def lt_subsample_indices(labels: np.ndarray | Sequence[int], counts: Sequence[int], seed: int = 0) -> np.ndarray:
    """Indices of the images kept for a long-tailed split, exactly as the reference code picks them.

    ``np.random.seed(seed)`` is called once (the reference calls it with 0, which also resets
    numpy's global stream; we save and restore that state so callers are unaffected), then for
    class ``c = 0, 1, ...`` the indices of that class are shuffled with ``np.random.shuffle`` and
    the first ``counts[c]`` are kept.  The result is in that order (class by class).
    """
    labels = np.asarray(labels)
    saved = np.random.get_state()
    try:
        np.random.seed(seed)
        kept = []
        for c, n_c in enumerate(counts):
            idx = np.where(labels == c)[0]
            if n_c > len(idx):
                raise BalpoeError(f"class {c} has {len(idx)} images, the long-tailed split asks for {n_c}")
            np.random.shuffle(idx)
            kept.append(idx[:n_c])
    finally:
        np.random.set_state(saved)
    return np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)


def class_groups(class_counts: torch.Tensor | Sequence[int], many_threshold: int = 100,
                 few_threshold: int = 20, ranges: Sequence[int] | None = None) -> torch.Tensor:
    """Group of each class by its training count, as a tensor on the counts' device: 0 = many
    (> many_threshold), 1 = medium (few_threshold..many_threshold), 2 = few (< few_threshold)
    (Liu et al. 2019); or by class-index ``ranges = (a, b)`` (recipe ``data.groups: ranges``, the
    official MiSLAS ranges): the rule of :func:`~balpoe.data.groups.group_indices`."""
    counts = torch.as_tensor(class_counts)
    groups = group_indices(counts.cpu().numpy(), many_threshold, few_threshold, ranges)
    return torch.from_numpy(groups).to(counts.device)


def empty_group_hint(class_counts, many_threshold: int, few_threshold: int) -> str | None:
    """A one-line hint when the many/medium/few thresholds leave a group without classes (its
    accuracy is then NaN): which group, the training counts, and the recipe keys to set; else None."""
    counts = torch.as_tensor(class_counts)
    if not len(counts):
        return None
    present = set(class_groups(counts, many_threshold, few_threshold).tolist())
    empty = [name for g, name in enumerate(GROUP_NAMES) if g not in present]
    if not empty:
        return None
    return (f"hint: the {' and '.join(empty)} group{'s are' if len(empty) > 1 else ' is'} empty with "
            f"data.many_threshold {many_threshold} and data.few_threshold {few_threshold} (many: > many_threshold "
            f"training images, few: < few_threshold; the classes have {int(counts.min())}..{int(counts.max())}); set "
            "data.many_threshold / data.few_threshold for this dataset (e.g. --set data.many_threshold=N)")


def stratified_holdout(labels: np.ndarray | Sequence[int] | torch.Tensor, fraction: float, seed: int = 0,
                       min_per_class: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into ``(kept, held_out)`` (both sorted int64), stratified by class.

    Class ``c`` with ``n_c`` images puts ``k_c = min(max(min_per_class, floor(fraction * n_c)), n_c - 1)``
    of them in the held-out part (so at least one stays), chosen by a random permutation of the
    class's indices from ``np.random.default_rng(seed)`` (classes in increasing label order)."""
    if not 0.0 <= fraction < 1.0:
        raise BalpoeError(f"held-out fraction must be in [0, 1), got {fraction}")
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if y.ndim != 1:
        raise BalpoeError(f"labels must be 1-D, got shape {tuple(y.shape)}")
    rng = np.random.default_rng(seed)
    keep, hold = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    for c in np.unique(y):
        idx = np.where(y == c)[0]
        idx = idx[rng.permutation(len(idx))]
        k = max(0, min(max(min_per_class, int(np.floor(fraction * len(idx)))), len(idx) - 1))
        hold.append(idx[:k])
        keep.append(idx[k:])
    return np.sort(np.concatenate(keep)).astype(np.int64), np.sort(np.concatenate(hold)).astype(np.int64)
