"""Checkpoint + recipe -> model, data and evaluation: ``balpoe eval CHECKPOINT``.

:func:`evaluate_checkpoint` rebuilds the model and the data of a checkpoint from its resolved
recipe, computes the test logits once (:func:`~balpoe.evaluate.logits.collect_logits`) and
derives top-1, many/medium/few accuracy, ECE (15 bins), MCE, NLL and Brier score from them.
:func:`source_logits` gives the labelled source data that post-hoc calibration is fitted on.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import timm
import torch
import torchvision

import balpoe
from balpoe.data.build import build_data, build_loader, data_location, stored_location_keys, stored_origin
from balpoe.data.bundle import DataBundle
from balpoe.data.lt import stratified_holdout
from balpoe.errors import BalpoeError, check_choice
from balpoe.evaluate.calibration import apply_calibration, fit_post_hoc
from balpoe.evaluate.run_report import write_html_report
from balpoe.evaluate.logits import collect_logits
from balpoe.evaluate.report import analysis_from_logits, print_report, report_from_logits
from balpoe.losses.build import expert_taus, model_prior_exponent
from balpoe.losses.priors import balance_logits, empirical_prior
from balpoe.models.build import build_model
from balpoe.models.multi_expert import MultiExpertNet
from balpoe.models.weights import load_state
from balpoe.recipe import DataConfig, Recipe, apply_overrides, recipe_from_dict
from balpoe.runtime.checkpoint import load_checkpoint, write_json
from balpoe.runtime.files import check_output_path
from balpoe.runtime.console import console
from balpoe.runtime.device import device_name, resolve_device
from balpoe.runtime.precision import amp_dtype

#: where the labelled source data for calibration come from
SOURCES = ("auto", "holdout", "train")
#: fraction of the training split used as calibration data when the recipe has no holdout
TRAIN_SLICE_FRACTION = 0.1


def load_model(checkpoint: str | Path | dict, device: torch.device | str = "cpu"):
    """Rebuild the model of a checkpoint and load its weights; returns ``(model, recipe, ckpt)``."""
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    where = "the checkpoint" if isinstance(checkpoint, dict) else f"checkpoint '{checkpoint}'"
    try:
        recipe = recipe_from_dict(ckpt["recipe"])
    except BalpoeError as e:
        raise BalpoeError(f"{where} holds an invalid recipe: {e}") from None
    model = build_model(recipe.model, ckpt["num_classes"], ckpt["in_chans"], pretrained=False,
                        stage2_classifier=recipe.stage2.classifier if recipe.stage == 2 else None,
                        stage2_weight_decay_target=recipe.stage2.weight_decay_target)
    load_state(model, ckpt["model"], f"the weights in {where} do not fit its recipe's model section")
    return model.to(device).eval(), recipe, ckpt


#: sections of a checkpoint's recipe that fix the weights' shapes and meaning: overrides may not change them
_FIXED_SECTIONS = ("model", "loss", "stage", "stage2.classifier", "stage2.weight_decay_target")
#: model keys that do not change the weights (a batched checkpoint loads into the looped model and back)
_FREE_MODEL_KEYS = ("pretrained_file", "pretrained", "pretrained_strict", "batched_experts")


def _conflicting_key(before: dict, after: dict) -> tuple[str, object, object] | None:
    for section in _FIXED_SECTIONS:
        head, _, sub = section.partition(".")
        a, b = before.get(head), after.get(head)
        if sub:
            a, b = (a or {}).get(sub), (b or {}).get(sub)
        if isinstance(a, dict) and isinstance(b, dict):
            for k in b:
                if k not in _FREE_MODEL_KEYS and a.get(k) != b.get(k):
                    return f"{section}.{k}", a.get(k), b.get(k)
        elif a != b:
            return section, a, b
    return None


def load_for_eval(path: str | Path, device: str = "auto", batch_size: int | None = None,
                  overrides: list[str] | None = None):
    """Checkpoint -> ``(model, recipe, ckpt, bundle, device)`` for evaluation: recipe overrides
    applied (those that would change the network are one-line errors), the data rebuilt as in
    training (same seed, so the same LT split and holdout; its classes and channels must be the
    checkpoint's) and ``bundle.class_counts`` taken from the checkpoint.  An error reading the data
    says which location keys came from the checkpoint's stored recipe rather than from
    ``overrides``; :func:`print_data_location` says where they were read from."""
    if batch_size is not None and batch_size < 1:
        raise BalpoeError(f"evaluation batch size must be >= 1, got {batch_size}")
    dev = resolve_device(device, what="device")
    ckpt = load_checkpoint(path)
    if overrides:
        before = recipe_from_dict(ckpt["recipe"]).to_dict()
        after = recipe_from_dict(apply_overrides(ckpt["recipe"], overrides)).to_dict()
        conflict = _conflicting_key(before, after)
        if conflict:
            key, a, b = conflict
            raise BalpoeError(f"recipe key '{key}' is {b!r} but checkpoint '{path}' was trained with {a!r}; "
                              "overrides may change the data location and evaluation settings, not the network")
        ckpt["recipe"] = after
    model, recipe, ckpt = load_model(ckpt, dev)
    if batch_size:
        recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, eval_batch_size=batch_size))
    try:
        bundle = build_data(recipe.data, dev, seed=recipe.seed)
    except BalpoeError as e:  # say when the checkpoint, not the user, chose where the data are read
        stored = stored_location_keys(recipe.data, given_keys(overrides))
        raise BalpoeError(f"{e} ({stored_origin(stored, f'checkpoint {path!r}')})" if stored else str(e)) from None
    if (bundle.num_classes, bundle.in_chans) != (ckpt["num_classes"], ckpt["in_chans"]):
        raise BalpoeError(f"recipe key 'data.dataset': {recipe.data.dataset} has {bundle.num_classes} classes and "
                          f"{bundle.in_chans} channels, checkpoint '{path}' was trained on {ckpt['num_classes']} and "
                          f"{ckpt['in_chans']}")
    bundle.class_counts = torch.tensor(ckpt["class_counts"])
    return model, recipe, ckpt, bundle, dev


def given_keys(overrides: list[str] | None) -> set[str]:
    """The recipe keys that ``KEY=VALUE`` overrides set."""
    return {o.split("=", 1)[0].strip() for o in overrides or []}


def print_data_location(recipe: Recipe, path, overrides: list[str] | None) -> None:
    """One line: where the evaluated data were read from, and which location keys the checkpoint's
    stored recipe chose (:func:`~balpoe.data.build.data_location`)."""
    console.print(data_location(recipe.data, given_keys(overrides), f"checkpoint {str(path)!r}"), markup=False,
                  highlight=False, soft_wrap=True)


def environment(device: torch.device, amp: bool) -> dict:
    """Versions, device and dtype the numbers were computed with (for reports): balpoe, torch,
    torchvision, timm, numpy, python, the CUDA and cuDNN versions torch was built with (None on a
    CPU-only build) and the device's name."""
    dtype = amp_dtype(device, amp, warn=False)
    try:
        version = importlib.metadata.version("balpoe")
    except importlib.metadata.PackageNotFoundError:   # run from a source tree that is not installed
        version = balpoe.__version__
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"balpoe": version, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "cuda": torch.version.cuda, "cudnn": cudnn,
            "device": device_name(device),
            "dtype": f"{str(dtype).replace('torch.', '')} autocast" if dtype is not None else "float32"}


