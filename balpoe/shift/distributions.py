"""Test label distributions: the SADE/BalPoE test-agnostic protocol and user-given target priors.

Protocol (SADE, Zhang et al. NeurIPS 2022; evaluated by BalPoE): from a balanced test set, the class of training
rank ``r`` (0 = training head) keeps ``n_r = int(n_max * (1/N) ** (r / (C-1)))`` images for
forward-N and ``int(n_max * (1/N) ** ((C-1-r) / (C-1)))`` for backward-N; ``uniform`` keeps all.
The kept images are picked exactly as the reference ``IMBALANCECIFAR100(train=False, ...)``:
numpy's legacy generator is seeded once with 0, then class by class (in rank order) that class's
indices, in test-set order, are shuffled with ``np.random.shuffle`` and the first ``n_r`` kept.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import torch

from balpoe.errors import BalpoeError

SHIFT_FACTORS = (50, 25, 10, 5, 2)
TEST_DISTRIBUTIONS = (tuple(f"forward{k}" for k in SHIFT_FACTORS) + ("uniform",)
                      + tuple(f"backward{k}" for k in reversed(SHIFT_FACTORS)))

#: the smallest prior probability whose log is taken (:func:`floored_log`)
PRIOR_FLOOR = 1e-8

_NAME = re.compile(r"^(forward|backward)(\d+(?:\.\d+)?)$")

ArrayLike = torch.Tensor | np.ndarray | Sequence[int] | Sequence[float]


def _as_numpy(x: ArrayLike, dtype=None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def parse_distribution(name: str) -> tuple[str, float]:
    """``"forward10"`` -> ``("forward", 10.0)``; ``"uniform"`` -> ``("uniform", 1.0)``.
    Any factor N >= 1 is accepted (``forward7``, ``backward2.5``)."""
    if name == "uniform":
        return "uniform", 1.0
    m = _NAME.match(str(name))
    if m is None:
        raise BalpoeError(f"unknown test distribution {name!r}: expected forwardN, backwardN (N >= 1) or uniform")
    factor = float(m.group(2))
    if factor < 1:
        raise BalpoeError(f"test distribution {name!r}: the factor N must be >= 1")
    return m.group(1), factor


def class_rank_order(class_counts: ArrayLike) -> np.ndarray:
    """Classes sorted by training count, descending and stable: ``order[r]`` is the class of rank
    ``r`` (0 = head).  The identity for CIFAR-LT (already sorted)."""
    counts = _as_numpy(class_counts, np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise BalpoeError(f"class_counts must be a non-empty 1-D vector, got shape {tuple(counts.shape)}")
    if (counts < 0).any():
        raise BalpoeError("class_counts must be non-negative")
    return np.argsort(-counts, kind="stable")


def distribution_counts(name: str, n_max: int, num_classes: int) -> list[int]:
    """Images kept per class *rank* (0 = training head) for a named distribution (SADE protocol)."""
    direction, factor = parse_distribution(name)
    if direction == "uniform" or num_classes == 1:
        return [int(n_max)] * num_classes
    ratio = 1.0 / factor
    denom = num_classes - 1.0
    if direction == "forward":
        return [int(n_max * ratio ** (r / denom)) for r in range(num_classes)]
    return [int(n_max * ratio ** ((num_classes - 1 - r) / denom)) for r in range(num_classes)]


def distribution_prior(name: str, class_counts: ArrayLike, n_max: int = 100) -> torch.Tensor:
    """Target prior q (float64 [C], label order) of a named distribution: its per-class counts
    (with ``n_max`` images per class before subsampling) normalised to sum 1."""
    order = class_rank_order(class_counts)
    per_rank = np.asarray(distribution_counts(name, n_max, len(order)), dtype=np.float64)
    q = np.empty_like(per_rank)
    q[order] = per_rank
    return torch.from_numpy(q / q.sum())


def protocol_subset_indices(labels: ArrayLike, class_counts: ArrayLike, name: str,
                            seed: int = 0) -> torch.LongTensor:
    """Indices (int64, class by class in rank order) of the test subset for ``name`` (SADE protocol).

    ``labels`` are the balanced test labels; ``n_max`` is the smallest class size of the test set
    (``len / C`` for a balanced set, as in the reference).  ``uniform`` returns ``arange(N)``.
    """
    labels = _as_numpy(labels)
    order = class_rank_order(class_counts)
    num_classes = len(order)
    if labels.ndim != 1:
        raise BalpoeError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise BalpoeError(f"labels must lie in [0, {num_classes}), class_counts has {num_classes} classes")
    direction, _ = parse_distribution(name)
    if direction == "uniform":
        return torch.arange(labels.size, dtype=torch.long)
    per_class = np.bincount(labels, minlength=num_classes)
    n_max = int(per_class.min())
    counts = distribution_counts(name, n_max, num_classes)
    saved = np.random.get_state()
    try:
        np.random.seed(seed)
        kept = []
        for rank, n_r in enumerate(counts):
            idx = np.where(labels == order[rank])[0]
            np.random.shuffle(idx)
            kept.append(idx[:n_r])
    finally:
        np.random.set_state(saved)
    return torch.from_numpy(np.concatenate(kept).astype(np.int64))


def normalize_prior(prior: ArrayLike, num_classes: int | None = None, what: str = "prior") -> torch.Tensor:
    """Class weights -> float64 probability vector ``[C]``; one-line BalpoeError naming ``what`` if
    the vector is not 1-D, has the wrong length, has negative/non-finite weights or sums to 0."""
    q = _as_numpy(prior, np.float64)
    if q.ndim != 1 or q.size == 0:
        raise BalpoeError(f"{what} must be a non-empty 1-D vector, got shape {tuple(q.shape)}")
    if num_classes is not None and q.size != num_classes:
        raise BalpoeError(f"{what} has {q.size} entries, expected one per class ({num_classes})")
    if not np.isfinite(q).all() or (q < 0).any():
        raise BalpoeError(f"{what} weights must be finite and non-negative")
    with np.errstate(over="ignore"):
        total = q.sum()
    if not np.isfinite(total):
        raise BalpoeError(f"{what} weights overflow: their sum is not a finite number (scale them down)")
    if total <= 0:
        raise BalpoeError(f"{what} weights sum to 0")
    return torch.from_numpy(q / total)


def uniform_prior(num_classes: int) -> torch.Tensor:
    """The balanced prior ``1 / C`` (float64 ``[C]``)."""
    return torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)


def floored_log(prior: torch.Tensor) -> torch.Tensor:
    """``log max(q, PRIOR_FLOOR)``: the log of a prior whose empty classes stay finite (Bayes rule
    ``f̄ + log q`` and the priors the selector adds or removes), in ``prior``'s dtype."""
    return torch.log(prior.clamp_min(PRIOR_FLOOR))


