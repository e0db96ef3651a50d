"""Evaluation of a checkpoint under test label shift: every test distribution from one forward pass.

``balpoe eval CKPT --test-dists all`` runs the model over the balanced test set **once**
(:func:`~balpoe.evaluate.logits.collect_logits`, per-expert logits ``[E, N, C]``) and derives
every test distribution by indexing those logits with the distribution's index set
(:mod:`balpoe.shift.targets`); the numbers equal those of a separate forward pass per subset.

On top of that, per distribution, the test-time tau selector (:class:`~balpoe.shift.selector.TauSelector`)
adapts the ensemble logits with one of the modes of :data:`~balpoe.shift.selector.ADAPT_MODES`:

* ``known``: the oracle target prior, i.e. the class frequencies of the target subset (the
  post-hoc bias correction option of the official BalPoE code); for a user prior these equal the prior up to
  rounding to whole images.
* ``unlabelled``: transductive, on the whole (unlabelled) target subset, after calibrating on
  labelled *source* data (:func:`~balpoe.evaluate.build.source_logits`); the prior is the 1-D
  maximum-likelihood member of the family pi^lambda (``estimator="1d"``, the default) or smoothed EM
  (Saerens et al. 2002) shrunk toward it (``"em"``; ``"auto"``: EM when N/K >= 20).  On
  Fashion-MNIST-LT the 1-D MLE is better on every target set, the off-family Dirichlet priors
  included: EM also absorbs the classifier's per-class confusions (``benchmarks/label_shift.py``).
* ``labelled``: a budget of ``k`` labels per class on average, i.e. ``k * C`` images drawn at
  random (seeded) from the target subset (:func:`~balpoe.shift.selector.labelled_split`);
  (1/T, tau') is fitted on them and the metrics are computed on the *remaining* images.
* ``sade``: SADE's test-time self-supervised aggregation (Zhang et al., NeurIPS 2022): per target
  subset, expert weights are learnt on its unlabelled images
  (:func:`~balpoe.shift.aggregation.learn_aggregation_weights`, the official SGD settings of the
  dataset, :data:`~balpoe.shift.aggregation.OFFICIAL_SGD`, else CIFAR-100's) and applied to the
  cached per-expert logits of the subset.  The only mode that runs the model again (two augmented
  views per image and epoch); it needs a multi-expert model and an in-memory dataset.

The selector expects *balanced* ensemble logits.  A BalPoE ensemble with mean tau 1 (and a single
logit-adjusted expert with tau 1) is balanced; any other model is balanced first by subtracting
``lambda_m log pi_train`` (:func:`~balpoe.evaluate.build.ensemble_prior`), e.g. ``lambda_m = 1``
for plain cross-entropy.  Without adaptation the model's own logits are scored, unchanged.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from pathlib import Path
from typing import Any, Sequence

from balpoe.data.build import build_loader
from balpoe.data.image_list import find_list_file
from balpoe.errors import BalpoeError, NotApplicable, check_choice
from balpoe.evaluate.build import (SOURCES, check_run_report, check_source, ensemble_prior, group_ranges,
                                   load_for_eval, print_data_location, source_logits, write_run_report)
from balpoe.evaluate.logits import cached_logits, file_digest
from balpoe.models.multi_expert import MultiExpertNet
from balpoe.runtime.checkpoint import ensure_writable_dir, json_text
from balpoe.runtime.files import check_output_path
from balpoe.runtime.console import console
from balpoe.shift.distributions import TEST_DISTRIBUTIONS
from balpoe.shift.render import SHIFT_FILES, plot_targets, print_shift_report, write_reports
from balpoe.shift.aggregation import OFFICIAL_SGD, learn_aggregation_weights
from balpoe.shift.scoring import accuracy_curves, calibration_section, curve_label, evaluate_targets
from balpoe.shift.selector import CALIBRATIONS, TauSelector, get_adapt_mode, get_estimator
from balpoe.shift.targets import list_target_sets, parse_prior, parse_test_dists, prior_names, target_sets


@dataclasses.dataclass(frozen=True)
class ShiftOptions:
    """What a label-shift evaluation evaluates and how it adapts (the defaults are those of
    ``balpoe eval``); checked when made, one line naming the bad value.

    ``test_dists``: protocol distributions (``"all"``, ``"forward50,uniform"`` or a list of names);
    ``priors``: user target priors (specs of :func:`~balpoe.shift.targets.parse_prior`);
    ``test_lists``: test-distribution list files (:func:`~balpoe.shift.targets.list_target_sets`);
    with none of the three, the recipe's ``data.test_lists`` or else all 11 protocol distributions.
    ``adapt``: a mode of :data:`~balpoe.shift.selector.ADAPT_MODES`; ``calibration`` and ``estimator``
    (:data:`~balpoe.shift.selector.ESTIMATORS`) of the unlabelled mode; ``source`` of the calibration
    data (:data:`~balpoe.evaluate.build.SOURCES`); ``labels_per_class`` of the labelled mode;
    ``sade_epochs``, ``sade_batch_size`` and ``sade_lr`` of the sade mode (None: the official lr of
    the dataset, :func:`sade_settings`); ``seed`` of user-prior subsets, labelled draws and the sade
    mode's views."""
    test_dists: str | Sequence[str] | None = None
    priors: str | Sequence[str] | None = None
    test_lists: str | Path | Sequence[str | Path] | None = None
    adapt: str = "none"
    calibration: str = "bcts"
    estimator: str = "1d"
    source: str = "auto"
    labels_per_class: float = 5
    sade_epochs: int = 5
    sade_batch_size: int = 128
    sade_lr: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        get_adapt_mode(self.adapt)
        check_choice("calibration", self.calibration, CALIBRATIONS)
        check_choice("calibration source", self.source, SOURCES)
        get_estimator(self.estimator)
        k = self.labels_per_class
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k) or k <= 0:
            raise BalpoeError(f"labels per class must be a finite number > 0, got {k!r}")
        for name in ("sade_epochs", "sade_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise BalpoeError(f"{name.replace('_', ' ')} must be an integer >= 1, got {v!r}")
        lr = self.sade_lr
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr)
                               or lr <= 0):
            raise BalpoeError(f"sade lr must be a finite number > 0, got {lr!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 32:
            raise BalpoeError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")


def sade_settings(recipe, bundle, opt: ShiftOptions, path) -> dict[str, Any]:
    """The sade mode's settings, checked before any forward pass: ``learn`` (keywords of
    :func:`~balpoe.shift.aggregation.learn_aggregation_weights`) and ``report`` (what
    ``shift_eval.json`` records).  SGD lr and weight decay: the official test-time config of the
    dataset (:data:`~balpoe.shift.aggregation.OFFICIAL_SGD`), else CIFAR-100-LT's; ``opt.sade_lr``
    replaces the lr.  Views: the dataset's training pad-and-crop and flip (no rotation or policy)."""
    experts = recipe.model.num_experts
    if experts < get_adapt_mode("sade").min_experts:
        raise NotApplicable(f"adaptation mode 'sade' learns weights of at least 2 experts; checkpoint '{path}' has "
                          f"num_experts {experts}")
    if not bundle.in_memory:
        raise NotApplicable(f"adaptation mode 'sade' needs an in-memory dataset (its views are made from the test "
                          f"images in memory); {bundle.name} is read from image files")
    official = recipe.data.dataset if recipe.data.dataset in OFFICIAL_SGD else "cifar100"
    lr, weight_decay = OFFICIAL_SGD[official]
    pipe = bundle.pipeline
    learn = {"epochs": opt.sade_epochs, "batch_size": opt.sade_batch_size,
             "lr": float(opt.sade_lr) if opt.sade_lr is not None else lr, "weight_decay": weight_decay,
             "padding": pipe.padding if pipe is not None else 0, "flip": pipe.flip if pipe is not None else True}
    defaults = inspect.signature(learn_aggregation_weights).parameters
    report = {**learn, **{k: defaults[k].default for k in ("momentum", "nesterov", "min_weight")},
              "sgd_config": f"official {official}" + ("" if official == recipe.data.dataset else
                                                      f" (no official config for {recipe.data.dataset})")}
    return {"learn": learn, "report": report}


def evaluate_shift(path: str | Path, options: ShiftOptions | None = None, *, device: str = "auto",
                   batch_size: int | None = None, overrides: list[str] | None = None, out: str | Path | None = None,
                   plots: bool = True, quiet: bool = False, html_report: bool = True,
                   logits_cache: str | Path | None = None) -> dict[str, Any]:
    """``balpoe eval CKPT --test-dists ... [--prior ...] [--adapt ...]``.

    Collects the test logits once, evaluates every target set of ``options`` (:class:`ShiftOptions`;
    default: ``ShiftOptions()``) with its adaptation, fits TS / BCTS on source data when there is a
    held-out slice (or when the unlabelled mode needs it), prints a table and writes
    ``shift_eval.json``, ``shift_eval.md`` and reliability diagrams into ``out`` (default: the
    checkpoint's directory; there, with ``html_report``, ``report.html`` is rewritten to include the
    label-shift plot).  The test lists are added to the recipe's ``data.test_lists``; their images are
    a subset of the test split, each list named by its file stem.  ``logits_cache``: a safetensors
    file holding the test logits of this checkpoint and data section, read when it matches and written
    otherwise (:func:`~balpoe.evaluate.logits.cached_logits`; ``balpoe compare`` evaluates every mode
    of a run from one forward pass).  Returns the report dict."""
    opt = ShiftOptions() if options is None else options
    out_dir = Path(out) if out else Path(path).parent
    given_lists = [str(opt.test_lists)] if isinstance(opt.test_lists, (str, Path)) else \
        [str(f) for f in opt.test_lists or []]

    def check_outputs(create: bool) -> Path:
        folder = ensure_writable_dir(out_dir, "label-shift output directory", create=create)
        for name in SHIFT_FILES:  # never another run's results, never a file this command reads
            check_output_path(out_dir / name, "label-shift output", own_run=Path(path).parent, writes=SHIFT_FILES,
                              inputs=[path, *given_lists], create=create)
        return folder
    check_outputs(create=False)  # before anything is read; created once every input has been checked
    rewrite_report = html_report and out_dir.resolve() == Path(path).resolve().parent
    if rewrite_report:
        check_run_report(out_dir)
    dists = parse_test_dists(opt.test_dists)
    priors = [opt.priors] if isinstance(opt.priors, str) else list(opt.priors or [])
    lists = list(given_lists)

    model, recipe, ckpt, bundle, dev = load_for_eval(path, device, batch_size, overrides)
    for given in recipe.data.test_lists:
        found = str(find_list_file(given, recipe.data.root, "data.test_lists"))
        if found not in lists:
            lists.append(found)
    if not dists and not priors and not lists:
        dists = list(TEST_DISTRIBUTIONS)
    counts = bundle.class_counts
    prior_vecs = {n: parse_prior(s, counts) for n, s in zip(prior_names(priors), priors)}
    listed = list_target_sets(bundle.test, lists, taken=[*dists, *prior_vecs])  # before any forward pass
    need_source = opt.adapt == "unlabelled" and opt.calibration != "none"
    if need_source or opt.source != "auto":
        check_source(bundle, opt.source)  # fail before any forward pass
    taus, lam_model = ensemble_prior(recipe)
    mode = get_adapt_mode(opt.adapt)
    sade = sade_settings(recipe, bundle, opt, path) if mode.needs_images else None  # before any forward pass
    out_dir = check_outputs(create=True)

    # 1. the balanced test set, once
    loader = build_loader(bundle, "test", recipe.train.eval_batch_size, recipe.data, train=False)
    key = None if logits_cache is None else \
        f"{file_digest(path)} {dev.type} amp={recipe.train.amp} {json_text(recipe.to_dict()['data'], None)}"
    expert_logits, labels, forward_s = cached_logits(model, loader, dev, recipe.train.amp, logits_cache, key)
    targets = {**target_sets(labels, counts, dists, prior_vecs, seed=opt.seed), **listed}
    many, few = recipe.data.many_threshold, recipe.data.few_threshold

    # 2. source data: post-hoc calibration (TS, BCTS) and the unlabelled selector's calibrator
    src = None
    if need_source or opt.source != "auto" or bundle.holdout is not None:
        src = source_logits(model, bundle, recipe.data, dev, batch_size=recipe.train.eval_batch_size,
                            amp=recipe.train.amp, source=opt.source, lam_model=lam_model, seed=opt.seed)
    ens = MultiExpertNet.ensemble(expert_logits)
    calib = calibration_section(src, ens, labels, counts, lam_model, many, few, group_ranges(recipe.data))

    # 3. every distribution by indexing
    selector = TauSelector(counts, calibration=opt.calibration if opt.adapt == "unlabelled" else "none",
                           estimator=opt.estimator)
    if opt.adapt == "unlabelled" and opt.calibration != "none":
        selector.fit_source(src.logits, src.labels, source_prior=src.prior)
    adapted = {n: None for n in plot_targets(targets)} if mode.adapts and plots else None
    learn = None
    if sade is not None:  # the aggregation weights of each target set, learnt on its images
        def learn(t):
            images = bundle.test.images[t.indices.to(bundle.test.images.device)]
            return {"aggregation": learn_aggregation_weights(model, images, mean=bundle.mean, std=bundle.std,
                                                             seed=opt.seed, device=dev, amp=recipe.train.amp,
                                                             **sade["learn"])}
    start = time.perf_counter()
    rows = evaluate_targets(expert_logits, labels, counts, targets, adapt_mode=opt.adapt, selector=selector,
                            lam_model=lam_model, labels_per_class=opt.labels_per_class, seed=opt.seed,
                            many_threshold=many, few_threshold=few, keep=adapted,
                            group_ranges=group_ranges(recipe.data), mode_inputs=learn)
    derive_s = time.perf_counter() - start

    # 4. accuracy across the protocol distributions for every mode that can run here (the report's plot)
    curve_selectors = {"none": TauSelector(counts, calibration="none"), "known": TauSelector(counts, calibration="none"),
                       "labelled": TauSelector(counts, calibration="none")}
    if src is not None:
        cal = opt.calibration if opt.adapt == "unlabelled" and opt.calibration != "none" else "bcts"
        curve_selectors["unlabelled"] = TauSelector(counts, calibration=cal, estimator=opt.estimator
                                                    ).fit_source(src.logits, src.labels, source_prior=src.prior)
    curves = accuracy_curves(expert_logits, labels, counts, targets, curve_selectors, lam_model=lam_model,
                             labels_per_class=opt.labels_per_class, seed=opt.seed) if dists else None
    if curves is not None and mode.needs_images:  # already evaluated above, not run again
        curves["modes"][opt.adapt] = [rows[n]["acc"] for n in curves["distributions"]]
        curves["labels"][opt.adapt] = curve_label(opt.adapt)

    report: dict[str, Any] = {
        "checkpoint": str(path), "epoch": ckpt["epoch"], "recipe": recipe.name,
        "num_experts": int(expert_logits.shape[0]), "taus": taus,
        "logit_prior_exponent": lam_model, "adapt": opt.adapt,
        "calibration": opt.calibration if opt.adapt == "unlabelled" else None,
        "estimator": opt.estimator if opt.adapt == "unlabelled" else None,
        "labels_per_class": opt.labels_per_class if opt.adapt == "labelled" else None, "seed": opt.seed,
        "sade": sade["report"] if sade is not None else None,
        "forward_seconds": forward_s, "derive_seconds": derive_s, "n_test": int(labels.numel()),
        "source": None if src is None else {"kind": src.kind, "n": int(src.labels.numel()), "note": src.note,
                                            "forward_seconds": src.seconds},
        "post_hoc_calibration": calib,
        "priors": {n: {"spec": s, "prior": [float(p) for p in prior_vecs[n]]}
                   for n, s in zip(prior_names(priors), priors)},
        "test_lists": {n: {"file": t.file, "n": int(t.indices.numel())} for n, t in listed.items()},
        "class_names": list(bundle.class_names),
        "distributions": rows,
        "curves": curves,
    }
    if opt.adapt == "unlabelled":
        report["selector"] = {"temperature": selector.temperature,
                              "p0": [float(p) for p in selector.p0] if selector.p0 is not None else None}
    files = write_reports(report, out_dir, expert_logits, labels, targets, counts, lam_model, adapted, plots)
    report["files"] = [str(f) for f in files]
    if not quiet:
        print_shift_report(report, console)
        print_data_location(recipe, path, overrides)
        console.print("saved " + ", ".join(str(f) for f in files))
    if rewrite_report:
        write_run_report(out_dir)
    return report
