"""Reliability diagrams: per-bin accuracy vs confidence (Guo et al. 2017; BalPoE Fig. 2 style).

Bins are those of :func:`balpoe.evaluate.metrics.calibration_bins` (15 equal-width bins,
(lower, upper]), so the ECE in the title is exactly
:func:`balpoe.evaluate.metrics.expected_calibration_error`.  Drawn with matplotlib.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from balpoe.errors import BalpoeError
from balpoe.runtime.files import atomic_write
from balpoe.evaluate.metrics import calibration_bins, check_logits_labels


@dataclass
class ReliabilityData:
    """Per-bin statistics (lists of length n_bins; accuracy/confidence are None for empty bins)."""

    edges: list[float]
    count: list[int]
    accuracy: list[float | None]
    confidence: list[float | None]
    ece: float  # percent
    mce: float  # percent


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
    accuracy, the confidence gap, the diagonal, and "ECE = x.xx%" in the title.  Returns the path."""
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


def draw_reliability(data: ReliabilityData, path, heading: str, width: int, height: int) -> None:
    """Draw ``data`` (to a path or a binary file object) as a PNG of ``width`` x ``height`` pixels with the title ``heading``."""
    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    w = data.edges[1] - data.edges[0]
    lefts = data.edges[:-1]
    acc = [a if a is not None else 0.0 for a in data.accuracy]
    conf = [c if c is not None else 0.0 for c in data.confidence]
    ax.bar(lefts, acc, width=w, align="edge", color="#3b6fb6", edgecolor="black", linewidth=0.6, label="accuracy")
    ax.bar(lefts, [c - a for a, c in zip(acc, conf)], bottom=acc, width=w, align="edge", color="#d9534f",
           alpha=0.35, edgecolor="#d9534f", linewidth=0.6, label="gap")
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(heading, fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, format="png")
