"""Reports from cached logits: the headline metrics of the ensemble and of each expert, as a dict
and as a rich table."""

from __future__ import annotations

import torch

from balpoe.evaluate.metrics import accuracy, classification_report
from balpoe.models.multi_expert import MultiExpertNet
from balpoe.runtime.console import console, metrics_table

REPORT_COLUMNS = ["n", "acc", "many", "medium", "few", "ece", "mce", "nll", "brier"]


def report_from_logits(expert_logits: torch.Tensor, labels: torch.Tensor, class_counts: torch.Tensor,
                       many_threshold: int = 100, few_threshold: int = 20) -> dict:
    """Ensemble metrics (:func:`~balpoe.evaluate.metrics.classification_report` of the mean
    expert logits) plus each expert's top-1 accuracy (``expert_acc``)."""
    report = classification_report(MultiExpertNet.ensemble(expert_logits), labels, class_counts, many_threshold,
                                   few_threshold)
    report["expert_acc"] = [accuracy(e, labels) for e in expert_logits]
    return report


def print_report(report: dict, title: str) -> None:
    """The report as a rich table on the console (plus the experts' top-1 when E > 1)."""
    console.print(metrics_table(title, {"ensemble": report}, REPORT_COLUMNS))
    if len(report.get("expert_acc", [])) > 1:
        console.print("expert top-1: " + ", ".join(f"{a:.2f}" for a in report["expert_acc"]))
