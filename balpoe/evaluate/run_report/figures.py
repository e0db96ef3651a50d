"""The run report's figures, drawn with matplotlib's object API on the Agg canvas (no pyplot
state) from the numbers of :func:`~balpoe.evaluate.run_report.sections.report_sections`; each is a PNG.

At many classes (ImageNet-LT, iNaturalist 2018's 8,142) the per-class figure shows dots and a moving
average and the training counts as one outline, and the confusion matrix blocks of classes with a
square-root colour scale.
"""

from __future__ import annotations

import io
import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize, PowerNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from balpoe.data.groups import GROUP_NAMES
from balpoe.evaluate.reliability_plot import ReliabilityData, reliability_axes

DPI = 100
MAX_BARS = 1000  # more classes: the training counts are drawn as one filled outline, not a bar per class
_EXPERT_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                   "#bcbd22", "#7f7f7f")
_ENSEMBLE_COLOUR = "#111111"


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None}, facecolor="white")
    return buf.getvalue()


def tex(text: str) -> str:
    """Text for matplotlib with '$' shown literally (no mathtext)."""
    return str(text).replace("$", r"\$")


def tau_label(k: int, taus: list | None) -> str:
    tau = taus[k] if taus and k < len(taus) else None
    return f"expert {k + 1} (τ = {tau:g})" if tau is not None else f"expert {k + 1}"


