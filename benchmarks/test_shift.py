"""Test-time label shift on real Fashion-MNIST-LT (IR 100): does the tau selector close the gap?

One command trains (or reuses) two checkpoints and prints the tables in README's "Test-time label
shift" section (training about 2 minutes on 2 free CPU cores, when the checkpoints are not cached
yet; the evaluation about 1 minute, most of it the 2 x 11 separate forward passes that check the
logits-once claim, ``--no-forward-check`` skips them)::

    python benchmarks/test_shift.py            # -> runs/bench_shift/results.{json,md}

Models (``balpoe.train`` on ``recipes/balpoe/fashion_mnist_lt_ir100_cpu_demo.yaml``, both with
``data.holdout_fraction=0.1``: a stratified 10 % of the LT training split is held out as labelled
source data for calibration; cached under ``runs/bench_shift/<key>/last.pt``):

* ``balpoe``: BalPoE, 3 experts, tau 0/1/2 (the recipe as shipped);
* ``la``: a single logit-adjusted expert (E = 1, tau [1]).

Target distributions: the 11 SADE/BalPoE protocol subsets of the balanced test set (forward50 ..
uniform .. backward50) and 5 Dirichlet perturbations of protocol profiles (DirMixE-style,
concentration 100: off the pi^lambda family).  The test logits are computed once per model and
every subset is indexed from them.

Methods (rows):

* no adaptation: the balanced ensemble logits;
* oracle prior: ``f̄ + log q`` with q = the target set's class frequencies (upper bound);
* oracle scalar tau': the tau' of ``f̄ + (1 - tau') log pi`` with the best accuracy on the target
  labels (grid of step 0.01; ties -> lower NLL);
* unlabelled, transductive on each whole target set: the prior estimated by the 1-D MLE of the
  exponent lambda of pi_train^lambda (``--estimator 1d``, the CLI default) or by smoothed EM shrunk
  toward it (``--estimator em``), each without calibration (p0 uniform) and after TS / BCTS fitted
  on the held-out source slice (``TauSelector.fit_source(..., source_prior=its class frequencies)``);
* labelled, 1 and 5 labels per class on average: 10 or 50 images drawn at random from the target
  set (3 draws, mean), fitted by (1/T, tau') NLL and evaluated on the remaining images;
* for reference, what calibration alone does: BCTS (fitted on the source slice, its reference
  prior p0 removed) without adaptation, and BCTS plus the oracle prior.

Columns: top-1 per target set and the mean over the 16, ECE after adaptation (mean), |tau^ - tau*|
(mean; tau* = tau' of the KL projection of the target class frequencies on pi^lambda, so 0 for the
oracle prior by definition) and wall time (adaptation of all 16 sets, plus fitting the calibrator
once where there is one; forward passes excluded, reported separately).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from balpoe import load_recipe, train  # noqa: E402
from balpoe.checkpoint import load_checkpoint  # noqa: E402
from balpoe.console import console  # noqa: E402
from balpoe.data.build import build_loader  # noqa: E402
from balpoe.evaluate import collect_logits, load_for_eval  # noqa: E402
from balpoe.metrics import accuracy, expected_calibration_error, negative_log_likelihood  # noqa: E402
from balpoe.calibration import apply_calibration  # noqa: E402
from balpoe.selector import TauSelector, log_train_prior, trend_slope  # noqa: E402
from balpoe.shift_eval import (empirical_prior, labelled_split, logit_prior_exponent, parse_prior,  # noqa: E402
                               target_sets)
from balpoe.test_dists import TEST_DISTRIBUTIONS  # noqa: E402

RECIPE = REPO / "recipes/balpoe/fashion_mnist_lt_ir100_cpu_demo.yaml"
HOLDOUT = ["data.holdout_fraction=0.1"]
MODELS = {
    "balpoe_e3": ("BalPoE (3 experts, tau 0/1/2)", [*HOLDOUT, "name=fmnist_lt_ir100_balpoe_holdout"]),
    "la_e1": ("single logit-adjusted expert (tau 1)",
              [*HOLDOUT, "model.num_experts=1", "loss.tau=[1]", "name=fmnist_lt_ir100_la_single_holdout"]),
}
DIRICHLET = ["dirichlet:forward25:100:1", "dirichlet:forward5:100:2", "dirichlet:uniform:100:3",
             "dirichlet:backward5:100:4", "dirichlet:backward25:100:5"]
SHORT = {"forward50": "F50", "forward25": "F25", "forward10": "F10", "forward5": "F5", "forward2": "F2",
         "uniform": "U", "backward2": "B2", "backward5": "B5", "backward10": "B10", "backward25": "B25",
         "backward50": "B50", **{d: f"D{i + 1}" for i, d in enumerate(DIRICHLET)}}
METHODS = [("none", "no adaptation"), ("oracle_prior", "oracle prior (f̄ + log q)"),
           ("oracle_tau", "oracle scalar τ' (test labels)"),
           ("unlab_none_em", "unlabelled EM, uncalibrated"), ("unlab_none_1d", "unlabelled 1-D MLE, uncalibrated"),
           ("unlab_ts_em", "unlabelled EM, TS"), ("unlab_ts_1d", "unlabelled 1-D MLE, TS"),
           ("unlab_bcts_em", "unlabelled EM, BCTS"), ("unlab_bcts_1d", "**unlabelled 1-D MLE, BCTS** (CLI default)"),
           ("lab1", "labelled, 1/class"), ("lab5", "labelled, 5/class"),
           ("bcts_only", "BCTS only, no adaptation"), ("oracle_prior_bcts", "BCTS + oracle prior")]
#: TauSelector.min_samples_per_class: EM (shrunk toward the 1-D fit) on every set here (N/K >= 20), or the 1-D MLE only
ESTIMATORS = {"em": 20.0, "1d": float("inf")}
DEFAULT = "unlab_bcts_1d"
TAU_GRID = np.round(np.arange(-1.5, 3.5 + 1e-9, 0.01), 2)
LABELLED_DRAWS = 3
TIMING_REPEATS = 3


# ----------------------------------------------------------------------------- checkpoints


def checkpoint(key: str, out: Path, fresh: bool) -> tuple[Path, float | None]:
    """Train (or reuse) one model; returns its checkpoint and the training wall time (s)."""
    _, overrides = MODELS[key]
    recipe = load_recipe(RECIPE, overrides)
    run = out / key
    last = run / "last.pt"
    if last.is_file() and not fresh:
        ckpt = load_checkpoint(last)
        if ckpt["recipe"] == recipe.to_dict() and ckpt["epoch"] == recipe.optim.epochs:
            console.print(f"[dim]{key}: reusing {last}[/dim]")
            rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            return last, sum(r["epoch_time_s"] for r in rows)
        console.print(f"[yellow]{key}: {last} is from another recipe or unfinished; retraining[/yellow]")
    if run.exists():
        shutil.rmtree(run)
    start = time.perf_counter()
    train(recipe, run, show_progress=True)
    return last, time.perf_counter() - start


# ----------------------------------------------------------------------------- methods


def oracle_tau(z: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> tuple[float, torch.Tensor]:
    """tau' on TAU_GRID with the best accuracy on the target labels (ties: lower NLL)."""
    accs = []
    for chunk in torch.split(torch.as_tensor(1.0 - TAU_GRID, dtype=z.dtype), 64):
        preds = (z[None] + chunk[:, None, None] * v[None, None]).argmax(-1)  # [G, N]
        accs.append((preds == y[None]).double().mean(1))
    accs = torch.cat(accs)
    best = torch.nonzero(accs == accs.max()).flatten().tolist()
    nlls = [negative_log_likelihood(z + float(1.0 - TAU_GRID[i]) * v, y) for i in best]
    tau = float(TAU_GRID[best[int(np.argmin(nlls))]])
    return tau, z + (1.0 - tau) * v


