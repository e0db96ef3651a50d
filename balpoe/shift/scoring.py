"""Metrics of every target distribution from cached logits (no forward pass).

The model is in eval mode and each image's logits do not depend on the batch it was in, so
indexing the balanced test set's logits gives the numbers of a separate forward pass per subset.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from balpoe.errors import BalpoeError
from balpoe.evaluate.calibration import apply_calibration, fit_post_hoc
from balpoe.evaluate.build import SourceSet
from balpoe.evaluate.metrics import classification_report
from balpoe.losses.priors import balance_logits, empirical_prior
from balpoe.models.multi_expert import MultiExpertNet
from balpoe.shift.selector import TauSelector, get_adapt_mode
from balpoe.shift.targets import TargetSet


def evaluate_targets(expert_logits: torch.Tensor, labels: torch.Tensor, class_counts, targets: dict[str, TargetSet],
                     *, adapt_mode: str = "none", selector: TauSelector | None = None, lam_model: float = 0.0,
                     labels_per_class: float = 5, seed: int = 0, many_threshold: int = 100,
                     few_threshold: int = 20, keep: dict[str, Any] | None = None,
                     group_ranges=None, mode_inputs: Callable[[TargetSet], dict] | None = None
                     ) -> dict[str, dict[str, Any]]:
    """Metrics of every target set, by indexing the cached logits ``[E, N, C]``.

    Each row: n, acc, many/medium/few, ece, mce, nll, brier of the logits of the adaptation mode
    (:data:`~balpoe.shift.selector.ADAPT_MODES`): the model's own ensemble logits for a mode that does
    not adapt (``"none"``, with ``expert_acc``) or the adapted logits of the balanced ones;
    with adaptation also ``acc_before`` / ``ece_before`` / ``nll_before`` (no adaptation, same
    images), ``tau`` (tau' chosen), ``tau_star`` (tau' of the KL projection of the subset's class
    frequencies on the family pi^lambda), ``temperature``, ``seconds`` (the adaptation's wall time).
    ``keep``: a dict whose keys name target sets; their evaluated (logits, labels) are stored in it.
    ``mode_inputs(target)``: more keywords of the mode's ``run`` for that target set, made inside the
    timed part (the ``sade`` mode's ``aggregation``, learnt on the set's images); the set's per-expert
    logits are passed to every mode as ``expert_logits``.  A mode's ``info["aggregation"]`` (sade:
    ``weights``, ``objective``, ``epochs``, ``stopped_early``) is added to the row."""
    mode = get_adapt_mode(adapt_mode)
    ens = MultiExpertNet.ensemble(expert_logits)
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
        start = time.perf_counter()
        extra = mode_inputs(t) if mode_inputs is not None else {}
        res, rest = mode.run(selector, balance_logits(z, counts, lam_model) if mode.adapts else z, y,
                             labels_per_class=labels_per_class, seed=seed, expert_logits=expert_logits[:, idx],
                             **extra)
        seconds = time.perf_counter() - start
        y_eval = y if rest is None else y[rest]
        z_eval = z if rest is None else z[rest]
        row.update(classification_report(res.logits, y_eval, counts, many_threshold, few_threshold,
                                         group_ranges=group_ranges))
        if mode.adapts:
            before = classification_report(z_eval, y_eval, counts, many_threshold, few_threshold,
                                           group_ranges=group_ranges)
            row.update({"acc_before": before["acc"], "ece_before": before["ece"], "nll_before": before["nll"],
                        "tau": res.tau, "tau_star": tau_star, "temperature": res.temperature,
                        "seconds": seconds})
            if res.prior is not None:
                row["prior_used"] = [float(p) for p in res.prior]
            row.update(res.info.get("aggregation", {}))
            if rest is not None:
                row["n_labelled"] = int(len(y) - len(rest))
            if "tau_effective" in res.info:
                row["tau_effective"] = res.info["tau_effective"]
        else:
            row["expert_acc"] = [float((e[idx].argmax(-1) == y).double().mean() * 100) for e in expert_logits]
            row.update({"tau": 1.0 - lam_model, "tau_star": tau_star})
        if keep is not None and t.name in keep:
            keep[t.name] = (res.logits, y_eval)
        row["class_frequencies"] = [float(p) for p in q_emp]
        rows[t.name] = row
    return rows


def calibration_section(src: SourceSet | None, ens: torch.Tensor, labels: torch.Tensor, counts, lam_model: float,
                        many: int, few: int, group_ranges=None) -> dict[str, Any] | None:
    """TS and BCTS fitted on the source data (:func:`~balpoe.evaluate.calibration.fit_post_hoc`),
    and the balanced test set's metrics before and after."""
    if src is None:
        return None
    fits = fit_post_hoc(src.logits, src.labels, src.prior)
    bal = balance_logits(ens, counts, lam_model)
    out: dict[str, Any] = {"none": classification_report(bal, labels, counts, many, few, group_ranges=group_ranges)}
    for name, f in fits.items():
        cal = apply_calibration(bal.double(), f["temperature"], f["bias"])
        out[name] = {"temperature": f["temperature"],
                     "bias": None if f["bias"] is None else [float(b) for b in f["bias"]],
                     **classification_report(cal, labels, counts, many, few, group_ranges=group_ranges)}
    return out


def accuracy_curves(expert_logits: torch.Tensor, labels: torch.Tensor, class_counts,
                    targets: dict[str, TargetSet], selectors: dict[str, TauSelector], *, lam_model: float = 0.0,
                    labels_per_class: float = 5, seed: int = 0) -> dict[str, Any]:
    """Accuracy of every protocol target set under each adaptation mode in ``selectors`` (mode ->
    the selector it runs with): ``{"distributions": [...], "modes": {mode: [acc, ...]}, "labels": {...}}``,
    the data of the report's label-shift plot.  A mode that cannot run on a set gives None."""
    names = [n for n, t in targets.items() if t.kind == "protocol"]
    protocol = {n: targets[n] for n in names}
    modes: dict[str, list] = {}
    for mode, selector in selectors.items():
        try:
            rows = evaluate_targets(expert_logits, labels, class_counts, protocol, adapt_mode=mode, selector=selector,
                                    lam_model=lam_model, labels_per_class=labels_per_class, seed=seed)
            modes[mode] = [rows[n]["acc"] for n in names]
        except BalpoeError:
            modes[mode] = [None] * len(names)
    return {"distributions": names, "modes": modes, "labels": {m: curve_label(m, labels_per_class) for m in modes}}


def curve_label(mode: str, labels_per_class: float = 5) -> str:
    """The legend entry of an adaptation mode in the report's label-shift plot."""
    labels = {"none": "no adaptation", "known": "oracle prior (known q)", "unlabelled": "unlabelled (tau selector)",
              "labelled": f"labelled ({labels_per_class:g} labels/class)",
              "sade": "SADE aggregation (learnt per target set)"}
    return labels.get(mode, mode)
