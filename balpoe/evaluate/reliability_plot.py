"""Drawing a reliability diagram (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017):
the one drawer of the standalone PNG (:func:`~balpoe.evaluate.reliability.reliability_diagram`),
TensorBoard and the run report's panels.  matplotlib only (no torch): the report draws the bins
``eval.json`` holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


@dataclass
class ReliabilityData:
    """Per-bin statistics (lists of length n_bins; accuracy/confidence are None for empty bins)."""

    edges: list[float]
    count: list[int]
    accuracy: list[float | None]
    confidence: list[float | None]
    ece: float  # percent
    mce: float  # percent


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