def run_method(method: str, z: torch.Tensor, y: torch.Tensor, counts, sels: dict, v: torch.Tensor,
               draw: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(adapted logits, their labels, tau^) of one method on one target set."""
    num_classes = z.shape[1]
    if method == "none":
        return z, y, 1.0
    if method == "oracle_prior":
        res = sels["none"].known(z, empirical_prior(y, num_classes))
        return res.logits, y, res.tau
    if method in ("bcts_only", "oracle_prior_bcts"):  # f̄/T + b - log p0 (+ log q): calibration without / with q
        sel = sels["bcts"]
        cal = apply_calibration(z.double(), sel.temperature, sel.bias) - torch.log(sel.p0)
        if method == "bcts_only":
            return cal, y, 1.0 - trend_slope(sel.bias - torch.log(sel.p0), sel.v)
        q = empirical_prior(y, num_classes)
        return cal + torch.log(q.clamp_min(1e-8)), y, sels["none"].best_tau(q)
    if method == "oracle_tau":
        tau, zt = oracle_tau(z, y, v)
        return zt, y, tau
    if method.startswith("unlab_"):
        res = sels[method[len("unlab_"):]].unlabelled(z)
        return res.logits, y, res.tau
    if method.startswith("lab"):
        fit, rest = labelled_split(y, int(method[3:]), seed=draw, num_classes=num_classes)
        res = sels["none"].labelled(z[rest], z[fit], y[fit])
        return res.logits, y[rest], res.tau
    raise ValueError(method)


def bench_model(key: str, ckpt: Path, check_forwards: bool) -> dict:
    model, recipe, _, bundle, dev = load_for_eval(ckpt, "cpu")
    counts = bundle.class_counts
    lam_m = logit_prior_exponent(recipe)
    assert lam_m == 0.0, "both benchmark models have balanced ensemble logits"
    v = log_train_prior(counts).float()

    start = time.perf_counter()
    expert, labels = collect_logits(model, build_loader(bundle, "test", recipe.train.eval_batch_size, recipe.data,
                                                        train=False), dev)
    forward_s = time.perf_counter() - start
    start = time.perf_counter()
    src_expert, src_labels = collect_logits(model, build_loader(bundle, "holdout", recipe.train.eval_batch_size,
                                                                recipe.data, train=False), dev)
    source_forward_s = time.perf_counter() - start
    z_all, src = expert.mean(0), src_expert.mean(0)
    p_s = empirical_prior(src_labels, z_all.shape[1])

    priors = {d: parse_prior(d, counts) for d in DIRICHLET}
    targets = target_sets(labels, counts, list(TEST_DISTRIBUTIONS), priors, seed=0)

    separate_s = None
    if check_forwards:  # the logits-once claim, on the real data: 11 separate forward passes
        import dataclasses
        start = time.perf_counter()
        for name in TEST_DISTRIBUTIONS:
            idx = targets[name].indices
            sub = dataclasses.replace(bundle, test=bundle.test.subset(idx))
            sub_logits, _ = collect_logits(model, build_loader(sub, "test", recipe.train.eval_batch_size,
                                                               recipe.data, train=False), dev)
            assert torch.equal(sub_logits, expert[:, idx]), name
        separate_s = time.perf_counter() - start

    sels = {"none": TauSelector(counts, calibration="none")}
    fit_s = {}
    for cal in ("none", "ts", "bcts"):
        for est, min_per_class in ESTIMATORS.items():
            times = []
            for _ in range(TIMING_REPEATS):
                start = time.perf_counter()
                sel = TauSelector(counts, calibration=cal, min_samples_per_class=min_per_class)
                if cal != "none":  # uncalibrated: no source data, p0 uniform (classic EM on raw posteriors)
                    sel.fit_source(src, src_labels, source_prior=p_s)
                times.append(time.perf_counter() - start)
            sels[f"{cal}_{est}"] = sel
            fit_s[f"{cal}_{est}"] = min(times)
    sels["bcts"], sels["ts"] = sels["bcts_em"], sels["ts_em"]
    fit_s["bcts_only"] = fit_s["oracle_prior_bcts"] = fit_s["bcts_em"]

    results: dict[str, dict] = {}
    sets = {name: (z_all[t.indices], labels[t.indices]) for name, t in targets.items()}
    for method, _ in METHODS:
        draws = LABELLED_DRAWS if method.startswith("lab") else 1
        per: dict[str, dict] = {}
        for name, (z, y) in sets.items():
            tau_star = sels["none"].best_tau(empirical_prior(y, z.shape[1]))
            accs, eces, errs = [], [], []
            for draw in range(draws):
                zt, yt, tau_hat = run_method(method, z, y, counts, sels, v, draw)
                accs.append(accuracy(zt, yt))
                eces.append(expected_calibration_error(zt, yt))
                errs.append(abs(tau_hat - tau_star))
            per[name] = {"acc": float(np.mean(accs)), "ece": float(np.mean(eces)), "tau_err": float(np.mean(errs)),
                         "tau_star": tau_star, "n": len(sets[name][1])}
        # wall time: adapting all 16 sets once (one draw), best of TIMING_REPEATS (the machine is shared),
        # plus fitting the calibrator once
        times = []
        for _ in range(TIMING_REPEATS):
            start = time.perf_counter()
            for z, y in sets.values():
                run_method(method, z, y, counts, sels, v, 0)
            times.append(time.perf_counter() - start)
        seconds = min(times) + fit_s.get(method[len("unlab_"):] if method.startswith("unlab_") else method, 0.0)
        results[method] = {"per_dist": per, "seconds": seconds,
                           "mean_acc": float(np.mean([p["acc"] for p in per.values()])),
                           "mean_ece": float(np.mean([p["ece"] for p in per.values()])),
                           "mean_tau_err": float(np.mean([p["tau_err"] for p in per.values()]))}
    base, top = results["none"]["mean_acc"], results["oracle_prior"]["mean_acc"]
    top_cal, base_cal = results["oracle_prior_bcts"]["mean_acc"], results["bcts_only"]["mean_acc"]
    for r in results.values():
        # the measure: from no adaptation to the oracle prior f̄ + log q
        r["gap_closed"] = (r["mean_acc"] - base) / (top - base) if top != base else float("nan")
        # from no adaptation to the oracle prior on calibrated logits (BCTS + oracle prior)
        r["gap_closed_cal"] = (r["mean_acc"] - base) / (top_cal - base) if top_cal != base else float("nan")
        # the adaptation alone: from BCTS only to BCTS + oracle prior
        r["gap_closed_adapt"] = (r["mean_acc"] - base_cal) / (top_cal - base_cal) if top_cal != base_cal \
            else float("nan")
        r["uniform_delta"] = r["per_dist"]["uniform"]["acc"] - results["none"]["per_dist"]["uniform"]["acc"]
    return {"key": key, "label": MODELS[key][0], "checkpoint": str(ckpt), "forward_s": forward_s,
            "separate_forwards_s": separate_s, "source_forward_s": source_forward_s, "n_test": int(labels.numel()),
            "n_source": int(src_labels.numel()), "source_counts": torch.bincount(src_labels, minlength=10).tolist(),
            "train_counts": counts.tolist(), "sizes": {n: len(t.indices) for n, t in targets.items()},
            "calibration": {c: {"temperature": sels[c].temperature} for c in ("ts", "bcts")},
            "methods": results}


# ----------------------------------------------------------------------------- output


def markdown(reports: list[dict], meta: dict) -> str:
    names = list(SHORT)
    lines = [f"Fashion-MNIST-LT IR100, CPU ({meta['cpu']}, {meta['threads']} torch threads, shared machine: load "
             f"average {meta['loadavg_start']:.1f} -> {meta['loadavg_end']:.1f}), torch {meta['torch']}. Accuracy (%) "
             "per target set, mean over the 16, ECE (%, mean over the 16) after adaptation, mean |τ̂ − τ*|, wall "
             "time (ms) of adapting all 16 sets once (best of 3, plus fitting the calibrator once; forward passes "
             "excluded).", ""]
    for rep in reports:
        lines += [f"**{rep['label']}** (`{rep['key']}`): test forward once {rep['forward_s']:.1f} s"
                  + (f" (11 separate forwards: {rep['separate_forwards_s']:.1f} s, identical logits)"
                     if rep["separate_forwards_s"] is not None else "")
                  + f"; source slice {rep['n_source']} images; T: TS {rep['calibration']['ts']['temperature']:.3f}, "
                  f"BCTS {rep['calibration']['bcts']['temperature']:.3f}", "",
                  "| method | " + " | ".join(SHORT[n] for n in names)
                  + " | mean | gap closed | gap closed (cal.) | ECE | \\|τ̂−τ*\\| | ms |",
                  "|---|" + "---:|" * (len(names) + 6)]
        for method, label in METHODS:
            r = rep["methods"][method]
            cells = [f"{r['per_dist'][n]['acc']:.1f}" for n in names]
            gap = "–" if method in ("none", "oracle_prior") else f"{100 * r['gap_closed']:.0f} %"
            gap_cal = "–" if method in ("none", "oracle_prior_bcts") else f"{100 * r['gap_closed_cal']:.0f} %"
            lines.append(f"| {label} | " + " | ".join(cells) + f" | **{r['mean_acc']:.2f}** | {gap} | {gap_cal} | "
                         f"{r['mean_ece']:.1f} | {r['mean_tau_err']:.3f} | {1000 * r['seconds']:.0f} |")
        d = rep["methods"][DEFAULT]
        lines += ["", f"CLI default (`--adapt unlabelled`, 1-D MLE + BCTS): closes {100 * d['gap_closed']:.0f} % of the "
                  f"gap to the oracle prior, {100 * d['gap_closed_cal']:.0f} % of the gap to BCTS + oracle prior, "
                  f"{100 * d['gap_closed_adapt']:.0f} % of the gap from BCTS only to BCTS + oracle prior; uniform "
                  f"{d['uniform_delta']:+.2f} points vs no adaptation, "
                  f"{d['per_dist']['uniform']['acc'] - rep['methods']['bcts_only']['per_dist']['uniform']['acc']:+.2f}"
                  " vs BCTS only.", ""]
    lines.append("F/B = forward/backward-N protocol subsets, U = uniform (the balanced test set), D1..D5 = "
                 + ", ".join(f"`{d}`" for d in DIRICHLET) + ". Gap closed = (mean − mean of no adaptation) / "
                 "(mean of oracle prior − mean of no adaptation); (cal.): the same with BCTS + oracle prior as the "
                 "upper bound. Labelled rows: mean of 3 draws, accuracy on the images not drawn.")
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "runs/bench_shift"))
    ap.add_argument("--fresh", action="store_true", help="retrain the checkpoints")
    ap.add_argument("--no-forward-check", action="store_true", help="skip the 11 separate forward passes")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"cpu": _cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "command": "python benchmarks/test_shift.py", "loadavg_start": os.getloadavg()[0]}
    reports = []
    for key in MODELS:
        ckpt, train_s = checkpoint(key, out, args.fresh)
        rep = bench_model(key, ckpt, check_forwards=not args.no_forward_check)
        rep["train_seconds"] = train_s
        reports.append(rep)
    meta["loadavg_end"] = os.getloadavg()[0]
    text = markdown(reports, meta)
    (out / "results.json").write_text(json.dumps({"meta": meta, "models": reports}, indent=2) + "\n")
    (out / "results.md").write_text(text)
    for rep in reports:
        for method, label in METHODS:
            if method.startswith("unlab_"):
                u = rep["methods"][method]
                console.print(f"{rep['key']}: {label}: closes {100 * u['gap_closed']:.1f} % of the gap "
                              f"({100 * u['gap_closed_cal']:.1f} % to BCTS + oracle prior), uniform "
                              f"{u['uniform_delta']:+.2f} points", highlight=False)
    print(text)
    console.print(f"saved {out / 'results.json'}, {out / 'results.md'}")


if __name__ == "__main__":
    main()
