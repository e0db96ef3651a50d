"""The comparison's files: ``compare.json`` (every run's metrics, the summary, the figures' numbers),
``compare.md`` (the tables), ``compare.html`` (tables and figures, self-contained), and the table on
the console.

Figures: accuracy on each test label distribution (forward50 ... uniform ... backward50) per method,
one panel per adaptation mode; accuracy of each class against its training count per method;
reliability diagrams side by side (Guo et al. 2017), the bins of all seeds pooled.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from rich.table import Table

from balpoe.compare.table import cell, diff_cell, metric_columns
from balpoe.evaluate.reliability_plot import ReliabilityData, reliability_axes
from balpoe.evaluate.run_report.figures import _figure, _nan, _png, tex
from balpoe.evaluate.run_report.page import _CSS, _e, _img, _table
from balpoe.runtime.checkpoint import atomic_write_text, write_json
from balpoe.runtime.console import console

COLOURS = ("#111111", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
           "#bcbd22", "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a")
LINESTYLES = ("-", "--", ":")   # after every colour, the next line style


def _style(i: int) -> dict:
    """Colour and line style of the ``i``-th method (distinct for up to 42 methods)."""
    return {"color": COLOURS[i % len(COLOURS)], "ls": LINESTYLES[i // len(COLOURS) % len(LINESTYLES)]}
OUTPUTS = ("compare.json", "compare.md", "compare.html")


def _mean_lists(lists: list[list]) -> list[float | None]:
    """Element-wise mean over the lists, skipping missing values (None where every list misses one)."""
    a = np.array([[np.nan if v is None else v for v in x] for x in lists], dtype=float)
    return [float(c[np.isfinite(c)].mean()) if np.isfinite(c).any() else None for c in a.T]


def pooled_reliability(bins: list[dict]) -> dict:
    """The reliability bins of several runs on the same edges as one diagram: counts added, accuracy
    and confidence count-weighted; ECE = sum_b n_b/N |acc_b - conf_b| and MCE = max_b |acc_b -
    conf_b| (in %, Guo et al. 2017) of the pooled bins."""
    counts = np.array([b["count"] for b in bins], dtype=float)
    acc = np.array([[0.0 if v is None else v for v in b["accuracy"]] for b in bins])
    conf = np.array([[0.0 if v is None else v for v in b["confidence"]] for b in bins])
    n = counts.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        a, c = (counts * acc).sum(0) / n, (counts * conf).sum(0) / n
    filled = n > 0
    gaps = np.abs(a - c)[filled]
    return {"edges": list(bins[0]["edges"]), "count": [int(v) for v in n],
            "accuracy": [float(v) if f else None for v, f in zip(a, filled)],
            "confidence": [float(v) if f else None for v, f in zip(c, filled)],
            "ece": float((n[filled] * gaps).sum() / n.sum() * 100) if n.sum() else None,
            "mce": float(gaps.max() * 100) if gaps.size else None}


def figure_data(details: dict[str, dict[int, dict]], adapt: list[str]) -> dict:
    """The numbers the figures draw, mean over each method's seeds: per mode the accuracy on each
    test distribution; per class its accuracy and training count; the pooled reliability bins."""
    curves, per_class, reliability = {}, {}, {}
    for name, seeds in details.items():
        if not seeds:
            continue
        runs = list(seeds.values())
        curves[name] = {}
        for mode in adapt:
            with_mode = [r["shift"][mode]["distributions"] for r in runs if mode in r["shift"]]
            if with_mode:
                dists = list(with_mode[0])
                curves[name][mode] = {"dists": dists, "acc": _mean_lists(
                    [[rows.get(d, {}).get("acc") for d in dists] for rows in with_mode])}
        analyses = [r["eval"].get("analysis") or {} for r in runs]
        if all("per_class_acc" in a for a in analyses):
            per_class[name] = {"class_counts": analyses[0]["class_counts"],
                               "acc": _mean_lists([a["per_class_acc"]["ensemble"] for a in analyses])}
        if all("none" in (a.get("reliability") or {}) for a in analyses):
            reliability[name] = pooled_reliability([a["reliability"]["none"] for a in analyses])
    return {"curves": curves, "per_class": per_class, "reliability": reliability}


def _legend_columns(names: list[str]) -> int:
    return min(len(names), 2 if max(map(len, names)) > 24 else 4)


def shift_figure(curves: dict, adapt: list[str]) -> bytes:
    """Accuracy against the test label distribution, one line per method, one panel per mode."""
    cols = min(len(adapt), 2)
    rows = math.ceil(len(adapt) / cols)
    fig = _figure(11 if cols == 2 else 7.5, 1.2 + 3.6 * rows)
    axes = fig.subplots(rows, cols, sharey=True, squeeze=False).ravel()
    for ax in axes[len(adapt):]:
        ax.set_visible(False)
    labelled: set[str] = set()     # each method once in the legend, from the first panel that draws it
    for ax, mode in zip(axes, adapt):
        for i, (name, c) in enumerate(curves.items()):
            if mode not in c:
                continue
            d = c[mode]
            ax.plot(np.arange(len(d["dists"])), _nan(d["acc"]), **_style(i), marker="o", ms=3.5,
                    lw=1.6, label=None if name in labelled else tex(name))
            labelled.add(name)
        dists = next((c[mode]["dists"] for c in curves.values() if mode in c), [])
        ax.set_xticks(np.arange(len(dists)))
        ax.set_xticklabels([tex(x) for x in dists], rotation=40, ha="right", rotation_mode="anchor", fontsize=8)
        if "uniform" in dists:
            ax.axvline(dists.index("uniform"), color="#aaaaaa", ls=":", lw=1)
        ax.set_title(f"adapt: {tex(mode)}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.tick_params(axis="y", labelsize=8)
    for ax in axes[::cols]:
        ax.set_ylabel("test accuracy (%)", fontsize=9)
    fig.legend(loc="outside upper center", ncol=_legend_columns(list(curves)), fontsize=8, frameon=False)
    return _png(fig)


def class_count_figure(per_class: dict) -> bytes:
    """Each class's test accuracy against its training count (log scale), one line per method."""
    fig = _figure(7.5, 4.4)
    ax = fig.add_subplot()
    for i, (name, pc) in enumerate(per_class.items()):
        order = np.argsort(pc["class_counts"], kind="stable")
        ax.plot(np.asarray(pc["class_counts"], dtype=float)[order], _nan(pc["acc"])[order],
                **_style(i), marker="o", ms=3, lw=1.4, label=tex(name))
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (log scale)", fontsize=9)
    ax.set_ylabel("test accuracy of the class (%)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.tick_params(labelsize=8)
    fig.legend(loc="outside upper center", ncol=_legend_columns(list(per_class)), fontsize=8, frameon=False)
    return _png(fig)


def reliability_grid(reliability: dict) -> bytes:
    """One reliability diagram per method (four to a row), the seeds' bins pooled."""
    n = len(reliability)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = _figure(3.4 * cols, 3.5 * rows)
    for i, (name, r) in enumerate(reliability.items()):
        data = ReliabilityData(r["edges"], r["count"], r["accuracy"], r["confidence"], r["ece"], r["mce"])
        ece = f"ECE {r['ece']:.2f}%" if r["ece"] is not None else "ECE n/a"
        reliability_axes(fig.add_subplot(rows, cols, i + 1), data, f"{tex(name)}\n{ece}", legend=i == 0)
    return _png(fig)


def _rows(result: dict, paired: bool) -> tuple[list[str], list[list[str]]]:
    """Header and text rows of the summary (``paired``: the differences against the baseline)."""
    cols = metric_columns(result["adapt"])
    head = ["method", "seeds", *(m.label for m in cols.values())]
    rows = []
    source = result["paired"] if paired else result["summary"]
    for name, stats in source.items():
        n = max((s["n"] for s in stats.values()), default=0)
        rows.append([name, str(n), *((diff_cell if paired else cell)(stats[k], m.digits) for k, m in cols.items())])
    return head, rows


def markdown(result: dict) -> str:
    """``compare.md``: the summary table and, with a baseline, the paired differences."""
    def table(head, rows):
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    seeds = ", ".join(str(s) for s in result["seeds"])
    text = [f"# Comparison of {len(result['summary'])} methods, seeds {seeds}", "",
            f"Test label distributions: {result['test_dists']}; adaptation modes: {', '.join(result['adapt'])}. "
            "Each cell: mean ± standard deviation over seeds (accuracies, ECE in %).", "",
            table(*_rows(result, paired=False))]
    if result["paired"]:
        text += ["", f"## Paired difference against {result['baseline']} (same seed): mean ± standard error", "",
                 table(*_rows(result, paired=True))]
    for name, seeds in result.get("failed", {}).items():
        text += ["", f"Failed: {name}, " + "; ".join(f"seed {s}: {e}" for s, e in seeds.items()) + " (empty cells)."]
    if not result["complete"]:
        text += ["", "Incomplete: some runs have not finished yet (run the same command again to continue)."]
    return "\n".join(text) + "\n"


def html_page(result: dict, figures: dict) -> str:
    """``compare.html``: the tables and the three figures, inline (no script, no network)."""
    seeds = ", ".join(str(s) for s in result["seeds"])
    parts = [f"<h1>Comparison of {len(result['summary'])} methods</h1>",
             f'<p class="sub">seeds {_e(seeds)}; test label distributions {_e(result["test_dists"])}; adaptation '
             f'modes {_e(", ".join(result["adapt"]))}</p>',
             "<h2>Summary</h2><p class=\"explain\">Mean ± standard deviation over seeds; accuracies and ECE in "
             "%.</p>", _table(*[[_e(h) for h in x] if i == 0 else [[_e(c) for c in r] for r in x]
                               for i, x in enumerate(_rows(result, paired=False))])]
    if result["paired"]:
        parts += [f"<h2>Against {_e(result['baseline'])}</h2><p class=\"explain\">Paired by seed: mean difference "
                  "± its standard error (positive: higher than the baseline).</p>",
                  _table(*[[_e(h) for h in x] if i == 0 else [[_e(c) for c in r] for r in x]
                           for i, x in enumerate(_rows(result, paired=True))])]
    for name, seeds in result.get("failed", {}).items():
        parts.append(f'<p class="note">Failed: {_e(name)}, ' + "; ".join(f"seed {_e(s)}: {_e(e)}" for s, e in seeds.items())
                     + " (empty cells).</p>")
    if not result["complete"]:
        parts.append('<p class="note">Incomplete: some runs have not finished yet.</p>')
    if figures["curves"]:
        parts += ["<h2>Accuracy under test label shift</h2><p class=\"explain\">forward: test labels distributed "
                  "like training (head-heavy); backward: tail-heavy; mean over seeds.</p>",
                  _img(shift_figure(figures["curves"], result["adapt"]), "accuracy per test distribution")]
    if figures["per_class"]:
        parts += ["<h2>Accuracy against training class count</h2>",
                  _img(class_count_figure(figures["per_class"]), "per-class accuracy against training count")]
    if figures["reliability"]:
        parts += ["<h2>Reliability on the balanced test set</h2><p class=\"explain\">The model's own logits; the "
                  "bins of all seeds pooled.</p>",
                  _img(reliability_grid(figures["reliability"]), "reliability diagrams")]
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>balpoe compare</title>'
            f"<style>{_CSS}</style></head><body><main>{''.join(parts)}</main></body></html>\n")