def ensemble_prior(recipe: Recipe) -> tuple[list[float], float]:
    """The per-expert taus of the recipe's network (:func:`~balpoe.losses.build.expert_taus`) and
    ``lambda_m``, the power of ``pi_train`` its ensemble logits keep
    (:func:`~balpoe.losses.build.model_prior_exponent`)."""
    taus = expert_taus(recipe.loss, recipe.model.num_experts)
    return taus, model_prior_exponent(taus, recipe.data.sampler, recipe.stage2 if recipe.stage == 2 else None,
                                      recipe.loss.name)


def group_ranges(data: DataConfig) -> tuple[int, int] | None:
    """The class-index group boundaries of ``data.groups: ranges`` (None: groups by training count)."""
    return tuple(data.group_ranges) if data.groups == "ranges" else None


def analysis_of(model: torch.nn.Module, bundle: DataBundle, data: DataConfig, device: torch.device,
                expert_logits: torch.Tensor, labels: torch.Tensor, *, batch_size: int, amp: bool = False,
                taus: list[float] | None = None, lam_model: float = 0.0) -> dict:
    """The run report's analysis (:func:`~balpoe.evaluate.report.analysis_from_logits`) with
    reliability after TS and BCTS fitted on the recipe's held-out slice, or else on a slice of the
    training split (said in ``calibration_note``; image-file datasets without a holdout: none).
    ``taus``, ``lam_model``: the network's (:func:`ensemble_prior`)."""
    calibrated, note = {}, ("no post-hoc calibration: no labelled source data (set data.holdout_fraction, or give "
                            "a validation split)")
    if bundle.holdout is not None or bundle.in_memory:
        src = source_logits(model, bundle, data, device, batch_size=batch_size, amp=amp, lam_model=lam_model,
                            warn=False)
        fits = fit_post_hoc(src.logits, src.labels, src.prior)
        bal = balance_logits(MultiExpertNet.ensemble(expert_logits), bundle.class_counts, lam_model).double()
        calibrated = {name: (apply_calibration(bal, f["temperature"], f["bias"]), f["temperature"])
                      for name, f in fits.items()}
        note = f"TS and BCTS fitted by NLL on {len(src.labels)} images: {src.note}"
    out = analysis_from_logits(expert_logits, labels, bundle.class_counts, bundle.class_names,
                               many_threshold=data.many_threshold, few_threshold=data.few_threshold,
                               taus=taus, calibrated=calibrated, group_ranges=group_ranges(data))
    out["calibration_note"] = note
    out["environment"] = environment(device, amp)
    return out


