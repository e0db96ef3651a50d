"""Evaluation under test label shift: every test distribution from one forward pass.

``balpoe eval CKPT --test-dists all`` runs the model over the balanced test set **once**
(:func:`balpoe.evaluate.collect_logits`, per-expert logits ``[E, N, C]``) and derives every test
distribution by indexing those logits with the distribution's index set
(:func:`balpoe.test_dists.test_subset_indices`; user priors: :func:`~balpoe.test_dists.prior_subset_indices`).
The model is in eval mode and each image's logits do not depend on the batch it was in, so the
numbers are those of a separate forward pass per subset (``tests/test_shift_eval.py`` checks it).

On top of that, per distribution, the test-time tau selector (:class:`balpoe.selector.TauSelector`)
adapts the ensemble logits (``--adapt``):

* ``known``: the oracle target prior, i.e. the class frequencies of the target subset (the
  ``--posthoc_bias_correction`` of the BalPoE code); for a user prior these equal the prior up to
  rounding to whole images.
* ``unlabelled``: transductive, on the whole (unlabelled) target subset, after calibrating on
  labelled *source* data (:func:`source_logits`); the prior is the 1-D maximum-likelihood member
  of the family pi^lambda (``estimator="1d"``, the default) or smoothed EM shrunk toward it
  (``"em"``; ``"auto"``: EM when N/K >= 20).  On Fashion-MNIST-LT the 1-D MLE is better on every
  target set, the off-family Dirichlet priors included: EM also absorbs the classifier's per-class
  confusions (``benchmarks/test_shift.py``).
* ``labelled``: a budget of ``k`` labels per class on average, i.e. ``k * C`` images drawn at
  random (seeded) from the target subset, so that they follow its prior (:func:`labelled_split`);
  (1/T, tau') is fitted on them and the metrics are computed on the *remaining* images.

The selector expects *balanced* ensemble logits.  A BalPoE ensemble with mean tau 1 (and a single
logit-adjusted expert with tau 1) is balanced; any other model is balanced first by subtracting
``lambda_m log pi_train`` (:func:`logit_prior_exponent`), e.g. ``lambda_m = 1`` for plain cross-entropy.
Without adaptation the model's own logits are scored, unchanged.

Source data for calibration (:func:`source_logits`): the checkpoint recipe's held-out slice of the
long-tailed training split (``data.holdout_fraction > 0``), whose label distribution is
long-tailed: its exact class frequencies are passed as ``source_prior`` (the calibrated model is
scored as ``softmax(f̄/T + b + log p_s)``, test-shift notes §5).  Without a holdout, a stratified
slice of the training split the model *was trained on* is used, with a warning: the model is
over-confident on images it has seen, so the fitted temperature is under-estimated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from balpoe.calibration import apply_calibration, fit_bcts, fit_temperature, holdout_split
from balpoe.errors import BalpoeError
from balpoe.metrics import classification_report
from balpoe.selector import CALIBRATIONS, SelectorResult, TauSelector, log_train_prior, normalize_prior
from balpoe.test_dists import (TEST_DISTRIBUTIONS, dirichlet_prior, distribution_prior, parse_distribution,
                               prior_subset_indices, test_subset_indices)

ADAPT_MODES = ("none", "known", "unlabelled", "labelled")
SOURCES = ("auto", "holdout", "train")
#: unlabelled prior estimators -> TauSelector(min_samples_per_class=...): the 1-D MLE over lambda
#: only; smoothed EM shrunk toward it; or the notes' rule (EM when N/K >= 20, else the 1-D MLE)
ESTIMATORS = {"1d": float("inf"), "em": 0.0, "auto": 20.0}
TABLE_COLUMNS = ["n", "acc", "many", "medium", "few", "ece", "nll"]
#: fraction of the training split used as calibration data when the recipe has no holdout
TRAIN_SLICE_FRACTION = 0.1


# ----------------------------------------------------------------------------- parsing


def parse_test_dists(spec: str | Iterable[str] | None) -> list[str]:
    """``"all"`` -> the 11 protocol distributions; ``"forward50,uniform,backward5"`` -> those names
    (duplicates dropped, order kept; ``all`` may be mixed with names).  Unknown names raise."""
    if spec is None:
        return []
    parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec)]
    out: list[str] = []
    for p in parts:
        if not p:
            continue
        for name in (TEST_DISTRIBUTIONS if p == "all" else (p,)):
            parse_distribution(name)
            if name not in out:
                out.append(name)
    if not out:
        raise BalpoeError(f"--test-dists {spec!r} names no distribution: use 'all' or e.g. forward50,uniform")
    return out


def parse_prior(spec: str, class_counts: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """A user-given target prior (float64 [C], sums to 1).

    * ``"w1,w2,...,wC"``: non-negative class weights, one per class (label order), normalised;
    * ``"dirichlet:<profile>:<concentration>:<seed>"``: ``q ~ Dir(concentration * p)`` where ``p``
      is the prior of a named distribution (``forward10``, ``uniform``, ``backward10``, ...) under
      these training class counts (:func:`balpoe.test_dists.dirichlet_prior`).
    """
    num_classes = len(class_counts)
    spec = str(spec).strip()
    if spec.startswith("dirichlet"):
        parts = spec.split(":")
        if len(parts) != 4:
            raise BalpoeError(f"--prior {spec!r}: expected dirichlet:<profile>:<concentration>:<seed>, "
                              "e.g. dirichlet:forward10:100:0")
        _, profile, conc, seed = parts
        parse_distribution(profile)
        try:
            conc_f, seed_i = float(conc), int(seed)
        except ValueError:
            raise BalpoeError(f"--prior {spec!r}: concentration must be a number and seed an integer") from None
        return dirichlet_prior(distribution_prior(profile, class_counts), conc_f, seed_i)
    try:
        weights = [float(w) for w in spec.split(",")]
    except ValueError:
        raise BalpoeError(f"--prior {spec!r}: expected comma-separated class weights or "
                          "dirichlet:<profile>:<concentration>:<seed>") from None
    return normalize_prior(weights, num_classes, what=f"--prior {spec!r}")


def prior_names(specs: Sequence[str]) -> list[str]:
    """Row names of user priors: the spec itself for ``dirichlet:...``, ``custom`` (``custom2``, ...)
    for weight lists."""
    names, k = [], 0
    for s in specs:
        if str(s).strip().startswith("dirichlet"):
            names.append(str(s).strip())
        else:
            k += 1
            names.append("custom" if k == 1 else f"custom{k}")
    return names


def file_tag(name: str) -> str:
    """A file-name-safe form of a distribution name (``dirichlet:forward10:100:0`` -> ``dirichlet-forward10-100-0``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


# ----------------------------------------------------------------------------- subsets


@dataclasses.dataclass
class TargetSet:
    """One target distribution: indices into the balanced test set and, for user priors, the prior."""
    name: str
    indices: torch.LongTensor
    kind: str                        # "protocol" or "prior"
    prior: torch.Tensor | None = None


def target_sets(labels: torch.Tensor, class_counts: Sequence[int] | torch.Tensor, dists: Sequence[str],
                priors: dict[str, torch.Tensor] | None = None, seed: int = 0) -> dict[str, TargetSet]:
    """Index sets of the named protocol distributions (numpy legacy seed 0, as the reference) and of
    user priors (:func:`prior_subset_indices` with ``seed``: the largest subset that follows q)."""
    out = {n: TargetSet(n, test_subset_indices(labels, class_counts, n), "protocol") for n in dists}
    for name, q in (priors or {}).items():
        out[name] = TargetSet(name, prior_subset_indices(labels, q, seed=seed), "prior", q)
    return out


def empirical_prior(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class frequencies (float64 [C]) of a label vector: the oracle 'known' target prior."""
    counts = torch.bincount(labels.cpu(), minlength=num_classes).double()
    return counts / counts.sum()


# ----------------------------------------------------------------------------- model prior


def logit_prior_exponent(recipe) -> float:
    """lambda_m with f̄ ≈ log p(x|y) + lambda_m log pi_train + c(x) (test-shift notes §0).

    Fitting ``softmax(f_k + delta_k log pi)`` on a stream with prior ``rho`` leaves the prior
    ``rho * pi^-delta_k`` in f_k (``stage2_expert_offsets``): stage 1 samples instance-balanced
    (rho = pi) with delta_k = tau_k, so lambda_m = 1 - mean tau (0 for BalPoE and for a single
    logit-adjusted expert with tau 1, 1 for plain CE); a class-balanced stream (rho = 1, MiSLAS
    stage 2) removes one power of pi; stage 2 uses its own per-expert offsets."""
    from balpoe.trainer import expert_taus
    taus = expert_taus(recipe)
    deltas = taus
    if recipe.stage == 2:
        from balpoe.stage2 import stage2_expert_offsets
        deltas = stage2_expert_offsets(taus, recipe.stage2.expert_adjust)
    rho = 0.0 if recipe.data.sampler == "class_balanced" else 1.0
    return rho - sum(deltas) / len(deltas)


def balance_logits(logits: torch.Tensor, class_counts, lam_model: float) -> torch.Tensor:
    """Balanced ensemble logits ``f̄ - lambda_m log pi_train`` (unchanged when lambda_m = 0)."""
    if lam_model == 0:
        return logits
    return logits - (lam_model * log_train_prior(class_counts)).to(logits)


# ----------------------------------------------------------------------------- source data


@dataclasses.dataclass
class SourceSet:
    """Labelled source data for calibration: balanced ensemble logits, labels, and what they are."""
    logits: torch.Tensor             # [N, C], balanced ensemble logits
    labels: torch.Tensor             # [N]
    kind: str                        # "holdout" or "train_slice"
    note: str
    seconds: float = 0.0

    @property
    def prior(self) -> torch.Tensor:
        """The source label distribution (class frequencies): long-tailed for both kinds."""
        return empirical_prior(self.labels, self.logits.shape[1])


def check_source(bundle, source: str) -> str:
    """Which source data ``source`` resolves to for this data bundle: ``holdout`` or ``train_slice``
    (raises a one-line error when there is none)."""
    if source not in SOURCES:
        raise BalpoeError(f"--source must be one of {SOURCES}, got {source!r}")
    if bundle.holdout is not None and source in ("auto", "holdout"):
        return "holdout"
    if source == "holdout":
        raise BalpoeError("--source holdout: the checkpoint's recipe has no held-out slice (data.holdout_fraction "
                          "is 0); retrain with --set data.holdout_fraction=0.1, or pass --source train")
    if not bundle.in_memory:
        raise BalpoeError(f"no labelled source data for calibration: {bundle.name} has no held-out slice "
                          "(data.holdout_fraction is 0); retrain with --set data.holdout_fraction=0.1")
    return "train_slice"


def source_logits(model: torch.nn.Module, bundle, recipe, device: torch.device, source: str = "auto",
                  lam_model: float = 0.0, seed: int = 0) -> SourceSet:
    """Balanced ensemble logits of the labelled source data (module docstring): the holdout, or a
    stratified ``TRAIN_SLICE_FRACTION`` slice of the (seen) training split with a warning."""
    from balpoe.data.build import build_loader
    from balpoe.evaluate import collect_logits
    kind = check_source(bundle, source)
    if kind == "holdout":
        b = bundle
        note = (f"held-out slice of the long-tailed training split (data.holdout_fraction = "
                f"{recipe.data.holdout_fraction}), not trained on")
    else:
        _, idx = holdout_split(bundle.train.labels.cpu(), TRAIN_SLICE_FRACTION, seed=seed, min_per_class=1)
        b = dataclasses.replace(bundle, holdout=bundle.train.subset(idx))
        note = (f"{TRAIN_SLICE_FRACTION:.0%} stratified slice of the training split the model WAS trained on "
                "(no data.holdout_fraction): the temperature is under-estimated")
        warnings.warn(f"calibration source data: {note}; retrain with --set data.holdout_fraction=0.1 for an "
                      "honest held-out slice", UserWarning, stacklevel=2)
    loader = build_loader(b, "holdout", recipe.train.eval_batch_size, recipe.data, train=False)
    start = time.perf_counter()
    expert, labels = collect_logits(model, loader, device, recipe.train.amp)
    seconds = time.perf_counter() - start
    logits = balance_logits(expert.mean(0), bundle.class_counts, lam_model)
    return SourceSet(logits, labels, kind, note, seconds)


def fit_post_hoc(source: SourceSet) -> dict[str, Any]:
    """TS and BCTS fitted by NLL on the source data, scored with the source prior (notes §3, §5):
    ``{"ts": {"temperature"}, "bcts": {"temperature", "bias"}}``."""
    offset = torch.log(source.prior.clamp_min(1e-8))
    t_ts = fit_temperature(source.logits, source.labels, offset=offset)
    t_b, bias = fit_bcts(source.logits, source.labels, offset=offset)
    return {"ts": {"temperature": t_ts, "bias": None}, "bcts": {"temperature": t_b, "bias": bias}}


# ----------------------------------------------------------------------------- adaptation


def labelled_split(labels: torch.Tensor, per_class: float, seed: int = 0,
                   num_classes: int | None = None) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Positions (into ``labels``) of a labelled budget of ``per_class`` labels per class *on
    average* -- ``round(per_class * C)`` images drawn uniformly without replacement from the target
    set (``np.random.default_rng(seed)``) -- and of the remaining images (evaluated).  Both sorted.

    The draw is i.i.d. from the target set, so the labelled images follow the target prior (a
    frequent class gets more labels, a rare one may get none).  A per-class stratified draw would
    be class-balanced whatever the target prior is and would carry no information about it: the
    fitted tau' would stay at the balanced one (notes §5c fits the prior exponent from the labels)."""
    if per_class <= 0:
        raise BalpoeError(f"--labels-per-class must be > 0, got {per_class}")
    n = int(labels.numel())
    num_classes = num_classes or (int(labels.max()) + 1 if n else 1)
    k = max(1, int(round(per_class * num_classes)))
    if k >= n:
        raise BalpoeError(f"--labels-per-class {per_class}: {k} labelled images leave none of the {n} images of "
                          "the target set to evaluate on")
    rng = np.random.default_rng(seed)
    fit = np.sort(rng.choice(n, size=k, replace=False))
    rest = np.setdiff1d(np.arange(n), fit)
    return torch.from_numpy(fit.astype(np.int64)), torch.from_numpy(rest.astype(np.int64))


def adapt(selector: TauSelector, mode: str, logits: torch.Tensor, labels: torch.Tensor, *,
          prior: torch.Tensor | None = None, labels_per_class: int = 5, seed: int = 0
          ) -> tuple[SelectorResult, torch.LongTensor | None]:
    """Adapt balanced ``logits`` of one target set; returns the selector's result (logits of the
    evaluated images) and, for ``labelled``, the positions of the evaluated images (else None)."""
    if mode == "known":
        q = prior if prior is not None else empirical_prior(labels, logits.shape[1])
        return selector.known(logits, q), None
    if mode == "unlabelled":
        return selector.unlabelled(logits), None
    if mode == "labelled":
        fit, rest = labelled_split(labels, labels_per_class, seed, logits.shape[1])
        res = selector.labelled(logits[rest], logits[fit], labels[fit])
        return res, rest
    if mode == "none":
        return selector.select("none", logits), None
    raise BalpoeError(f"--adapt must be one of {ADAPT_MODES}, got {mode!r}")


def evaluate_targets(expert_logits: torch.Tensor, labels: torch.Tensor, class_counts, targets: dict[str, TargetSet],
                     *, adapt_mode: str = "none", selector: TauSelector | None = None, lam_model: float = 0.0,
                     labels_per_class: int = 5, seed: int = 0, many_threshold: int = 100,
                     few_threshold: int = 20, keep: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Metrics of every target set, by indexing the cached logits ``[E, N, C]`` (no forward pass).

    Each row: n, acc, many/medium/few, ece, mce, nll, brier of the model's own ensemble logits
    (``adapt_mode="none"``) or of the adapted logits; with adaptation also ``acc_before`` /
    ``ece_before`` / ``nll_before`` (no adaptation, same images), ``tau`` (tau' chosen),
    ``tau_star`` (tau' of the KL projection of the subset's class frequencies on the family
    pi^lambda, notes §5a), ``temperature``, ``seconds`` (the adaptation's wall time).
    ``keep``: a dict whose keys name target sets; their evaluated (logits, labels) are stored in it."""
    if adapt_mode not in ADAPT_MODES:
        raise BalpoeError(f"--adapt must be one of {ADAPT_MODES}, got {adapt_mode!r}")
    ens = expert_logits.mean(0)
    num_classes = ens.shape[1]
    counts = torch.as_tensor(class_counts)
    if selector is None:
        selector = TauSelector(counts, calibration="none")
    rows: dict[str, dict[str, Any]] = {}
    for t in targets.values():
        idx = t.indices
        z, y = ens[idx], labels[idx]
        row: dict[str, Any] = {}
        q_emp = empirical_prior(y, num_classes)
        tau_star = selector.best_tau(q_emp)
        if adapt_mode == "none":
            row.update(classification_report(z, y, counts, many_threshold, few_threshold))
            row["expert_acc"] = [float((e[idx].argmax(-1) == y).double().mean() * 100) for e in expert_logits]
            row.update({"tau": 1.0 - lam_model, "tau_star": tau_star})
            if keep is not None and t.name in keep:
                keep[t.name] = (z, y)
        else:
            start = time.perf_counter()
            res, rest = adapt(selector, adapt_mode, balance_logits(z, counts, lam_model), y,
                              labels_per_class=labels_per_class, seed=seed)
            seconds = time.perf_counter() - start
            y_eval = y if rest is None else y[rest]
            z_eval = z if rest is None else z[rest]
            row.update(classification_report(res.logits, y_eval, counts, many_threshold, few_threshold))
            before = classification_report(z_eval, y_eval, counts, many_threshold, few_threshold)
            row.update({"acc_before": before["acc"], "ece_before": before["ece"], "nll_before": before["nll"],
                        "tau": res.tau, "tau_star": tau_star, "temperature": res.temperature,
                        "seconds": seconds, "prior_used": [float(p) for p in res.prior]})
            if rest is not None:
                row["n_labelled"] = int(len(y) - len(rest))
            if "tau_effective" in res.info:
                row["tau_effective"] = res.info["tau_effective"]
            if keep is not None and t.name in keep:
                keep[t.name] = (res.logits, y_eval)
        row["class_frequencies"] = [float(p) for p in q_emp]
        rows[t.name] = row
    return rows


# ----------------------------------------------------------------------------- the driver


def evaluate_shift(path: str | Path, *, test_dists: str | Sequence[str] | None = None,
                   priors: Sequence[str] | None = None, adapt_mode: str = "none", calibration: str = "bcts",
                   estimator: str = "1d", source: str = "auto", labels_per_class: float = 5, seed: int = 0,
                   device: str = "auto",
                   batch_size: int | None = None, overrides: list[str] | None = None,
                   out: str | Path | None = None, plots: bool = True, quiet: bool = False) -> dict[str, Any]:
    """``balpoe eval CKPT --test-dists ... [--prior ...] [--adapt ...]``.

    Collects the test logits once, evaluates every requested distribution (default: all 11 when
    neither ``test_dists`` nor ``priors`` is given) with the requested adaptation, fits TS / BCTS on
    source data when there is a held-out slice (or when the unlabelled mode needs it), prints a
    table and writes ``shift_eval.json``, ``shift_eval.md`` and reliability diagrams into ``out``
    (default: the checkpoint's directory).  Returns the report dict."""
    from balpoe.console import console
    from balpoe.data.build import build_loader
    from balpoe.evaluate import collect_logits, load_for_eval
    if adapt_mode not in ADAPT_MODES:
        raise BalpoeError(f"--adapt must be one of {ADAPT_MODES}, got {adapt_mode!r}")
    if calibration not in CALIBRATIONS:
        raise BalpoeError(f"--calibration must be one of {CALIBRATIONS}, got {calibration!r}")
    if source not in SOURCES:
        raise BalpoeError(f"--source must be one of {SOURCES}, got {source!r}")
    if estimator not in ESTIMATORS:
        raise BalpoeError(f"--estimator must be one of {tuple(ESTIMATORS)}, got {estimator!r}")
    if labels_per_class <= 0:
        raise BalpoeError(f"--labels-per-class must be > 0, got {labels_per_class}")
    dists = parse_test_dists(test_dists)
    priors = list(priors or [])
    if not dists and not priors:
        dists = list(TEST_DISTRIBUTIONS)

    model, recipe, ckpt, bundle, dev = load_for_eval(path, device, batch_size, overrides)
    counts = bundle.class_counts
    prior_vecs = {n: parse_prior(s, counts) for n, s in zip(prior_names(priors), priors)}
    need_source = adapt_mode == "unlabelled" and calibration != "none"
    if need_source or source != "auto":
        check_source(bundle, source)  # fail before any forward pass
    lam_model = logit_prior_exponent(recipe)
    out_dir = Path(out) if out else Path(path).parent
    out_dir.mkdir(parents=True, exist_ok=True)

    # 1. the balanced test set, once
    loader = build_loader(bundle, "test", recipe.train.eval_batch_size, recipe.data, train=False)
    start = time.perf_counter()
    expert_logits, labels = collect_logits(model, loader, dev, recipe.train.amp)
    forward_s = time.perf_counter() - start
    targets = target_sets(labels, counts, dists, prior_vecs, seed=seed)
    many, few = recipe.data.many_threshold, recipe.data.few_threshold

    # 2. source data: post-hoc calibration (TS, BCTS) and the unlabelled selector's calibrator
    src = None
    if need_source or source != "auto" or bundle.holdout is not None:
        src = source_logits(model, bundle, recipe, dev, source, lam_model, seed)
    calib = _calibration_section(src, expert_logits.mean(0), labels, counts, lam_model, many, few)

    # 3. every distribution by indexing
    selector = TauSelector(counts, calibration=calibration if adapt_mode == "unlabelled" else "none",
                           min_samples_per_class=ESTIMATORS[estimator])
    if adapt_mode == "unlabelled" and calibration != "none":
        selector.fit_source(src.logits, src.labels, source_prior=src.prior)
    adapted = {n: None for n in _plot_targets(targets)} if adapt_mode != "none" and plots else None
    start = time.perf_counter()
    rows = evaluate_targets(expert_logits, labels, counts, targets, adapt_mode=adapt_mode, selector=selector,
                            lam_model=lam_model, labels_per_class=labels_per_class, seed=seed,
                            many_threshold=many, few_threshold=few, keep=adapted)
    derive_s = time.perf_counter() - start

    report: dict[str, Any] = {
        "checkpoint": str(path), "epoch": ckpt["epoch"], "recipe": recipe.name,
        "num_experts": int(expert_logits.shape[0]), "taus": [float(t) for t in ckpt.get("taus", [])],
        "logit_prior_exponent": lam_model, "adapt": adapt_mode,
        "calibration": calibration if adapt_mode == "unlabelled" else None,
        "estimator": estimator if adapt_mode == "unlabelled" else None,
        "labels_per_class": labels_per_class if adapt_mode == "labelled" else None, "seed": seed,
        "forward_seconds": forward_s, "derive_seconds": derive_s, "n_test": int(labels.numel()),
        "source": None if src is None else {"kind": src.kind, "n": int(src.labels.numel()), "note": src.note,
                                            "forward_seconds": src.seconds},
        "post_hoc_calibration": calib,
        "priors": {n: {"spec": s, "prior": [float(p) for p in prior_vecs[n]]}
                   for n, s in zip(prior_names(priors), priors)},
        "distributions": rows,
    }
    if adapt_mode == "unlabelled":
        report["selector"] = {"temperature": selector.temperature,
                              "p0": [float(p) for p in selector.p0] if selector.p0 is not None else None}
    files = write_reports(report, out_dir, expert_logits, labels, targets, counts, lam_model, adapted, plots)
    report["files"] = [str(f) for f in files]
    if not quiet:
        print_shift_report(report, console)
        console.print("saved " + ", ".join(str(f) for f in files))
    return report


def _calibration_section(src: SourceSet | None, ens: torch.Tensor, labels: torch.Tensor, counts, lam_model,
                         many, few) -> dict[str, Any] | None:
    """TS and BCTS fitted on the source data, and the uniform (balanced) test metrics before/after."""
    if src is None:
        return None
    fits = fit_post_hoc(src)
    bal = balance_logits(ens, counts, lam_model)
    out: dict[str, Any] = {"none": {k: v for k, v in classification_report(bal, labels, counts, many, few).items()}}
    for name, f in fits.items():
        cal = apply_calibration(bal.double(), f["temperature"], f["bias"])
        out[name] = {"temperature": f["temperature"],
                     "bias": None if f["bias"] is None else [float(b) for b in f["bias"]],
                     **classification_report(cal, labels, counts, many, few)}
    return out


# ----------------------------------------------------------------------------- reports


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def _columns(report: dict) -> list[tuple[str, str, int]]:
    cols = [("n", "n", 0), ("acc", "acc", 2), ("many", "many", 2), ("medium", "medium", 2), ("few", "few", 2),
            ("ece", "ECE", 2), ("nll", "NLL", 3)]
    if report["adapt"] != "none":
        cols += [("acc_before", "acc0", 2), ("ece_before", "ECE0", 2), ("tau", "tau'", 3), ("tau_star", "tau*", 3),
                 ("temperature", "T", 3)]
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
        est = {"1d": "1-D MLE of the prior exponent", "em": "EM shrunk toward the 1-D MLE",
               "auto": "EM shrunk toward the 1-D MLE when N/K >= 20, else the 1-D MLE"}[report["estimator"]]
        return f"unlabelled, transductive on each whole target set ({est}); {where}"
    return (f"labelled: {report['labels_per_class']:g} labels per class on average (k*C images drawn at random from "
            f"each target set, seed {report['seed']}); metrics on the remaining images")


def print_shift_report(report: dict, console) -> None:
    from rich import box
    from rich.table import Table
    cols = _columns(report)
    title = f"{report['recipe']} (epoch {report['epoch']}): test label distributions, adapt = {report['adapt']}"
    table = Table(title=title, box=box.SIMPLE_HEAD)
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
        console.print("acc0 / ECE0: the same images without adaptation; tau': the selector's tau' (1 - lambda); "
                      "tau*: tau' of the KL projection of the true class frequencies on pi^lambda; T: temperature")
    console.print(f"test logits computed once: {report['n_test']} images, forward {report['forward_seconds']:.2f} s; "
                  f"all {len(report['distributions'])} distributions derived by indexing in "
                  f"{report['derive_seconds']:.2f} s")
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
              "pi_train^(1-tau') (test-shift notes §5a); T: the temperature dividing the logits."]
    c = report.get("post_hoc_calibration")
    if c:
        lines += ["", "## Post-hoc calibration (balanced test set)", "",
                  f"Fitted by NLL on {report['source']['n']} labelled source images: {report['source']['note']}.", "",
                  "| calibrator | T | acc | ECE | MCE | NLL | Brier |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name in ("none", "ts", "bcts"):
            r = c[name]
            lines.append(f"| {name} | {_fmt(r.get('temperature'), 3)} | {r['acc']:.2f} | {r['ece']:.2f} | "
                         f"{r['mce']:.2f} | {r['nll']:.3f} | {r['brier']:.4f} |")
    if report.get("priors"):
        lines += ["", "## User priors", ""]
        for n, p in report["priors"].items():
            lines.append(f"* {n}: `{p['spec']}` -> q = [" + ", ".join(f"{x:.4f}" for x in p["prior"]) + "]")
    if report.get("files"):
        lines += ["", "Files: " + ", ".join(f"`{Path(f).name}`" for f in report["files"])]
    return "\n".join(lines) + "\n"


def _plot_targets(targets: dict[str, TargetSet]) -> list[str]:
    return [n for n, t in targets.items() if n == "uniform" or t.kind == "prior"]


def write_reports(report: dict, out_dir: Path, expert_logits: torch.Tensor, labels: torch.Tensor,
                  targets: dict[str, TargetSet], class_counts, lam_model: float = 0.0,
                  adapted: dict[str, tuple] | None = None, plots: bool = True) -> list[Path]:
    """``shift_eval.json``, ``shift_eval.md`` and reliability diagrams: ``reliability_<dist>.png``
    (no adaptation) and ``reliability_<dist>_<adapt>.png`` (after adaptation) for ``uniform`` and
    each user prior; ``reliability_uniform_{ts,bcts}.png`` after post-hoc calibration."""
    from balpoe.checkpoint import atomic_write_text
    from balpoe.reliability import reliability_diagram
    files: list[Path] = []
    if plots:
        ens = expert_logits.mean(0)
        counts = torch.as_tensor(class_counts)
        for name in _plot_targets(targets):
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
    json_path, md_path = out_dir / "shift_eval.json", out_dir / "shift_eval.md"
    files = [json_path, md_path] + files
    report["files"] = [str(f) for f in files]
    atomic_write_text(json.dumps(report, indent=2) + "\n", json_path)
    atomic_write_text(markdown_report(report), md_path)
    return files

