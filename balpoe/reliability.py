"""Reliability diagrams: per-bin accuracy vs confidence (BalPoE Fig. 2 style).

Bins are those of :func:`balpoe.metrics.calibration_bins` (15 equal-width bins, (lower, upper]),
so the ECE in the title is exactly :func:`balpoe.metrics.expected_calibration_error`.  Uses
matplotlib when it is installed (optional extra ``plots``), otherwise draws with PIL.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from balpoe.errors import BalpoeError
from balpoe.metrics import _check_inputs, calibration_bins

BACKENDS = ("auto", "matplotlib", "pil")


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
    """Bin the max-softmax confidences; ECE = Sum_b |S_b|/N |acc_b - conf_b| (BalPoE notes §4)."""
    _check_inputs(logits, labels)
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
                        title: str | None = None, size: tuple[int, int] = (480, 480),
                        backend: str = "auto") -> Path:
    """Save a reliability diagram PNG of ``size`` (width, height) pixels to ``path``: bars of per-bin
    accuracy, the confidence gap, the diagonal, and "ECE = x.xx%" in the title.  Returns the path."""
    if backend not in BACKENDS:
        raise BalpoeError(f"reliability backend must be one of {BACKENDS}, got {backend!r}")
    width, height = int(size[0]), int(size[1])
    if width < 120 or height < 120:
        raise BalpoeError(f"reliability diagram size must be at least 120x120 pixels, got {size}")
    data = reliability_data(logits, labels, n_bins)
    heading = f"ECE = {data.ece:.2f}%   MCE = {data.mce:.2f}%"
    if title:
        heading = f"{title}: {heading}"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if backend in ("auto", "matplotlib"):
        try:
            _draw_matplotlib(data, path, heading, width, height)
            return path
        except ImportError:
            if backend == "matplotlib":
                raise BalpoeError("backend 'matplotlib' needs matplotlib: pip install 'balpoe[plots]'") from None
    _draw_pil(data, path, heading, width, height)
    return path


def _draw_matplotlib(data: ReliabilityData, path: Path, heading: str, width: int, height: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

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


def _draw_pil(data: ReliabilityData, path: Path, heading: str, width: int, height: int) -> None:
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img, "RGBA")
    font = ImageFont.load_default()
    left, right, top, bottom = 52, 15, 30, 40
    x0, y0, x1, y1 = left, top, width - right, height - bottom  # plot box (y grows downwards)

    def px(x: float, y: float) -> tuple[float, float]:
        return x0 + x * (x1 - x0), y1 - y * (y1 - y0)

    for frac in (0.25, 0.5, 0.75):  # light grid
        draw.line([px(frac, 0), px(frac, 1)], fill=(230, 230, 230))
        draw.line([px(0, frac), px(1, frac)], fill=(230, 230, 230))
    for b in range(len(data.count)):
        if data.count[b] == 0:
            continue
        lo, hi = data.edges[b], data.edges[b + 1]
        acc, conf = data.accuracy[b], data.confidence[b]
        xa, ya = px(lo, acc)
        xb, yb = px(hi, 0.0)
        draw.rectangle([xa, ya, xb, yb], fill=(59, 111, 182), outline=(0, 0, 0))
        _, yc = px(lo, conf)
        draw.rectangle([xa, min(ya, yc), xb, max(ya, yc)], fill=(217, 83, 79, 90), outline=(217, 83, 79))
    # dashed diagonal
    steps = 40
    for i in range(0, steps, 2):
        draw.line([px(i / steps, i / steps), px((i + 1) / steps, (i + 1) / steps)], fill=(110, 110, 110), width=2)
    draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    for frac in (0.0, 0.5, 1.0):
        label = f"{frac:.1f}"
        x, y = px(frac, 0)
        draw.line([(x, y1), (x, y1 + 4)], fill=(0, 0, 0))
        draw.text((x - 8, y1 + 6), label, fill=(0, 0, 0), font=font)
        x, y = px(0, frac)
        draw.line([(x0 - 4, y), (x0, y)], fill=(0, 0, 0))
        draw.text((x0 - 28, y - 6), label, fill=(0, 0, 0), font=font)
    draw.text(((x0 + x1) / 2 - 28, height - 18), "confidence", fill=(0, 0, 0), font=font)
    label = Image.new("RGB", (70, 14), "white")
    ImageDraw.Draw(label).text((2, 0), "accuracy", fill=(0, 0, 0), font=font)
    label = label.rotate(90, expand=True)
    img.paste(label, (2, int((y0 + y1) / 2 - label.height / 2)))
    draw.text((left, 6), heading, fill=(0, 0, 0), font=font)
    img.save(path, format="PNG")
