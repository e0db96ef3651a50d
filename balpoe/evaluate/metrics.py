"""Classification and calibration metrics computed from logits.

All functions take ensemble logits ``[N, C]`` and integer labels ``[N]`` and return Python floats.
Accuracies and calibration errors are in percent, as both papers report them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from balpoe.data.lt import GROUP_NAMES, class_groups
from balpoe.errors import BalpoeError


def check_logits_labels(logits: torch.Tensor, labels: torch.Tensor | None = None, *, num_classes: int | None = None,
                        what: str = "logits", nonempty: bool = False, finite: bool = False) -> None:
    """The one validation of logits ``[N, C]`` (and integer labels ``[N]`` in ``[0, C)``): a one-line
    :class:`BalpoeError` naming ``what`` otherwise.  ``num_classes``: C must equal it;
    ``nonempty``: N > 0; ``finite``: no NaN or inf."""
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        raise BalpoeError(f"{what} must be a tensor of shape [N, C], got "
                          f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise BalpoeError(f"{what} have {logits.shape[1]} classes, expected {num_classes}")
    if nonempty and logits.shape[0] == 0:
        raise BalpoeError(f"{what} are empty (N = 0)")
    if finite and not bool(torch.isfinite(logits).all()):
        raise BalpoeError(f"{what} contain NaN or inf")
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise BalpoeError(f"labels must be a 1-D tensor of length {logits.shape[0]}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise BalpoeError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise BalpoeError(f"labels must lie in [0, {logits.shape[1]})")


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy (%) over all samples (micro average)."""
    check_logits_labels(logits, labels)
    return (logits.argmax(-1) == labels).double().mean().item() * 100.0


def group_accuracies(logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> dict[str, float]:
    """Many/medium/few accuracy (%): the mean of per-class accuracies of the classes in each group
    (classes absent from ``labels`` are skipped; a group with no class present is NaN)."""
    check_logits_labels(logits, labels)
    num_classes = groups.numel()
    if num_classes != logits.shape[1]:
        raise BalpoeError(f"groups has {num_classes} classes, logits have {logits.shape[1]}")
    correct = (logits.argmax(-1) == labels).double()
    per_class_n = torch.bincount(labels, minlength=num_classes).double()
    per_class_correct = torch.bincount(labels, weights=correct, minlength=num_classes)
    present = per_class_n > 0
    per_class_acc = per_class_correct / per_class_n.clamp_min(1)
    out = {}
    for g, name in enumerate(GROUP_NAMES):
        sel = (groups.to(labels.device) == g) & present
        out[name] = per_class_acc[sel].mean().item() * 100.0 if sel.any() else float("nan")
    return out


def calibration_bins(confidences: torch.Tensor, correct: torch.Tensor, n_bins: int = 15
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-bin (count, summed confidence, summed correctness), float64 ``[n_bins]``.

    Equal-width bins with edges ``b / n_bins``; bin ``b`` holds confidences in
    ``(b/n_bins, (b+1)/n_bins]`` (a confidence exactly on an edge goes to the lower bin; 0 goes
    to bin 0), as in the official BalPoE evaluation (Guo et al. 2017 binning)."""
    if n_bins < 1:
        raise BalpoeError(f"n_bins must be >= 1, got {n_bins}")
    conf = confidences.double().flatten()
    correct = correct.double().flatten().to(conf.device)
    edges = torch.arange(1, n_bins, dtype=torch.float64, device=conf.device) / n_bins  # inner edges
    idx = torch.bucketize(conf, edges, right=False)  # edges[i-1] < conf <= edges[i]  ->  bin i
    count = torch.bincount(idx, minlength=n_bins).double()
    sum_conf = torch.bincount(idx, weights=conf, minlength=n_bins)
    sum_acc = torch.bincount(idx, weights=correct, minlength=n_bins)
    return count, sum_conf, sum_acc


def _confidence_bins(logits: torch.Tensor, labels: torch.Tensor, n_bins: int):
    check_logits_labels(logits, labels)
    conf, pred = logits.double().softmax(-1).max(-1)
    return calibration_bins(conf, pred == labels, n_bins)


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE (%) with ``n_bins`` equal-width confidence bins (lower, upper]:
    ECE = sum_b |S_b|/N * |acc(S_b) - conf(S_b)| (Guo et al. 2017; BalPoE reports 15 bins).  NaN for N = 0."""
    count, sum_conf, sum_acc = _confidence_bins(logits, labels, n_bins)
    return ((sum_acc - sum_conf).abs().sum() / count.sum()).item() * 100.0


def maximum_calibration_error(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """MCE (%): max over bins of |acc(S_b) - conf(S_b)| (empty bins count as 0; Guo et al. 2017)."""
    count, sum_conf, sum_acc = _confidence_bins(logits, labels, n_bins)
    gap = (sum_acc - sum_conf).abs() / count.clamp_min(1)
    return gap.max().item() * 100.0


def negative_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the true label (nats), computed in float64."""
    check_logits_labels(logits, labels)
    return F.cross_entropy(logits.double(), labels).item()


def brier_score(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Multi-class Brier score: mean over samples of sum_c (p_c - 1[y = c])^2."""
    check_logits_labels(logits, labels)
    probs = logits.double().softmax(-1)
    onehot = F.one_hot(labels, probs.shape[-1]).double()
    return ((probs - onehot) ** 2).sum(-1).mean().item()


def classification_report(logits: torch.Tensor, labels: torch.Tensor, class_counts: torch.Tensor,
                          many_threshold: int = 100, few_threshold: int = 20, n_bins: int = 15,
                          group_ranges=None) -> dict[str, float]:
    """All headline metrics for one set of logits: n, acc, many/medium/few, ECE, MCE, NLL, Brier
    (groups by training count: > many_threshold / between / < few_threshold, Liu et al. 2019; or by
    class-index ``group_ranges``, :func:`~balpoe.data.lt.class_groups`)."""
    groups = class_groups(class_counts, many_threshold, few_threshold, group_ranges)
    report = {"n": int(labels.numel()), "acc": accuracy(logits, labels)}
    report.update(group_accuracies(logits, labels, groups))
    report["ece"] = expected_calibration_error(logits, labels, n_bins)
    report["mce"] = maximum_calibration_error(logits, labels, n_bins)
    report["nll"] = negative_log_likelihood(logits, labels)
    report["brier"] = brier_score(logits, labels)
    return report
