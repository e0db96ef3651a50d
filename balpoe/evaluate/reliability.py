"""Reliability diagrams: per-bin accuracy vs confidence (Guo et al. 2017; BalPoE Fig. 2 style).

Bins are those of :func:`balpoe.evaluate.metrics.calibration_bins` (15 equal-width bins,
(lower, upper]), so the ECE in the title is exactly
:func:`balpoe.evaluate.metrics.expected_calibration_error`.  Drawn by
:func:`~balpoe.evaluate.reliability_plot.reliability_axes`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from balpoe.errors import BalpoeError
from balpoe.evaluate.metrics import calibration_bins, check_logits_labels
from balpoe.evaluate.reliability_plot import ReliabilityData, draw_reliability
from balpoe.runtime.files import atomic_write


def reliability_data(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> ReliabilityData:
    """Bin the max-softmax confidences; ECE = Sum_b |S_b|/N |acc_b - conf_b| (Guo et al. 2017)."""
    check_logits_labels(logits, labels)
    if labels.numel() == 0:
        raise BalpoeError("reliability diagram needs at least one sample")
    conf, pred = logits.double().softmax(-1).max(-1)
    count, sum_conf, sum_acc = calibration_bins(conf, pred == labels, n_bins)
    n = float(count.sum())
    acc = [float(a / c) if c > 0 else None for a, c in zip(sum_acc, count)]
    cnf = [float(s / c) if c > 0 else None for s, c in zip(sum_conf, count)]
    gaps = [abs(a - c) for a, c in zip(acc, cnf) if a is not None]
    ece = float((sum_acc - sum_conf).abs().sum()) / n * 100.0
    return ReliabilityData([b / n_bins for b in range(n_bins + 1)], [int(c) for c in count], acc, cnf,
                           ece, max(gaps) * 100.0 if gaps else 0.0)


def reliability_diagram(logits: torch.Tensor, labels: torch.Tensor, path: str | Path, n_bins: int = 15,
                        title: str | None = None, size: tuple[int, int] = (480, 480)) -> Path:
    """Save a reliability diagram PNG of ``size`` (width, height) pixels to ``path``: bars of per-bin
    accuracy, the confidence gap (over- and under-confident in two colours), each bin's image count, the
    diagonal, and "ECE = x.xx%" in the title.  Returns the path."""
    width, height = int(size[0]), int(size[1])
    if width < 120 or height < 120:
        raise BalpoeError(f"reliability diagram size must be at least 120x120 pixels, got {size}")
    data = reliability_data(logits, labels, n_bins)
    heading = f"ECE = {data.ece:.2f}%   MCE = {data.mce:.2f}%"
    if title:
        heading = f"{title}: {heading}"
    path = Path(path)
    atomic_write(path, lambda f: draw_reliability(data, f, heading, width, height))
    return path