def evaluate_model(model: torch.nn.Module, bundle: DataBundle, data: DataConfig, device: torch.device, *,
                   batch_size: int, amp: bool = False, taus: list[float] | None = None, lam_model: float = 0.0,
                   split: str = "test", analysis: bool = False) -> dict:
    """The report of ``split`` (:func:`~balpoe.evaluate.report.report_from_logits`) of the data the
    recipe's ``data`` section describes (its loader, many/medium/few groups), in batches of
    ``batch_size`` (``train.eval_batch_size``) under ``amp`` (``train.amp``); with ``analysis`` also
    what the run report draws (:func:`analysis_of`, given the network's ``taus`` and ``lam_model``,
    :func:`ensemble_prior`)."""
    loader = build_loader(bundle, split, batch_size, data, train=False)
    logits, labels = collect_logits(model, loader, device, amp)
    report = report_from_logits(logits, labels, bundle.class_counts, data.many_threshold, data.few_threshold,
                                group_ranges(data))
    if analysis:
        report["analysis"] = analysis_of(model, bundle, data, device, logits, labels, batch_size=batch_size, amp=amp,
                                         taus=taus, lam_model=lam_model)
    return report


def validation_metrics(model: torch.nn.Module, bundle: DataBundle, data: DataConfig, device: torch.device, *,
                       batch_size: int, amp: bool = False) -> dict:
    """Metrics of the validation split (``bundle.holdout``: ``data.val_root`` / ``data.val_list`` /
    the ``data.holdout_fraction`` slice) for model selection, of the ensemble logits the test
    report scores: ``val_balanced_acc`` (%, the mean over the classes present of each class's
    recall) and ``val_nll`` (the mean over the classes present of each class's mean NLL), so that
    a long-tailed validation split scores the model as the balanced test set does."""
    loader = build_loader(bundle, "holdout", batch_size, data, train=False)
    expert, labels = collect_logits(model, loader, device, amp)
    logits = MultiExpertNet.ensemble(expert).double()
    num_classes = logits.shape[1]
    n = torch.bincount(labels, minlength=num_classes).double()
    present = n > 0
    hits = torch.bincount(labels, weights=(logits.argmax(1) == labels).double(), minlength=num_classes)
    nll = torch.bincount(labels, weights=torch.nn.functional.cross_entropy(logits, labels, reduction="none"),
                         minlength=num_classes)
    return {"val_balanced_acc": float((hits[present] / n[present]).mean() * 100.0),
            "val_nll": float((nll[present] / n[present]).mean())}