def print_table(result: dict) -> None:
    """The summary (and the paired differences) as rich tables."""
    for paired in (False, True):
        if paired and not result["paired"]:
            continue
        head, rows = _rows(result, paired)
        title = f"paired difference against {result['baseline']}" if paired else "comparison (mean ± std over seeds)"
        t = Table(title=title)
        for i, h in enumerate(head):  # narrow columns: a header word and a value's ± on lines of their own
            if i == 0:
                t.add_column(h, min_width=min(32, max(len(r[0]) for r in rows)), overflow="fold")
            else:
                t.add_column(h.replace(" (", "\n(").replace(" ", "\n", 1) if len(h) > 8 else h, justify="right",
                             no_wrap=True)
        for r in rows:
            t.add_row(r[0], *(c.replace("±", "\n±") for c in r[1:]))
        console.print(t)


def write_outputs(result: dict, details: dict, out: Path, *, final: bool) -> None:
    """``compare.json``, ``compare.md``, ``compare.html`` into ``out``; on the ``final`` call also
    the tables on the console."""
    figures = figure_data(details, result["adapt"])
    result["figures"] = figures
    write_json(result, out / "compare.json")
    atomic_write_text(markdown(result), out / "compare.md")
    atomic_write_text(html_page(result, figures), out / "compare.html")
    if final:
        print_table(result)
        console.print(f"saved {out / 'compare.json'}, {out / 'compare.md'}, {out / 'compare.html'}")
