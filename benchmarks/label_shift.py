# label_shift.py -- test-time label shift on real Fashion-MNIST-LT IR100: how much of the gap from
# no adaptation to the oracle prior does the tau selector close, with and without labels?
# How: two checkpoints (BalPoE E = 3, one logit-adjusted expert) trained with a 10 % held-out source
# slice; test logits computed once, 16 target sets (11 SADE/BalPoE protocol subsets + 5 Dirichlet
# priors) indexed from them; every adaptation mode of the library's selector
# (balpoe.shift.selector.ADAPT_MODES) with each calibrator and estimator, plus oracle rows.
# Command (the README's "Test-time label shift" tables; about 2 min training + 1 min evaluation
# on 2 CPU cores):
#   python benchmarks/label_shift.py          # -> runs/bench_shift/results.{json,md}
"""Test-time label shift on real Fashion-MNIST-LT (IR 100): does the tau selector close the gap?

One command trains (or reuses) two checkpoints and prints the tables in README's "Test-time label
shift" section (training about 2 minutes on 2 free CPU cores, when the checkpoints are not cached
yet; the evaluation about 1 minute, most of it the 2 x 11 separate forward passes that check the
logits-once claim, ``--no-forward-check`` skips them)::

    python benchmarks/label_shift.py           # -> runs/bench_shift/results.{json,md}

Models (``balpoe.training.build.train``, i.e. ``balpoe train``, on
``recipes/balpoe/fashion_mnist_lt_ir100_cpu_demo.yaml``, both with ``data.holdout_fraction=0.1``: a
stratified 10 % of the LT training split is held out as labelled source data for calibration;
cached under ``runs/bench_shift/<key>/last.pt``):

* ``balpoe``: BalPoE, 3 experts, tau 0/1/2 (the recipe as shipped);
* ``la``: a single logit-adjusted expert (E = 1, tau [1]).

Target distributions: the 11 SADE/BalPoE protocol subsets of the balanced test set (forward50 ..
uniform .. backward50) and 5 Dirichlet perturbations of protocol profiles (DirMixE-style,
concentration 100: off the pi^lambda family).  The test logits are computed once per model and
every subset is indexed from them.  Forward passes run in float32.

Methods (rows, :data:`ROWS`): the library's adaptation modes (``balpoe.shift.selector.ADAPT_MODES``,
the ``--adapt`` choices of ``balpoe eval``) run by a ``TauSelector`` with a calibrator
(``CALIBRATIONS``) and a prior estimator (``ESTIMATORS``), and three reference rows of this
benchmark (:data:`REFERENCE_ROWS`: the oracle scalar tau' and calibration alone):

* no adaptation (``none``): the balanced ensemble logits;
* oracle prior (``known``): ``f̄ + log q`` with q = the target set's class frequencies (upper bound);
* oracle scalar tau': the tau' of ``f̄ + (1 - tau') log pi`` with the best accuracy on the target
  labels (grid of step 0.01; ties -> lower NLL);
* unlabelled (``unlabelled``), transductive on each whole target set: the prior estimated by the
  1-D MLE of the exponent lambda of pi_train^lambda (``--estimator 1d``, the CLI default) or by
  smoothed EM shrunk toward it (``--estimator em``), each without calibration (p0 uniform) and
  after TS / BCTS fitted on the held-out source slice (``TauSelector.fit_source(...,
  source_prior=its class frequencies)``);
* labelled (``labelled``), 1 and 5 labels per class on average: 10 or 50 images drawn at random
  from the target set (3 draws, mean), fitted by (1/T, tau') NLL and evaluated on the remaining
  images;
* for reference, what calibration alone does: BCTS (fitted on the source slice, its reference
  prior p0 removed) without adaptation, and BCTS plus the oracle prior.

Columns: top-1 per target set and the mean over the 16, ECE after adaptation (mean), |tau^ - tau*|
(mean; tau* = tau' of the KL projection of the target class frequencies on pi^lambda, so 0 for the
oracle prior by definition) and wall time (adaptation of all 16 sets, plus fitting the calibrator
once where there is one; forward passes excluded, reported separately).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from balpoe.runtime.device import cpu_name
from balpoe.data.build import build_loader
from balpoe.evaluate.build import ensemble_prior, load_for_eval
from balpoe.evaluate.calibration import apply_calibration
from balpoe.evaluate.logits import collect_logits
from balpoe.evaluate.metrics import accuracy, expected_calibration_error, negative_log_likelihood
from balpoe.losses.priors import empirical_prior, log_prior
from balpoe.models.multi_expert import MultiExpertNet
from balpoe.recipe import load_recipe
from balpoe.runtime.checkpoint import load_checkpoint
from balpoe.runtime.console import console
from balpoe.shift.distributions import TEST_DISTRIBUTIONS
from balpoe.shift.estimators import trend_slope
from balpoe.shift.selector import ADAPT_MODES, CALIBRATIONS, ESTIMATORS, TauSelector
from balpoe.shift.targets import parse_prior, target_sets
from balpoe.training.build import train

REPO = Path(__file__).resolve().parents[1]
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


@dataclasses.dataclass(frozen=True)
class Row:
    """One printed row: an adaptation mode of the library (``ADAPT_MODES``) or a reference row of
    this benchmark (:data:`REFERENCE_ROWS`), run by ``TauSelector(counts, calibration,
    estimator=estimator)``."""
    key: str
    label: str
    mode: str
    calibration: str = "none"
    estimator: str = "1d"
    labels_per_class: float = 5.0   # the labelled mode's budget


#: oracle scalar tau' on the target labels; BCTS without adaptation; BCTS plus the oracle prior
REFERENCE_ROWS = ("oracle_tau", "bcts_only", "oracle_prior_bcts")
ROWS = (
    Row("none", "no adaptation", "none"),
    Row("oracle_prior", "oracle prior (f̄ + log q)", "known"),
    Row("oracle_tau", "oracle scalar τ' (test labels)", "oracle_tau"),
    Row("unlab_none_em", "unlabelled EM, uncalibrated", "unlabelled", "none", "em"),
    Row("unlab_none_1d", "unlabelled 1-D MLE, uncalibrated", "unlabelled", "none", "1d"),
    Row("unlab_ts_em", "unlabelled EM, TS", "unlabelled", "ts", "em"),
    Row("unlab_ts_1d", "unlabelled 1-D MLE, TS", "unlabelled", "ts", "1d"),
    Row("unlab_bcts_em", "unlabelled EM, BCTS", "unlabelled", "bcts", "em"),
    Row("unlab_bcts_1d", "**unlabelled 1-D MLE, BCTS** (CLI default)", "unlabelled", "bcts", "1d"),
    Row("lab1", "labelled, 1/class", "labelled", labels_per_class=1),
    Row("lab5", "labelled, 5/class", "labelled", labels_per_class=5),
    Row("bcts_only", "BCTS only, no adaptation", "bcts_only", "bcts"),
    Row("oracle_prior_bcts", "BCTS + oracle prior", "oracle_prior_bcts", "bcts"),
)
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


def check_rows(rows=ROWS) -> None:
    """Every row runs a mode, calibrator and estimator that exist (the library's or a reference row)."""
    for r in rows:
        if r.mode not in ADAPT_MODES and r.mode not in REFERENCE_ROWS:
            raise ValueError(f"row {r.key}: {r.mode!r} is neither an adaptation mode ({', '.join(ADAPT_MODES)}) "
                             f"nor a reference row ({', '.join(REFERENCE_ROWS)})")
        if r.calibration not in CALIBRATIONS or r.estimator not in ESTIMATORS:
            raise ValueError(f"row {r.key}: unknown calibration {r.calibration!r} or estimator {r.estimator!r}")


def run_row(row: Row, sel: TauSelector, z: torch.Tensor, y: torch.Tensor, v: torch.Tensor,
            draw: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(adapted logits, their labels, tau^) of one row on one target set (``draw``: the labelled
    mode's seed)."""
    if row.mode == "oracle_tau":
        tau, zt = oracle_tau(z, y, v)
        return zt, y, tau
    if row.mode in ("bcts_only", "oracle_prior_bcts"):  # f̄/T + b - log p0 (+ log q): calibration without / with q
        cal = apply_calibration(z.double(), sel.temperature, sel.bias) - torch.log(sel.p0)
        if row.mode == "bcts_only":
            return cal, y, 1.0 - trend_slope(sel.bias - torch.log(sel.p0), sel.v)
        q = empirical_prior(y, z.shape[1])
        return cal + torch.log(q.clamp_min(1e-8)), y, sel.best_tau(q)
    res, rest = ADAPT_MODES[row.mode].run(sel, z, y, labels_per_class=row.labels_per_class, seed=draw)
    return res.logits, (y if rest is None else y[rest]), res.tau


def bench_model(key: str, ckpt: Path, check_forwards: bool) -> dict:
    model, recipe, _, bundle, dev = load_for_eval(ckpt, "cpu")
    counts = bundle.class_counts
    lam_m = ensemble_prior(recipe)[1]
    assert lam_m == 0.0, "both benchmark models have balanced ensemble logits"
    v = log_prior(counts, torch.float64).float()

    start = time.perf_counter()
    expert, labels = collect_logits(model, build_loader(bundle, "test", recipe.train.eval_batch_size, recipe.data,
                                                        train=False), dev)
    forward_s = time.perf_counter() - start
    start = time.perf_counter()
    src_expert, src_labels = collect_logits(model, build_loader(bundle, "holdout", recipe.train.eval_batch_size,
                                                                recipe.data, train=False), dev)
    source_forward_s = time.perf_counter() - start
    z_all, src = MultiExpertNet.ensemble(expert), MultiExpertNet.ensemble(src_expert)
    p_s = empirical_prior(src_labels, z_all.shape[1])

    priors = {d: parse_prior(d, counts) for d in DIRICHLET}
    targets = target_sets(labels, counts, list(TEST_DISTRIBUTIONS), priors, seed=0)

    separate_s = None
    if check_forwards:  # the logits-once claim, on the real data: 11 separate forward passes
        start = time.perf_counter()
        for name in TEST_DISTRIBUTIONS:
            idx = targets[name].indices
            sub = dataclasses.replace(bundle, test=bundle.test.subset(idx))
            sub_logits, _ = collect_logits(model, build_loader(sub, "test", recipe.train.eval_batch_size,
                                                               recipe.data, train=False), dev)
            assert torch.equal(sub_logits, expert[:, idx]), name
        separate_s = time.perf_counter() - start

    # one selector per (calibration, estimator) of the rows, fitted on the source slice; the fit
    # time (best of TIMING_REPEATS) is part of the rows' wall time where there is a calibrator
    sels, fit_s = {}, {}
    for cal, est in dict.fromkeys((r.calibration, r.estimator) for r in ROWS):
        times = []
        for _ in range(TIMING_REPEATS):
            start = time.perf_counter()
            sel = TauSelector(counts, calibration=cal, estimator=est)
            if cal != "none":  # uncalibrated: no source data, p0 uniform (classic EM on raw posteriors)
                sel.fit_source(src, src_labels, source_prior=p_s)
            times.append(time.perf_counter() - start)
        sels[cal, est], fit_s[cal, est] = sel, (min(times) if cal != "none" else 0.0)
    calibrated = {cal: next(sels[k] for k in sels if k[0] == cal) for cal in ("ts", "bcts")}

    results: dict[str, dict] = {}
    sets = {name: (z_all[t.indices], labels[t.indices]) for name, t in targets.items()}
    for row in ROWS:
        sel = sels[row.calibration, row.estimator]
        draws = LABELLED_DRAWS if row.mode == "labelled" else 1
        per: dict[str, dict] = {}
        for name, (z, y) in sets.items():
            tau_star = sel.best_tau(empirical_prior(y, z.shape[1]))
            accs, eces, errs = [], [], []
            for draw in range(draws):
                zt, yt, tau_hat = run_row(row, sel, z, y, v, draw)
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
                run_row(row, sel, z, y, v, 0)
            times.append(time.perf_counter() - start)
        seconds = min(times) + fit_s[row.calibration, row.estimator]
        results[row.key] = {"per_dist": per, "seconds": seconds,
                           "mean_acc": float(np.mean([p["acc"] for p in per.values()])),
                           "mean_ece": float(np.mean([p["ece"] for p in per.values()])),
                           "mean_tau_err": float(np.mean([p["tau_err"] for p in per.values()]))}
    base, top = results["none"]["mean_acc"], results["oracle_prior"]["mean_acc"]
    top_cal, base_cal = results["oracle_prior_bcts"]["mean_acc"], results["bcts_only"]["mean_acc"]
    for r in results.values():
        # the headline measure: from no adaptation to the oracle prior f̄ + log q
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
            "calibration": {c: {"temperature": sel.temperature} for c, sel in calibrated.items()},
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
        for row in ROWS:
            r = rep["methods"][row.key]
            cells = [f"{r['per_dist'][n]['acc']:.1f}" for n in names]
            gap = "–" if row.key in ("none", "oracle_prior") else f"{100 * r['gap_closed']:.0f} %"
            gap_cal = "–" if row.key in ("none", "oracle_prior_bcts") else f"{100 * r['gap_closed_cal']:.0f} %"
            lines.append(f"| {row.label} | " + " | ".join(cells)
                         + f" | **{r['mean_acc']:.2f}** | {gap} | {gap_cal} | "
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "runs/bench_shift"))
    ap.add_argument("--fresh", action="store_true", help="retrain the checkpoints")
    ap.add_argument("--no-forward-check", action="store_true", help="skip the 11 separate forward passes")
    args = ap.parse_args(argv)
    check_rows()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "command": "python benchmarks/label_shift.py", "loadavg_start": os.getloadavg()[0]}
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
        for row in ROWS:
            if row.mode == "unlabelled":
                u = rep["methods"][row.key]
                console.print(f"{rep['key']}: {row.label}: closes {100 * u['gap_closed']:.1f} % of the gap "
                              f"({100 * u['gap_closed_cal']:.1f} % to BCTS + oracle prior), uniform "
                              f"{u['uniform_delta']:+.2f} points", highlight=False)
    print(text)
    console.print(f"saved {out / 'results.json'}, {out / 'results.md'}")


if __name__ == "__main__":
    main()
