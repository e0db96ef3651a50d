"""Reports from cached logits: the headline metrics of the ensemble and of each expert (a dict and a
rich table), and the analysis the run report draws (per class, per expert, confusion, reliability)."""

from __future__ import annotations

import dataclasses

import torch

from balpoe.data.lt import class_groups
from balpoe.evaluate.metrics import accuracy, classification_report, group_accuracies
from balpoe.evaluate.reliability import reliability_data
from balpoe.models.multi_expert import MultiExpertNet
from balpoe.runtime.console import console, metrics_table

REPORT_COLUMNS = ["n", "acc", "many", "medium", "few", "ece", "mce", "nll", "brier"]


def report_from_logits(expert_logits: torch.Tensor, labels: torch.Tensor, class_counts: torch.Tensor,
                       many_threshold: int = 100, few_threshold: int = 20, group_ranges=None) -> dict:
    """Ensemble metrics (:func:`~balpoe.evaluate.metrics.classification_report` of the mean
    expert logits) plus each expert's top-1 accuracy (``expert_acc``)."""
    report = classification_report(MultiExpertNet.ensemble(expert_logits), labels, class_counts, many_threshold,
                                   few_threshold, group_ranges=group_ranges)
    report["expert_acc"] = [accuracy(e, labels) for e in expert_logits]
    return report


def print_report(report: dict, title: str) -> None:
    """The report as a rich table on the console (plus the experts' top-1 when E > 1)."""
    console.print(metrics_table(title, {"ensemble": report}, REPORT_COLUMNS))
    if len(report.get("expert_acc", [])) > 1:
        console.print("expert top-1: " + ", ".join(f"{a:.2f}" for a in report["expert_acc"]))


def per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float]:
    """Top-1 accuracy (%) of each class (NaN for a class absent from ``labels``)."""
    correct = (logits.argmax(-1) == labels).double()
    n = torch.bincount(labels, minlength=num_classes).double()
    hits = torch.bincount(labels, weights=correct, minlength=num_classes)
    return [float(h / c * 100.0) if c > 0 else float("nan") for h, c in zip(hits, n)]


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[list[int]]:
    """Counts ``[C, C]``: row = true class, column = predicted class."""
    idx = labels * num_classes + logits.argmax(-1)
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes).tolist()


#: classes up to which the analysis holds the dense confusion matrix (``confusion``); beyond, its
#: nonzero cells (``confusion_entries``): at iNaturalist's 8,142 classes the dense matrix has 66 million
#: cells (hundreds of MB of JSON) for about 24,000 test images
DENSE_CONFUSION_CLASSES = 1000


def confusion_entries(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[list[int]]:
    """The nonzero cells of the confusion matrix as ``[true, predicted, count]``, sorted by true
    then predicted class (at most one per test image, whatever the number of classes)."""
    idx = labels.long() * num_classes + logits.argmax(-1)
    cells, counts = torch.unique(idx, return_counts=True)
    return [[int(c) // num_classes, int(c) % num_classes, int(n)] for c, n in zip(cells.tolist(), counts.tolist())]


def analysis_from_logits(expert_logits: torch.Tensor, labels: torch.Tensor, class_counts, class_names: list[str], *,
                         many_threshold: int, few_threshold: int, taus: list[float] | None = None,
                         calibrated: dict[str, tuple[torch.Tensor, float]] | None = None, group_ranges=None) -> dict:
    """What the run report shows, from cached logits: per-class and many/medium/few accuracy of the
    ensemble and of each expert, the confusion matrix (dense up to :data:`DENSE_CONFUSION_CLASSES`
    classes, else ``confusion_entries``: its nonzero cells), and reliability bins (Guo et al. 2017) of the
    ensemble and of each post-hoc calibrated version in ``calibrated`` (name -> (logits, T))."""
    num_classes = expert_logits.shape[-1]
    ens = MultiExpertNet.ensemble(expert_logits)
    groups = class_groups(class_counts, many_threshold, few_threshold, group_ranges)
    reliability = {"none": dataclasses.asdict(reliability_data(ens, labels))}
    for name, (logits, temperature) in (calibrated or {}).items():
        reliability[name] = {**dataclasses.asdict(reliability_data(logits, labels)), "temperature": temperature}
    return {
        "class_names": list(class_names), "class_counts": [int(c) for c in class_counts],
        "many_threshold": many_threshold, "few_threshold": few_threshold,
        "group_ranges": None if group_ranges is None else [int(v) for v in group_ranges],
        "class_group": groups.tolist(),
        "taus": None if taus is None else [float(t) for t in taus],
        "per_class_acc": {"ensemble": per_class_accuracy(ens, labels, num_classes),
                          "experts": [per_class_accuracy(e, labels, num_classes) for e in expert_logits]},
        "group_acc": {"ensemble": group_accuracies(ens, labels, groups),
                      "experts": [group_accuracies(e, labels, groups) for e in expert_logits]},
        "confusion": confusion_matrix(ens, labels, num_classes) if num_classes <= DENSE_CONFUSION_CLASSES else None,
        **({} if num_classes <= DENSE_CONFUSION_CLASSES else
           {"confusion_entries": confusion_entries(ens, labels, num_classes)}),
        "reliability": reliability,
    }