def prior_subset_indices(labels: ArrayLike, prior: ArrayLike, seed: int = 0,
                         size: int | None = None) -> torch.LongTensor:
    """Indices of a subset (drawn without replacement) whose class frequencies follow ``prior``.

    The subset has ``size`` images, or by default the largest size M = floor(min_c n_c / q_c)
    that every class can supply; per-class counts are ``q_c * M`` rounded by largest remainder
    (so they sum to M exactly).  ``prior`` holds non-negative class weights (normalised here).
    Uses its own ``np.random.default_rng(seed)``; numpy's global state is untouched.
    """
    labels = _as_numpy(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise BalpoeError("labels must be a non-empty 1-D vector")
    q = normalize_prior(prior).numpy()
    num_classes = q.size
    if labels.min() < 0 or labels.max() >= num_classes:
        raise BalpoeError(f"labels must lie in [0, {num_classes}) to match a prior of length {num_classes}")
    avail = np.bincount(labels, minlength=num_classes)
    pos = q > 0
    max_size = int(np.floor(np.min(avail[pos] / q[pos]) + 1e-9))
    if size is None:
        size = max_size
    elif size < 0 or size > max_size:
        raise BalpoeError(f"subset size {size} is not possible: at most {max_size} images follow this prior")
    exact = q * size
    counts = np.floor(exact + 1e-9).astype(np.int64)
    short = size - int(counts.sum())
    if short > 0:
        room = np.where(counts < avail, exact - counts, -np.inf)
        counts[np.argsort(-room, kind="stable")[:short]] += 1
    rng = np.random.default_rng(seed)
    kept = [rng.choice(np.where(labels == c)[0], size=int(n), replace=False) for c, n in enumerate(counts) if n > 0]
    out = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
    return torch.from_numpy(out.astype(np.int64))


def dirichlet_prior(base_prior: ArrayLike, concentration: float, seed: int = 0) -> torch.Tensor:
    """A Dirichlet perturbation of a prior profile (DirMixE protocol, Yang et al. ICML 2024):
    q ~ Dir(alpha) with alpha = base / sum(base) * concentration.  float64 [C], sums to 1.
    Classes with zero base weight get 0.  Own ``np.random.default_rng(seed)``."""
    base = normalize_prior(base_prior, what="base_prior").numpy()
    if not np.isfinite(concentration) or concentration <= 0:
        raise BalpoeError(f"Dirichlet concentration must be > 0, got {concentration}")
    alpha = base * concentration
    rng = np.random.default_rng(seed)
    g = np.zeros_like(alpha)
    pos = alpha > 0
    for _ in range(100):  # tiny alphas can underflow every gamma draw to 0; redraw then
        g[pos] = rng.gamma(alpha[pos])
        if g.sum() > 0:
            break
    else:  # pragma: no cover - only for absurdly small concentrations
        raise BalpoeError(f"Dirichlet concentration {concentration} is too small to sample")
    return torch.from_numpy(g / g.sum())
