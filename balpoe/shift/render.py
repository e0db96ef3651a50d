"""Label-shift reports: the rich table, ``shift_eval.md``, ``shift_eval.json`` and reliability diagrams."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich import box
from rich.table import Table

from balpoe.evaluate.calibration import apply_calibration
from balpoe.evaluate.reliability import reliability_diagram
from balpoe.losses.priors import balance_logits
from balpoe.models.multi_expert import MultiExpertNet
from balpoe.runtime.checkpoint import atomic_write_text, write_json
from balpoe.shift.selector import ADAPT_MODES, ESTIMATORS
from balpoe.shift.targets import TargetSet, file_tag


#: the files every label-shift evaluation writes (besides its reliability diagrams)
SHIFT_FILES = ("shift_eval.json", "shift_eval.md")


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}f}"
    if isinstance(v, list):  # the sade mode's expert weights
        return "/".join(_fmt(float(x), digits) for x in v)
    return str(v)


def _columns(report: dict, terminal: bool = False) -> list[tuple[str, str, int]]:
    """``(key, heading, decimals)`` of the table's columns.  ``terminal``: with adaptation, the
    many / medium / few columns are left to shift_eval.md and .json so that the table fits 80
    columns."""
    groups = [] if terminal and report["adapt"] != "none" else [("many", "many", 2), ("medium", "medium", 2),
                                                                  ("few", "few", 2)]
    cols = [("n", "n", 0), ("acc", "acc", 2), *groups, ("ece", "ECE", 2), ("nll", "NLL", 3)]
    if report["adapt"] != "none":
        cols += [("acc_before", "acc0", 2), ("ece_before", "ECE0", 2)]
        cols += [("weights", "weights", 2)] if report.get("sade") else \
            [("tau", "tau'", 3), ("tau_star", "tau*", 3), ("temperature", "T", 3)]
    return cols


def _mean_row(rows: dict[str, dict]) -> dict[str, float]:
    keys = ("acc", "ece", "nll", "acc_before", "ece_before")
    return {k: float(np.mean([r[k] for r in rows.values()])) for k in keys if all(k in r for r in rows.values())}


def _adapt_line(report: dict) -> str:
    a = report["adapt"]
    if a == "none":
        return "no adaptation (the model's own ensemble logits)"
    if a == "known":
        return "known prior: the oracle class frequencies of each target set (f̄ + log q)"
    if a == "unlabelled":
        cal = report["calibration"]
        src = report["source"]
        where = f"calibration {cal} on {src['n']} source images ({src['note']})" if src else "uncalibrated"
        est = ESTIMATORS[report["estimator"]].description
        return f"unlabelled, transductive on each whole target set ({est}); {where}"
    if a == "labelled":
        return (f"labelled: {report['labels_per_class']:g} labels per class on average (k*C images drawn at random "
                f"from each target set, seed {report['seed']}); metrics on the remaining images")
    if a == "sade":
        c = report["sade"]
        views = (f"pad-crop {c['padding']}" if c["padding"] else "no crop") + (" + flip" if c["flip"] else "")
        return (f"SADE test-time aggregation: expert weights learnt on each target set's unlabelled images "
                f"({c['epochs']} epochs, batch {c['batch_size']}, SGD lr {c['lr']:g}, weight decay "
                f"{c['weight_decay']:g}, {c['sgd_config']}; views {views}; seed {report['seed']})")
    return ADAPT_MODES[a].help if a in ADAPT_MODES else a


def _columns_note(report: dict) -> str:
    if report.get("sade"):
        return ("acc0 / ECE0: the same images with the model's own ensemble (equal weights); weights: the learnt "
                "expert weights")
    return ("acc0 / ECE0: the same images without adaptation; tau': the selector's tau' (1 - lambda); "
            "tau*: tau' of the KL projection of the true class frequencies on pi^lambda; T: temperature")


def print_shift_report(report: dict, console) -> None:
    cols = _columns(report, terminal=True)
    title = f"{report['recipe']} (epoch {report['epoch']}): test label distributions, adapt = {report['adapt']}"
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("distribution", style="bold", no_wrap=True)
    for _, label, _ in cols:
        table.add_column(label, justify="right")
    for name, r in report["distributions"].items():
        table.add_row(name, *[_fmt(r.get(k), d) for k, _, d in cols])
    if len(report["distributions"]) > 1:
        m = _mean_row(report["distributions"])
        table.add_row("mean", *[_fmt(m.get(k), d) if k in m else "" for k, _, d in cols], style="italic")
    console.print(table)
    console.print(_adapt_line(report))
    if report["adapt"] != "none":
        console.print(f"{_columns_note(report)}; many / medium / few of each distribution: shift_eval.md")
    derived = "derived by indexing" if not report.get("sade") else "derived by indexing (with the weights learnt)"
    console.print(f"test logits computed once: {report['n_test']} images, forward {report['forward_seconds']:.2f} s; "
                  f"all {len(report['distributions'])} distributions {derived} in {report['derive_seconds']:.2f} s")
    if report["logit_prior_exponent"]:
        console.print(f"[yellow]the model's logits carry pi_train^{report['logit_prior_exponent']:.3g}; "
                      "they are balanced before adaptation[/yellow]")
    c = report.get("post_hoc_calibration")
    if c:
        console.print(f"post-hoc calibration on {report['source']['n']} source images ({report['source']['kind']}), "
                      f"balanced test set: ECE {c['none']['ece']:.2f} -> TS (T={c['ts']['temperature']:.3f}) "
                      f"{c['ts']['ece']:.2f}, BCTS (T={c['bcts']['temperature']:.3f}) {c['bcts']['ece']:.2f}; "
                      f"NLL {c['none']['nll']:.3f} -> {c['ts']['nll']:.3f} / {c['bcts']['nll']:.3f}")


def markdown_report(report: dict) -> str:
    """The ``shift_eval.md`` text."""
    cols = _columns(report)
    lines = [f"# Test label shift: {report['recipe']} (epoch {report['epoch']})", "",
             f"* checkpoint: `{report['checkpoint']}`; {report['num_experts']} expert(s), tau "
             f"{report['taus']}; logit prior exponent lambda_m = {report['logit_prior_exponent']:.3g}",
             f"* adaptation: {_adapt_line(report)}",
             f"* balanced test set ({report['n_test']} images) forwarded once ({report['forward_seconds']:.2f} s); "
             "every distribution is an index set into those logits "
             f"(derived in {report['derive_seconds']:.2f} s)",
             "* protocol distributions: SADE/BalPoE subsets of the balanced test set (class rank by training "
             "count, numpy seed 0); user priors: the largest subset whose class counts follow the prior "
             f"(seed {report['seed']})", "",
             "| distribution | " + " | ".join(label for _, label, _ in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for name, r in report["distributions"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(r.get(k), d) for k, _, d in cols) + " |")
    if len(report["distributions"]) > 1:
        m = _mean_row(report["distributions"])
        lines.append("| *mean* | " + " | ".join(_fmt(m[k], d) if k in m else "" for k, _, d in cols) + " |")
    lines += ["", "Accuracy and group accuracies in %, ECE in % (15 bins), NLL in nats. "
              "acc0 / ECE0: the same images without adaptation. tau': the selector's choice (1 - lambda); "
              "tau*: tau' of the KL projection of the target set's class frequencies on the family "
              "pi_train^(1-tau'); T: the temperature dividing the logits."]
    if report.get("sade"):
        lines += ["", "SADE aggregation: acc0 / ECE0 are the model's own ensemble (equal expert weights); weights: "
                  "the expert weights learnt on each target set's unlabelled images (per-epoch objective and "
                  "weights in shift_eval.json)."]
    c = report.get("post_hoc_calibration")
    if c:
        lines += ["", "## Post-hoc calibration (balanced test set)", "",
                  f"Fitted by NLL on {report['source']['n']} labelled source images: {report['source']['note']}.", "",
                  "| calibrator | T | acc | ECE | MCE | NLL | Brier |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name in ("none", "ts", "bcts"):
            r = c[name]
            lines.append(f"| {name} | {_fmt(r.get('temperature'), 3)} | {r['acc']:.2f} | {r['ece']:.2f} | "
                         f"{r['mce']:.2f} | {r['nll']:.3f} | {r['brier']:.4f} |")
    if report.get("test_lists"):
        lines += ["", "## Test-distribution lists", ""]
        for n, t in report["test_lists"].items():
            lines.append(f"* {n}: `{t['file']}` ({t['n']} images of the test split)")
    if report.get("priors"):
        lines += ["", "## User priors", ""]
        for n, p in report["priors"].items():
            lines.append(f"* {n}: `{p['spec']}` -> q = [" + ", ".join(f"{x:.4f}" for x in p["prior"]) + "]")
    if report.get("files"):
        lines += ["", "Files: " + ", ".join(f"`{Path(f).name}`" for f in report["files"])]
    return "\n".join(lines) + "\n"


def plot_targets(targets: dict[str, TargetSet]) -> list[str]:
    return [n for n, t in targets.items() if n == "uniform" or t.kind in ("prior", "list")]


def write_reports(report: dict, out_dir: Path, expert_logits: torch.Tensor, labels: torch.Tensor,
                  targets: dict[str, TargetSet], class_counts, lam_model: float = 0.0,
                  adapted: dict[str, tuple] | None = None, plots: bool = True) -> list[Path]:
    """``shift_eval.json``, ``shift_eval.md`` and reliability diagrams: ``reliability_<dist>.png``
    (no adaptation) and ``reliability_<dist>_<adapt>.png`` (after adaptation) for ``uniform``, each
    user prior and each test-distribution list; ``reliability_uniform_{ts,bcts}.png`` after post-hoc
    calibration."""
    files: list[Path] = []
    if plots:
        ens = MultiExpertNet.ensemble(expert_logits)
        counts = torch.as_tensor(class_counts)
        for name in plot_targets(targets):
            idx = targets[name].indices
            files.append(reliability_diagram(ens[idx], labels[idx], out_dir / f"reliability_{file_tag(name)}.png",
                                             title=f"{name}, no adaptation"))
            if adapted and adapted.get(name) is not None:
                z, y = adapted[name]
                files.append(reliability_diagram(z, y, out_dir / f"reliability_{file_tag(name)}_{report['adapt']}.png",
                                                 title=f"{name}, {report['adapt']}"))
        c = report.get("post_hoc_calibration")
        if c and "uniform" in targets:
            bal = balance_logits(ens, counts, lam_model)
            for name in ("ts", "bcts"):
                bias = None if c[name]["bias"] is None else torch.tensor(c[name]["bias"], dtype=torch.float64)
                files.append(reliability_diagram(apply_calibration(bal.double(), c[name]["temperature"], bias), labels,
                                                 out_dir / f"reliability_uniform_{name}.png",
                                                 title=f"uniform, {name.upper()}"))
    json_path, md_path = (out_dir / name for name in SHIFT_FILES)
    files = [json_path, md_path] + files
    report["files"] = [str(f) for f in files]
    write_json(report, json_path)
    atomic_write_text(markdown_report(report), md_path)
    return files