def _nan(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _none(values) -> list[float | None]:
    """NaN (an empty bin) as None."""
    return [None if v is None or math.isnan(v) else v for v in values]


def classes_text(n: int) -> str:
    return f"{n} class" if n == 1 else f"{n} classes"


def training_figure(tr: dict) -> bytes:
    """Loss, learning rate and throughput per epoch (and test accuracy / ECE when logged)."""
    panels = [("loss", "training loss", None), ("lr", "learning rate", None),
              ("img_per_s", "throughput (images / s)", None)]
    for key, title in (("test_acc", "test balanced accuracy (%)"), ("test_ece", "test ECE (%)")):
        if any(v is not None for v in tr[key]):
            panels.append((key, title, None))
    n = len(panels)
    rows, cols = (1, n) if n <= 3 else (2, math.ceil(n / 2))
    fig = _figure(11, 3.3 * rows)
    x = np.array(tr["epoch"], dtype=float)
    many_epochs = len(x) > 40
    for i, (key, title, _) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        y = _nan(tr[key])
        ok = ~np.isnan(y)
        ax.plot(x[ok], y[ok], color="#1f77b4", lw=1.6, marker=None if many_epochs else "o", ms=3.5)
        if key == "lr":
            pos = y[ok & (y > 0)]
            if len(pos) and pos.max() / pos.min() >= 10 and pos.size == ok.sum():
                ax.set_yscale("log")
        if tr["boundary"] is not None:
            ax.axvline(tr["boundary"], color="#888888", ls="--", lw=1)
            ax.text(tr["boundary"], 0.97, " stage 2", transform=ax.get_xaxis_transform(), ha="left", va="top",
                    fontsize=9, color="#444444")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch (stage 1, then stage 2)" if tr["boundary"] is not None else "epoch", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.set_xlim(0.5 - 0.02 * len(x), len(x) + 0.5 + 0.02 * len(x))  # the same epochs in every panel
    return _png(fig)


def smoothing_window(n_classes: int) -> int | None:
    """Classes per moving-average window of the per-class figure (None: every class drawn as is)."""
    return None if n_classes <= 30 else max(5, int(round(n_classes / 20)) | 1)


def per_class_figure(pc: dict) -> bytes:
    """Per-class test accuracy of the ensemble and of each expert, classes sorted by training count
    (grey bars, log scale on the right axis), with the many/medium/few boundaries; for more than 30
    classes, dots for single classes and lines for a moving average over :func:`smoothing_window`."""
    c = len(pc["order"])
    x = np.arange(c)
    counts = np.array(pc["counts"], dtype=float)
    fig = _figure(11, 4.8)
    ax = fig.add_subplot()
    ax2 = ax.twinx()
    pos = counts[counts > 0]
    log = len(pos) and pos.max() / pos.min() >= 10
    if c <= MAX_BARS:
        ax2.bar(x, counts, width=0.8 if c <= 100 else 1.0, color="#d5d9de", linewidth=0, label="training images")
    else:  # one patch instead of one per class
        ax2.stairs(counts, np.arange(c + 1) - 0.5, baseline=pos.min() / 2 if log else 0, fill=True, color="#d5d9de",
                   linewidth=0, label="training images")
    if log:
        ax2.set_yscale("log")
        ax2.set_ylim(pos.min() / 2, pos.max() * 3)  # bars stay below the group names
    else:
        ax2.set_ylim(0, max(1.0, counts.max() * 1.15))
    ax2.set_ylabel("training images (grey bars)", fontsize=9, color="#5b6670")
    ax2.tick_params(labelsize=8, colors="#5b6670")
    ax.set_zorder(ax2.get_zorder() + 1)
    ax.patch.set_visible(False)

    window = smoothing_window(c)
    smooth = window is not None

    def draw(values, colour, label, lw, marker):
        y = np.array(values, dtype=float)
        if not smooth:
            ax.plot(x, y, color=colour, lw=lw, marker=marker, ms=5 if marker == "s" else 4, label=label)
            return
        ax.plot(x, y, ls="none", marker=".", ms=2.5, color=colour, alpha=0.35)
        ok = ~np.isnan(y)
        kernel = np.ones(window)
        num = np.convolve(np.where(ok, y, 0.0), kernel, mode="same")
        den = np.convolve(ok.astype(float), kernel, mode="same")
        ax.plot(x, np.divide(num, den, out=np.full(c, np.nan), where=den > 0), color=colour, lw=lw, label=label)

    for k, values in enumerate(pc["experts"]):
        draw(values, _EXPERT_COLOURS[k % len(_EXPERT_COLOURS)], tau_label(k, pc["taus"]), 1.3, "o")
    draw(pc["ensemble"], _ENSEMBLE_COLOUR, "ensemble", 2.6, "s")

    bounds = []
    if pc["n_many"] is not None and 0 < pc["n_many"] < c:
        bounds.append(pc["n_many"] - 0.5)
    if pc["n_few"] is not None and 0 < pc["n_few"] < c and c - pc["n_few"] > (pc["n_many"] or 0):
        bounds.append(c - pc["n_few"] - 0.5)
    for b in bounds:
        ax.axvline(b, color="#555555", ls="--", lw=1.1)
    edges = [-0.5, *bounds, c - 0.5]
    n_many, n_few = pc["n_many"] or 0, pc["n_few"] or 0
    names = [g for g, n in zip(GROUP_NAMES, (n_many, c - n_many - n_few, n_few)) if n > 0]
    if len(names) == len(edges) - 1:
        for g, lo, hi in zip(names, edges[:-1], edges[1:]):
            ax.text((lo + hi) / 2, 0.965, g, transform=ax.get_xaxis_transform(), ha="center", va="top",
                    fontsize=10, fontweight="bold", color="#333333")
    ax.set_ylim(0, 112)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("test accuracy (%)", fontsize=9)
    ax.set_xlim(-0.6, c - 0.4)
    ax.grid(axis="y", alpha=0.3)
    ax.tick_params(labelsize=8)
    if c <= 30:
        ax.set_xticks(x)
        fits = max(len(n) for n in pc["names"]) * 7 < 1000 / c  # ~7 px per character at 9 pt
        ax.set_xticklabels([tex(n) for n in pc["names"]], rotation=0 if fits else 30,
                           ha="center" if fits else "right", rotation_mode="anchor", fontsize=9 if c <= 15 else 7.5)
        ax.set_xlabel("class (most frequent first)", fontsize=9)
    else:
        ax.set_xlabel("class rank by training count (0 = most frequent)", fontsize=9)
    handles, labels = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    fig.legend(handles + h2, labels + l2, loc="outside upper center", ncol=min(len(labels) + 1, 5), fontsize=9,
               frameon=False)
    return _png(fig)


def groups_figure(groups: dict) -> bytes:
    """Grouped bars: many / medium / few / all accuracy of the ensemble and each expert."""
    cats = [*GROUP_NAMES, "all"]
    rows = groups["rows"]
    fig = _figure(11, 4.0)
    ax = fig.add_subplot()
    width = 0.8 / len(rows)
    x = np.arange(len(cats))
    order = rows[1:] + rows[:1]  # experts first, the ensemble rightmost in each group
    for i, row in enumerate(order):
        k = rows.index(row) - 1
        colour = _ENSEMBLE_COLOUR if k < 0 else _EXPERT_COLOURS[k % len(_EXPERT_COLOURS)]
        label = "ensemble" if k < 0 else tau_label(k, [r["tau"] for r in rows[1:]])
        vals = _nan([row[c] for c in cats])
        bars = ax.bar(x - 0.4 + width * (i + 0.5), np.nan_to_num(vals), width * 0.92, color=colour, label=label,
                      alpha=0.9 if k >= 0 else 1.0)
        ax.bar_label(bars, labels=["" if np.isnan(v) else f"{v:.1f}" for v in vals], fontsize=7.5, padding=1.5)
    n = groups.get("n_classes")
    ax.set_xticks(x)
    ax.set_xticklabels([f"{c}\n({classes_text(n[c])})" if n and c in n else c for c in cats],
                       fontsize=9)
    ax.set_ylim(0, 110)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("test accuracy (%)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.tick_params(axis="y", labelsize=8)
    fig.legend(loc="outside upper center", ncol=min(len(rows), 5), fontsize=9, frameon=False)
    return _png(fig)


def confusion_figure(cm: dict) -> bytes:
    """Row-normalised confusion matrix, classes in training-count order (blocks of classes when
    there are more than :data:`~balpoe.evaluate.run_report.sections.MAX_CONFUSION_CELLS`)."""
    c = len(cm["order"])
    named, numbers = c <= 50, c <= 20
    fig = _figure(*((6.8, 6.0) if c <= 10 else (8.2, 7.4) if named else (7.6, 6.6)))
    ax = fig.add_subplot()
    norm = Normalize(0, 1) if named else PowerNorm(0.5, 0, 1)
    im = ax.imshow(np.array(cm["cells"]), cmap="Blues", norm=norm, interpolation="nearest",
                   extent=(-0.5, c - 0.5, c - 0.5, -0.5))
    if numbers:
        m = np.array(cm["normalised"], dtype=float)
        counts = np.array(cm["counts"])
        size = 9 if c <= 10 else 6.5
        for i in range(c):
            for j in range(c):
                if counts[i, j] > 0:
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=size,
                            color="white" if m[i, j] > 0.55 else "#1d232a")
    if named:
        ticks = np.arange(c)
        labels = [tex(n) for n in cm["names"]]
        fs = 9 if c <= 15 else 7 if c <= 30 else 5.5
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels, rotation=45, ha="right", rotation_mode="anchor", fontsize=fs)
        ax.set_yticks(ticks)
        ax.set_yticklabels(labels, fontsize=fs)
        ax.set_xlabel("predicted class", fontsize=10)
        ax.set_ylabel("true class", fontsize=10)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("predicted class (rank by training count, most frequent left)", fontsize=10)
        ax.set_ylabel("true class (rank by training count, most frequent top)", fontsize=10)
        for b in cm["bounds"]:  # many / medium / few boundaries
            ax.axvline(b - 0.5, color="#d62728", lw=0.8, ls="--", alpha=0.7)
            ax.axhline(b - 0.5, color="#d62728", lw=0.8, ls="--", alpha=0.7)
    label = "fraction of the true class" + ("" if named else " (square-root colour scale)")
    cb = fig.colorbar(im, ax=ax, shrink=0.8)
    cb.set_label(label, fontsize=9)
    cb.ax.tick_params(labelsize=8)
    return _png(fig)


