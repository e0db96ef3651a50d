"""Checkpoint + recipe -> model, data and evaluation: ``balpoe eval CHECKPOINT``.

:func:`evaluate_checkpoint` rebuilds the model and the data of a checkpoint from its resolved
recipe, computes the test logits once (:func:`~balpoe.evaluate.logits.collect_logits`) and
derives top-1, many/medium/few accuracy, ECE (15 bins), MCE, NLL and Brier score from them.
:func:`source_logits` gives the labelled source data that post-hoc calibration is fitted on.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from pathlib import Path

import torch

from balpoe.data.build import build_data, build_loader
from balpoe.data.bundle import DataBundle
from balpoe.data.lt import stratified_holdout
from balpoe.errors import BalpoeError
from balpoe.evaluate.logits import collect_logits
from balpoe.evaluate.report import print_report, report_from_logits
from balpoe.losses.priors import balance_logits
from balpoe.models.build import build_model
from balpoe.models.multi_expert import MultiExpertNet
from balpoe.recipe import Recipe, apply_overrides, recipe_from_dict
from balpoe.runtime.checkpoint import atomic_write_text, load_checkpoint
from balpoe.runtime.console import console
from balpoe.runtime.device import resolve_device

#: where the labelled source data for calibration come from
SOURCES = ("auto", "holdout", "train")
#: fraction of the training split used as calibration data when the recipe has no holdout
TRAIN_SLICE_FRACTION = 0.1


def load_model(checkpoint: str | Path | dict, device: torch.device | str = "cpu"):
    """Rebuild the model of a checkpoint and load its weights; returns ``(model, recipe, ckpt)``."""
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    recipe = recipe_from_dict(ckpt["recipe"])
    model = build_model(recipe.model, ckpt["num_classes"], ckpt["in_chans"], pretrained=False,
                        stage2_classifier=recipe.stage2.classifier if recipe.stage == 2 else None)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), recipe, ckpt


def load_for_eval(path: str | Path, device: str = "auto", batch_size: int | None = None,
                  overrides: list[str] | None = None):
    """Checkpoint -> ``(model, recipe, ckpt, bundle, device)`` for evaluation: recipe overrides
    applied, the data rebuilt as in training (same seed, so the same LT split and holdout) and
    ``bundle.class_counts`` taken from the checkpoint."""
    ckpt = load_checkpoint(path)
    if overrides:
        ckpt["recipe"] = recipe_from_dict(apply_overrides(ckpt["recipe"], overrides)).to_dict()
    dev = resolve_device(device, what="device")
    model, recipe, ckpt = load_model(ckpt, dev)
    if batch_size:
        recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, eval_batch_size=batch_size))
    bundle = build_data(recipe.data, dev, seed=recipe.seed)
    bundle.class_counts = torch.tensor(ckpt["class_counts"])
    return model, recipe, ckpt, bundle, dev


def evaluate_model(model: torch.nn.Module, bundle: DataBundle, recipe: Recipe, device: torch.device,
                   split: str = "test") -> dict:
    """The report of ``split`` (:func:`~balpoe.evaluate.report.report_from_logits`)."""
    loader = build_loader(bundle, split, recipe.train.eval_batch_size, recipe.data, train=False)
    logits, labels = collect_logits(model, loader, device, recipe.train.amp)
    return report_from_logits(logits, labels, bundle.class_counts, recipe.data.many_threshold,
                              recipe.data.few_threshold)


def evaluate_checkpoint(path: str | Path, device: str = "auto", batch_size: int | None = None,
                        overrides: list[str] | None = None, out: str | Path | None = None) -> dict:
    """``balpoe eval CHECKPOINT``: top-1, many/medium/few, ECE, MCE, NLL, Brier on the balanced test
    set; prints a table and writes ``eval.json`` next to the checkpoint (or to ``out``)."""
    model, recipe, ckpt, bundle, dev = load_for_eval(path, device, batch_size, overrides)
    report = evaluate_model(model, bundle, recipe, dev)
    report["checkpoint"] = str(path)
    report["epoch"] = ckpt["epoch"]
    out_path = Path(out) if out else Path(path).with_name("eval.json")
    atomic_write_text(json.dumps(report, indent=2) + "\n", out_path)
    print_report(report, title=f"{recipe.name} (epoch {ckpt['epoch']}): balanced test set")
    console.print(f"saved {out_path}")
    return report


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
        counts = torch.bincount(self.labels.cpu(), minlength=self.logits.shape[1]).double()
        return counts / counts.sum()


def check_source(bundle: DataBundle, source: str) -> str:
    """Which source data ``source`` (:data:`SOURCES`) resolves to for this data bundle:
    ``holdout`` or ``train_slice``; a one-line error when there is none."""
    if source not in SOURCES:
        raise BalpoeError(f"calibration source must be one of {', '.join(SOURCES)}; got {source!r}")
    if bundle.holdout is not None and source in ("auto", "holdout"):
        return "holdout"
    if source == "holdout":
        raise BalpoeError("calibration source 'holdout': the checkpoint's recipe has no held-out slice "
                          "(data.holdout_fraction is 0); retrain with data.holdout_fraction: 0.1, or use the "
                          "training slice (source 'train')")
    if not bundle.in_memory:
        raise BalpoeError(f"no labelled source data for calibration: {bundle.name} has no held-out slice "
                          "(data.holdout_fraction is 0); retrain with data.holdout_fraction: 0.1")
    return "train_slice"


def source_logits(model: torch.nn.Module, bundle: DataBundle, recipe: Recipe, device: torch.device,
                  source: str = "auto", lam_model: float = 0.0, seed: int = 0) -> SourceSet:
    """Balanced ensemble logits of the labelled source data: the recipe's held-out slice of the
    long-tailed training split (``data.holdout_fraction > 0``), or, without one, a stratified
    :data:`TRAIN_SLICE_FRACTION` slice of the training split the model *was trained on*, with a
    warning: the model is over-confident on images it has seen, so a temperature fitted there is
    under-estimated."""
    kind = check_source(bundle, source)
    if kind == "holdout":
        b = bundle
        note = (f"held-out slice of the long-tailed training split (data.holdout_fraction = "
                f"{recipe.data.holdout_fraction}), not trained on")
    else:
        _, idx = stratified_holdout(bundle.train.labels.cpu(), TRAIN_SLICE_FRACTION, seed=seed, min_per_class=1)
        b = dataclasses.replace(bundle, holdout=bundle.train.subset(idx))
        note = (f"{TRAIN_SLICE_FRACTION:.0%} stratified slice of the training split the model WAS trained on "
                "(no data.holdout_fraction): the temperature is under-estimated")
        warnings.warn(f"calibration source data: {note}; retrain with data.holdout_fraction: 0.1 for an "
                      "honest held-out slice", UserWarning, stacklevel=2)
    loader = build_loader(b, "holdout", recipe.train.eval_batch_size, recipe.data, train=False)
    start = time.perf_counter()
    expert, labels = collect_logits(model, loader, device, recipe.train.amp)
    seconds = time.perf_counter() - start
    logits = balance_logits(MultiExpertNet.ensemble(expert), bundle.class_counts, lam_model)
    return SourceSet(logits, labels, kind, note, seconds)
