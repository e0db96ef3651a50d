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


#: gap colours: confidence above accuracy (over-confident) and below it (under-confident)
OVER_COLOUR, UNDER_COLOUR = "#d9534f", "#2ca02c"


def reliability_axes(ax, data: ReliabilityData, heading: str, *, legend: bool = True) -> None:
    """Draw the diagram of ``data`` on the matplotlib axes ``ax``, titled ``heading``: per-bin accuracy
    bars, the gap to the bin's mean confidence in one colour where the model is over-confident and
    another where it is under-confident (both in the legend, also when one does not occur), each
    non-empty bin's image count above it, the diagonal of perfect calibration (Guo et al. 2017)."""
    lefts = data.edges[:-1]
    w = [b - a for a, b in zip(lefts, data.edges[1:])]
    acc = [a if a is not None else 0.0 for a in data.accuracy]
    conf = [c if c is not None else 0.0 for c in data.confidence]
    handles = [ax.bar(lefts, acc, width=w, align="edge", color="#3b6fb6", edgecolor="black", linewidth=0.6,
                      label="accuracy")]
    handles.append(ax.bar(lefts, [max(c - a, 0.0) for a, c in zip(acc, conf)], bottom=acc, width=w, align="edge",
                          color=OVER_COLOUR, alpha=0.35, edgecolor=OVER_COLOUR, linewidth=0.6,
                          label="gap: over-confident"))
    handles.append(ax.bar(lefts, [max(a - c, 0.0) for a, c in zip(acc, conf)], bottom=conf, width=w, align="edge",
                          color=UNDER_COLOUR, alpha=0.35, edgecolor=UNDER_COLOUR, linewidth=0.6, hatch="//",
                          label="gap: under-confident"))
    for left, width, n, a, c in zip(lefts, w, data.count, acc, conf):
        if n:
            ax.text(left + width / 2, min(max(a, c), 1.0) + 0.01, f"{n:,}", ha="center", va="bottom", fontsize=6,
                    rotation=90, color="#333333")
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1)
    handles += ax.plot([], [], linestyle="none", label="numbers: images per bin")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.12)
    ax.set_xlabel("confidence", fontsize=9)
    ax.set_ylabel("accuracy", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.set_title(heading, fontsize=9)
    if legend:
        ax.legend(handles=handles, loc="upper left", fontsize=7)


def reliability_figure(data: ReliabilityData, heading: str, width: int, height: int) -> Figure:
    """The diagram of ``data`` (:func:`reliability_axes`) on a figure of ``width`` x ``height`` pixels."""
    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    reliability_axes(fig.add_subplot(1, 1, 1), data, heading)
    fig.tight_layout()
    return fig


def draw_reliability(data: ReliabilityData, path, heading: str, width: int, height: int) -> None:
    """Draw ``data`` (:func:`reliability_figure`) as a PNG of ``width`` x ``height`` pixels with the title
    ``heading``, to a path or a binary file object."""
    reliability_figure(data, heading, width, height).savefig(path, dpi=100, format="png")
