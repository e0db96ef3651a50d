"""The comparison's numbers: each run's metrics from its result files, then per method the mean and
standard deviation over seeds and, against a baseline, the paired difference and its standard error.

Runs of two methods with the same seed are paired (same seed: the same long-tailed subset, the same
initialisation stream where the backbones match); the difference of method A and baseline B is
``d_s = A_s - B_s`` over the seeds ``s`` both have, reported as ``mean(d)`` with standard error
``std(d) / sqrt(n)`` (``std`` with ``n - 1``; undefined for one seed).  Pairing removes the
seed-to-seed variance the two runs share, so a difference can be clear where the two ``± std``
ranges overlap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Metric:
    """A column of the comparison: its label, whether higher is better, decimals shown."""
    label: str
    higher_is_better: bool = True
    digits: int = 2


#: the balanced test set's metrics (``eval.json``), in table order
TEST_METRICS: dict[str, Metric] = {
    "bal_acc": Metric("balanced acc"),
    "many": Metric("many"),
    "medium": Metric("medium"),
    "few": Metric("few"),
    "ece": Metric("ECE", higher_is_better=False),
    "nll": Metric("NLL", higher_is_better=False, digits=3),
}


def shift_metric(mode: str) -> tuple[str, Metric]:
    """The column of adaptation mode ``mode``: the mean accuracy over the test label distributions
    (``shift acc (MODE)``)."""
    return f"shift_{mode}", Metric(f"shift acc ({mode})")


def metric_columns(adapt_modes: list[str]) -> dict[str, Metric]:
    """Every column of a comparison evaluated with ``adapt_modes``."""
    return {**TEST_METRICS, **dict(shift_metric(m) for m in adapt_modes)}


def _finite(values) -> np.ndarray:
    a = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
    return a[np.isfinite(a)]


def balanced_accuracy(per_class_acc: list) -> float | None:
    """The mean of the per-class accuracies of the classes present in the test set (a class absent
    from it is NaN / null in ``eval.json``): on a balanced test set, the top-1 accuracy."""
    a = _finite(per_class_acc)
    return float(a.mean()) if a.size else None


def run_metrics(eval_report: dict, shift_reports: dict[str, dict]) -> dict[str, float | None]:
    """One run's row: the balanced test set's metrics from its ``eval.json`` dict and, per mode,
    the mean accuracy over the distributions of its ``shift_eval.json`` dict."""
    analysis = eval_report.get("analysis") or {}
    per_class = (analysis.get("per_class_acc") or {}).get("ensemble")
    row: dict[str, float | None] = {
        "bal_acc": balanced_accuracy(per_class) if per_class is not None else eval_report.get("acc"),
        **{k: eval_report.get(k) for k in ("many", "medium", "few", "ece", "nll")}}
    for mode, rep in shift_reports.items():
        accs = _finite(r.get("acc") for r in rep["distributions"].values())
        row[shift_metric(mode)[0]] = float(accs.mean()) if accs.size else None
    return {k: (None if v is None or not math.isfinite(v) else float(v)) for k, v in row.items()}


def mean_std(values: list[float | None]) -> dict:
    """``{"mean", "std", "n"}`` of the finite values (std with n - 1; None below two values)."""
    a = _finite(values)
    return {"mean": float(a.mean()) if a.size else None,
            "std": float(a.std(ddof=1)) if a.size > 1 else None, "n": int(a.size)}


def paired_difference(a: dict[int, float | None], b: dict[int, float | None]) -> dict:
    """``{"diff", "se", "n"}``: the mean over the seeds both runs have (finite values) of
    ``a[s] - b[s]``, its standard error ``std(d, ddof=1) / sqrt(n)`` (None below two seeds)."""
    d = _finite(a[s] - b[s] for s in a if s in b and a[s] is not None and b[s] is not None)
    return {"diff": float(d.mean()) if d.size else None,
            "se": float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else None, "n": int(d.size)}


def summarise(runs: dict[str, dict[int, dict[str, float | None]]], columns: list[str],
              baseline: str | None) -> dict:
    """``runs``: method -> seed -> the run's metrics (:func:`run_metrics`).  Returns ``{"summary":
    method -> column -> mean_std, "paired": method -> column -> paired_difference}`` (``paired``
    empty without a baseline; the baseline's own row is omitted)."""
    summary = {name: {c: {**mean_std([r.get(c) for r in seeds.values()]),
                          "values": {str(s): r.get(c) for s, r in seeds.items()}} for c in columns}
               for name, seeds in runs.items()}
    paired: dict = {}
    if baseline is not None and baseline in runs:
        base = runs[baseline]
        for name, seeds in runs.items():
            if name != baseline:
                paired[name] = {c: paired_difference({s: r.get(c) for s, r in seeds.items()},
                                                     {s: r.get(c) for s, r in base.items()}) for c in columns}
    return {"summary": summary, "paired": paired}


def cell(stat: dict, digits: int) -> str:
    """``mean±std`` (``mean`` alone for one seed, ``–`` for none)."""
    if stat.get("mean") is None:
        return "–"
    text = f"{stat['mean']:.{digits}f}"
    return text + (f"±{stat['std']:.{digits}f}" if stat.get("std") is not None else "")


def diff_cell(stat: dict, digits: int) -> str:
    """``+d±se`` (the sign always shown; ``–`` without a pair)."""
    if stat.get("diff") is None:
        return "–"
    text = f"{stat['diff']:+.{digits}f}"
    return text + (f"±{stat['se']:.{digits}f}" if stat.get("se") is not None else "")