def reliability_figure(rel: dict) -> bytes:
    """One reliability diagram per calibrator (:func:`~balpoe.evaluate.reliability_plot.reliability_axes`,
    Guo et al., ICML 2017), side by side; each title names the calibrator, its temperature, ECE and MCE."""
    n = len(rel)
    fig = _figure(max(4.4, 3.65 * n), 4.1)
    for i, r in enumerate(rel.values()):
        title = r["label"]
        if r["temperature"] is not None:
            title += f", T = {r['temperature']:.2f}"
        ece = f"ECE {r['ece']:.2f}%" if r["ece"] is not None else "ECE n/a"
        mce = f", MCE {r['mce']:.2f}%" if r["mce"] is not None else ""
        data = ReliabilityData(r["edges"], [int(c) if math.isfinite(c) else 0 for c in r["count"]],
                               _none(r["accuracy"]), _none(r["confidence"]), r["ece"], r["mce"])
        reliability_axes(fig.add_subplot(1, n, i + 1), data, f"{tex(title)}\n{ece}{mce}", legend=i == 0)
    return _png(fig)


def shift_figure(sh: dict) -> bytes:
    """Accuracy on each test label distribution (categorical x, in the file's order) per mode."""
    dists = sh["distributions"]
    x = np.arange(len(dists))
    fig = _figure(11, 4.2)
    ax = fig.add_subplot()
    styles = {"none": ("#555555", "o", "--"), "known": ("#2ca02c", "^", "-"), "unlabelled": ("#1f77b4", "s", "-"),
              "labelled": ("#ff7f0e", "D", "-")}
    for i, (mode, m) in enumerate(sh["modes"].items()):
        colour, marker, ls = styles.get(mode, (_EXPERT_COLOURS[(i + 4) % len(_EXPERT_COLOURS)], "v", "-"))
        ax.plot(x, _nan(m["values"]), color=colour, marker=marker, ls=ls, lw=1.8, ms=5, label=tex(m["label"]))
    if "uniform" in dists:
        ax.axvline(dists.index("uniform"), color="#aaaaaa", ls=":", lw=1)
    ax.set_xticks(x)
    ax.set_xticklabels([tex(d) for d in dists], rotation=30 if len(dists) > 8 else 0,
                       ha="right" if len(dists) > 8 else "center", rotation_mode="anchor", fontsize=9)
    ax.set_ylabel("test accuracy (%)", fontsize=9)
    ax.set_xlabel("test label distribution (forward: like training, head-heavy; backward: tail-heavy)",
                  fontsize=9)
    ax.grid(alpha=0.3)
    ax.tick_params(axis="y", labelsize=8)
    fig.legend(loc="outside upper center", ncol=min(len(sh["modes"]), 4), fontsize=9, frameon=False)
    return _png(fig)
