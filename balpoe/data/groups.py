"""Many / medium / few class groups (Liu et al., "Large-Scale Long-Tailed Recognition in an Open
World", CVPR 2019), in numpy: the rule :func:`~balpoe.data.lt.class_groups` applies to tensors, and
the run report to an ``eval.json`` written before each class's group was saved (without torch)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from balpoe.errors import BalpoeError

GROUP_NAMES = ("many", "medium", "few")


def group_indices(class_counts: Sequence[float] | np.ndarray, many_threshold: float = 100, few_threshold: float = 20,
                  ranges: Sequence[int] | None = None) -> np.ndarray:
    """Group of each class (int64): 0 = many (> many_threshold training images), 1 = medium
    (few_threshold..many_threshold), 2 = few (< few_threshold); a missing (NaN) count is medium.

    With ``ranges = (a, b)`` (recipe ``data.groups: ranges``) the groups are class-index ranges
    instead, as the official MiSLAS code's ``head_class_idx`` / ``med_class_idx`` /
    ``tail_class_idx``: many = labels ``[0, a)``, medium = ``[a, b)``, few = ``[b, C)``, whatever
    the counts (for the exponential CIFAR-LT profile the labels are in decreasing count order)."""
    counts = np.asarray(class_counts).reshape(-1)
    groups = np.ones(len(counts), dtype=np.int64)
    if ranges is not None:
        a, b = (int(v) for v in ranges)
        if not 0 <= a <= b <= len(counts):
            raise BalpoeError(f"recipe key 'data.group_ranges' {[a, b]} must satisfy 0 <= a <= b <= the number of "
                              f"classes ({len(counts)})")
        groups[:a], groups[b:] = 0, 2
        return groups
    groups[counts > many_threshold] = 0
    groups[counts < few_threshold] = 2
    return groups
