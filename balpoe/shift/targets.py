"""Target label distributions as index sets into the balanced test set.

Protocol distributions (forward50 .. uniform .. backward50, SADE, Zhang et al. NeurIPS 2022) are
picked exactly as the reference code (:func:`~balpoe.shift.distributions.protocol_subset_indices`);
a user prior q gets the largest subset whose class counts follow q
(:func:`~balpoe.shift.distributions.prior_subset_indices`); a published test-distribution list
file (``path label`` lines, e.g. the ImageNet-LT / iNaturalist forward and backward test lists)
names its subset image by image (:func:`list_target_sets`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Iterable, Sequence

import torch

from balpoe.data.image_list import match_image_list
from balpoe.errors import BalpoeError
from balpoe.shift.distributions import (TEST_DISTRIBUTIONS, normalize_prior, dirichlet_prior, distribution_prior,
                                        parse_distribution, prior_subset_indices, protocol_subset_indices)


def parse_test_dists(spec: str | Iterable[str] | None) -> list[str]:
    """``"all"`` -> the 11 protocol distributions; ``"forward50,uniform,backward5"`` -> those names
    (duplicates dropped, order kept; ``all`` may be mixed with names).  Unknown names raise."""
    if spec is None:
        return []
    parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec)]
    out: list[str] = []
    for p in parts:
        if not p:
            continue
        for name in (TEST_DISTRIBUTIONS if p == "all" else (p,)):
            parse_distribution(name)
            if name not in out:
                out.append(name)
    if not out:
        raise BalpoeError(f"test distributions {spec!r} name no distribution: use 'all' or e.g. forward50,uniform")
    return out


def parse_prior(spec: str, class_counts: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """A user-given target prior (float64 [C], sums to 1).

    * ``"w1,w2,...,wC"``: non-negative class weights, one per class (label order), normalised;
    * ``"dirichlet:<profile>:<concentration>:<seed>"``: ``q ~ Dir(concentration * p)`` where ``p``
      is the prior of a named distribution (``forward10``, ``uniform``, ``backward10``, ...) under
      these training class counts (:func:`~balpoe.shift.distributions.dirichlet_prior`).
    """
    num_classes = len(class_counts)
    spec = str(spec).strip()
    if spec.startswith("dirichlet"):
        parts = spec.split(":")
        if len(parts) != 4:
            raise BalpoeError(f"prior {spec!r}: expected dirichlet:<profile>:<concentration>:<seed>, "
                              "e.g. dirichlet:forward10:100:0")
        _, profile, conc, seed = parts
        parse_distribution(profile)
        try:
            conc_f, seed_i = float(conc), int(seed)
        except ValueError:
            raise BalpoeError(f"prior {spec!r}: concentration must be a number and seed an integer") from None
        if not 0 <= seed_i < 2 ** 32:
            raise BalpoeError(f"prior {spec!r}: the seed must be an integer in [0, 2**32), got {seed_i}")
        if not math.isfinite(conc_f) or conc_f <= 0:
            raise BalpoeError(f"prior {spec!r}: Dirichlet concentration must be > 0 and finite, got {conc}")
        return dirichlet_prior(distribution_prior(profile, class_counts), conc_f, seed_i)
    try:
        weights = [float(w) for w in spec.split(",")]
    except ValueError:
        raise BalpoeError(f"prior {spec!r}: expected comma-separated class weights or "
                          "dirichlet:<profile>:<concentration>:<seed>") from None
    return normalize_prior(weights, num_classes, what=f"prior {spec!r}")


def prior_names(specs: Sequence[str]) -> list[str]:
    """Row names of user priors: the spec itself for ``dirichlet:...``, ``custom`` (``custom2``, ...)
    for weight lists."""
    names, k = [], 0
    for s in specs:
        if str(s).strip().startswith("dirichlet"):
            names.append(str(s).strip())
        else:
            k += 1
            names.append("custom" if k == 1 else f"custom{k}")
    return names


def file_tag(name: str) -> str:
    """A file-name-safe form of a distribution name (``dirichlet:forward10:100:0`` -> ``dirichlet-forward10-100-0``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


@dataclasses.dataclass
class TargetSet:
    """One target distribution: indices into the balanced test set and, for user priors, the prior."""
    name: str
    indices: torch.LongTensor
    kind: str                        # "protocol", "prior" or "list"
    prior: torch.Tensor | None = None
    file: str | None = None          # the list file of a "list" target set


def target_sets(labels: torch.Tensor, class_counts: Sequence[int] | torch.Tensor, dists: Sequence[str],
                priors: dict[str, torch.Tensor] | None = None, seed: int = 0) -> dict[str, TargetSet]:
    """Index sets of the named protocol distributions (numpy legacy seed 0, as the reference) and of
    user priors (:func:`~balpoe.shift.distributions.prior_subset_indices` with ``seed``: the largest
    subset that follows q)."""
    out = {n: TargetSet(n, protocol_subset_indices(labels, class_counts, n), "protocol") for n in dists}
    for name, q in (priors or {}).items():
        out[name] = TargetSet(name, prior_subset_indices(labels, q, seed=seed), "prior", q)
    return out


def list_name(path: str | Path) -> str:
    """The name of a test-distribution list file: its stem (``ImageNet_LT_forward50.txt`` ->
    ``ImageNet_LT_forward50``)."""
    return Path(path).stem


def list_target_sets(test, lists: Sequence[str | Path], taken: Iterable[str] = ()) -> dict[str, TargetSet]:
    """Index sets of test-distribution list files into the test split ``test`` (an image-file
    dataset: ``paths``, ``labels``, ``root``), each named by its file stem
    (:func:`~balpoe.data.image_list.match_image_list`: an image not in the test split is a one-line
    error naming it).  Two lists with one name, or a name in ``taken`` (other target sets), are
    refused."""
    if not lists:
        return {}
    if not hasattr(test, "paths"):
        raise BalpoeError("test-distribution list files name image files, but this dataset is held in memory (no "
                          "image paths): use the generated test distributions or user priors")
    out: dict[str, TargetSet] = {}
    taken = set(taken)
    for f in lists:
        name = list_name(f)
        if name in out or name in taken:
            other = out[name].file if name in out else "another target set"
            raise BalpoeError(f"test list {f} is named {name!r} (its file stem), as {other}: rename one of them")
        labels = test.labels.cpu().numpy() if isinstance(test.labels, torch.Tensor) else test.labels
        idx = match_image_list(f, test.paths, labels, getattr(test, "root", None))
        out[name] = TargetSet(name, torch.from_numpy(idx), "list", file=str(f))
    return out