def write_run_report(run_dir: str | Path) -> Path | None:
    """``RUN_DIR/report.html`` (:func:`~balpoe.evaluate.run_report.write_html_report`) when
    ``run_dir`` is a run directory (holds ``recipe.yaml``); returns its path or None."""
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file():
        return None
    path = write_html_report(run_dir)
    console.print(f"saved {path}")
    return path


def checkpoint_line(path: str | Path, ckpt: dict, recipe: Recipe) -> str:
    """Which checkpoint is evaluated: its file, epoch and, for a run with validation, how it was chosen."""
    line = f"evaluating {path}: epoch {ckpt['epoch']} of {recipe.optim.epochs}"
    sel = ckpt.get("selection")
    if isinstance(sel, dict) and isinstance(sel.get("epoch"), int) and isinstance(sel.get("value"), float):
        if sel["epoch"] == ckpt["epoch"]:
            line += f", the best by {sel.get('metric', 'validation')} ({sel['value']:.4f}) on the validation split"
        else:
            line += (f"; the best by {sel.get('metric', 'validation')} on the validation split is epoch {sel['epoch']} "
                     f"({sel['value']:.4f}, best.pt)")
    return line


def check_run_report(run_dir: str | Path) -> None:
    """Before any work: ``RUN_DIR/report.html`` can be written by :func:`write_run_report` (not a
    link, not a directory; nothing is created)."""
    run_dir = Path(run_dir)
    if (run_dir / "recipe.yaml").is_file():
        check_output_path(run_dir / "report.html", "report output", own_run=run_dir, writes=["report.html"],
                          create=False)


def evaluate_checkpoint(path: str | Path, device: str = "auto", batch_size: int | None = None,
                        overrides: list[str] | None = None, out: str | Path | None = None, *,
                        report: bool = True) -> dict:
    """``balpoe eval CHECKPOINT``: top-1, many/medium/few, ECE, MCE, NLL, Brier on the balanced test
    set, and the analysis the run report draws; prints a table and writes ``eval.json`` next to the
    checkpoint (or to ``out``, checked writable before the evaluation starts) and, when that is the
    checkpoint's run directory and ``report``, ``report.html`` there."""
    default = "eval_best.json" if Path(path).name == "best.pt" else "eval.json"  # best.pt beside last.pt
    out_path = Path(out) if out else Path(path).with_name(default)
    check = dict(inputs=[path], own_run=Path(path).parent, writes=[default])
    check_output_path(out_path, "evaluation output", create=False, **check)   # before anything is read
    rewrite_report = report and out_path.resolve().parent == Path(path).resolve().parent
    if rewrite_report:
        check_run_report(out_path.parent)
    model, recipe, ckpt, bundle, dev = load_for_eval(path, device, batch_size, overrides)
    check_output_path(out_path, "evaluation output", **check)                 # created before the evaluation
    console.print(checkpoint_line(path, ckpt, recipe), highlight=False)
    taus, lam = ensemble_prior(recipe)
    result = evaluate_model(model, bundle, recipe.data, dev, batch_size=recipe.train.eval_batch_size,
                            amp=recipe.train.amp, taus=taus, lam_model=lam, analysis=True)
    result["checkpoint"] = str(path)
    result["epoch"] = ckpt["epoch"]
    if isinstance(ckpt.get("selection"), dict):
        result["selection"] = ckpt["selection"]
    write_json(result, out_path)
    print_report(result, title=f"{recipe.name} (epoch {ckpt['epoch']}): balanced test set")
    print_data_location(recipe, path, overrides)
    console.print(f"saved {out_path}")
    if rewrite_report:
        write_run_report(out_path.parent)
    return result


# ------------------------------------------------------------------------------------------------
# Labelled source data for post-hoc calibration


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
        """The source label distribution (class frequencies, float64 [C]): long-tailed for both kinds."""
        return empirical_prior(self.labels, self.logits.shape[1])


def check_source(bundle: DataBundle, source: str) -> str:
    """Which source data ``source`` (:data:`SOURCES`) resolves to for this data bundle:
    ``holdout`` or ``train_slice``; a one-line error when there is none."""
    check_choice("calibration source", source, SOURCES)
    if bundle.holdout is not None and source in ("auto", "holdout"):
        return "holdout"
    if source == "holdout":
        raise BalpoeError("calibration source 'holdout': the checkpoint's recipe has no held-out slice "
                          "(data.holdout_fraction is 0) and no validation split; retrain with data.holdout_fraction: "
                          "0.1, give a validation split (data.val_root / data.val_list), or use the training slice "
                          "(source 'train')")
    if not bundle.in_memory:
        raise BalpoeError(f"no labelled source data for calibration: {bundle.name} has no held-out slice "
                          "(data.holdout_fraction is 0) and no validation split; retrain with data.holdout_fraction: "
                          "0.1, or give a validation split (data.val_root / data.val_list)")
    return "train_slice"


def source_logits(model: torch.nn.Module, bundle: DataBundle, data: DataConfig, device: torch.device, *,
                  batch_size: int, amp: bool = False, source: str = "auto", lam_model: float = 0.0, seed: int = 0,
                  warn: bool = True) -> SourceSet:
    """Balanced ensemble logits (``lam_model``: :func:`ensemble_prior`) of the labelled source data,
    in batches of ``batch_size`` under ``amp``: the dataset's validation split
    (``data.val_root`` / ``data.val_list`` / ``ImageNet_LT_val.txt``), else the recipe's held-out slice
    of the long-tailed training split (``data.holdout_fraction > 0``), or, without one, a stratified
    :data:`TRAIN_SLICE_FRACTION` slice of the training split the model *was trained on*, with a
    warning: the model is over-confident on images it has seen, so a temperature fitted there is
    under-estimated."""
    kind = check_source(bundle, source)
    if kind == "holdout":
        b = bundle
        note = (f"{bundle.holdout_note}, not trained on" if bundle.holdout_note else
                f"held-out slice of the long-tailed training split (data.holdout_fraction = "
                f"{data.holdout_fraction}), not trained on")
    else:
        _, idx = stratified_holdout(bundle.train.labels.cpu(), TRAIN_SLICE_FRACTION, seed=seed, min_per_class=1)
        b = dataclasses.replace(bundle, holdout=bundle.train.subset(idx))
        note = (f"{TRAIN_SLICE_FRACTION:.0%} stratified slice of the training split the model WAS trained on "
                "(no data.holdout_fraction): the temperature is under-estimated")
        if warn:
            warnings.warn(f"calibration source data: {note}; retrain with data.holdout_fraction: 0.1 for an "
                          "honest held-out slice", UserWarning, stacklevel=2)
    loader = build_loader(b, "holdout", batch_size, data, train=False)
    start = time.perf_counter()
    expert, labels = collect_logits(model, loader, device, amp)
    seconds = time.perf_counter() - start
    logits = balance_logits(MultiExpertNet.ensemble(expert), bundle.class_counts, lam_model)
    return SourceSet(logits, labels, kind, note, seconds)
