"""Evaluation: logits of the test set computed once, every metric derived from them.

:func:`collect_logits` runs the model over a loader and keeps the per-expert logits
``[E, N, C]``; :func:`report_from_logits` turns ensemble logits (their mean) into top-1,
many/medium/few accuracy, ECE (15 bins), MCE, NLL and Brier score.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from balpoe.checkpoint import atomic_write_text, load_checkpoint
from balpoe.console import console, metrics_table
from balpoe.data.build import DataBundle, build_data, build_loader
from balpoe.metrics import accuracy, classification_report
from balpoe.precision import autocast, use_amp
from balpoe.recipe import Recipe, recipe_from_dict

REPORT_COLUMNS = ["n", "acc", "many", "medium", "few", "ece", "mce", "nll", "brier"]


@torch.no_grad()
def collect_logits(model: torch.nn.Module, loader, device: torch.device, amp: bool = False):
    """Per-expert logits ``[E, N, C]`` (float32, CPU) and labels ``[N]`` of everything in ``loader``;
    ``amp``: bf16 autocast where the device has native bf16 (:func:`balpoe.precision.use_amp`)."""
    model.eval()
    amp = use_amp(device, amp, warn=False)
    outs, labels = [], []
    for x, y in loader:
        with autocast(device, amp):
            logits = model(x.to(device, non_blocking=True))
        outs.append(logits.float())
        labels.append(y)
    return torch.cat(outs, 1).cpu(), torch.cat(labels).cpu()


def report_from_logits(expert_logits: torch.Tensor, labels: torch.Tensor, class_counts: torch.Tensor,
                       many_threshold: int = 100, few_threshold: int = 20) -> dict:
    """Ensemble metrics plus each expert's top-1 accuracy."""
    report = classification_report(expert_logits.mean(0), labels, class_counts, many_threshold, few_threshold)
    report["expert_acc"] = [accuracy(e, labels) for e in expert_logits]
    return report


def evaluate_model(model: torch.nn.Module, bundle: DataBundle, recipe: Recipe, device: torch.device,
                   split: str = "test") -> dict:
    loader = build_loader(bundle, split, recipe.train.eval_batch_size, recipe.data, train=False)
    logits, labels = collect_logits(model, loader, device, recipe.train.amp)
    return report_from_logits(logits, labels, bundle.class_counts, recipe.data.many_threshold,
                              recipe.data.few_threshold)


def print_report(report: dict, title: str) -> None:
    console.print(metrics_table(title, {"ensemble": report}, REPORT_COLUMNS))
    if len(report.get("expert_acc", [])) > 1:
        console.print("expert top-1: " + ", ".join(f"{a:.2f}" for a in report["expert_acc"]))


def load_model(checkpoint: str | Path | dict, device: torch.device | str = "cpu"):
    """Rebuild the model of a checkpoint and load its weights; returns ``(model, recipe, ckpt)``."""
    from balpoe import stage2
    from balpoe.trainer import build_model
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    recipe = recipe_from_dict(ckpt["recipe"])
    if recipe.stage == 2:
        model = stage2.build_stage2_model(recipe, None, ckpt=ckpt)
    else:
        model = build_model(recipe, ckpt["num_classes"], ckpt["in_chans"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), recipe, ckpt


def load_for_eval(path: str | Path, device: str = "auto", batch_size: int | None = None,
                  overrides: list[str] | None = None):
    """Checkpoint -> ``(model, recipe, ckpt, bundle, device)`` for evaluation: recipe overrides
    applied, the data rebuilt as in training (same seed, so the same LT split and holdout) and
    ``bundle.class_counts`` taken from the checkpoint."""
    from balpoe.recipe import apply_overrides
    from balpoe.trainer import resolve_device
    ckpt = load_checkpoint(path)
    if overrides:
        ckpt["recipe"] = recipe_from_dict(apply_overrides(ckpt["recipe"], overrides)).to_dict()
    dev = resolve_device(device)
    model, recipe, ckpt = load_model(ckpt, dev)
    if batch_size:
        recipe.train.eval_batch_size = batch_size
    bundle = build_data(recipe.data, dev, seed=recipe.seed)
    bundle.class_counts = torch.tensor(ckpt["class_counts"])
    return model, recipe, ckpt, bundle, dev


def evaluate_checkpoint(path: str | Path, device: str = "auto", batch_size: int | None = None,
                        overrides: list[str] | None = None, out: str | Path | None = None, *,
                        test_dists=None, prior=None, adapt: str | None = None, **shift_options) -> dict:
    """``balpoe eval CHECKPOINT``: top-1, many/medium/few, ECE, MCE, NLL, Brier on the balanced test
    set; prints a table and writes ``eval.json`` next to the checkpoint (or to ``out``).

    With ``test_dists`` (``"all"`` or names), ``prior`` (a spec or a list of specs) or ``adapt``
    (``none|known|unlabelled|labelled``) it evaluates under test label shift instead
    (:func:`balpoe.shift_eval.evaluate_shift`; ``out`` is then a directory and ``shift_options``
    are its keywords ``calibration``, ``source``, ``labels_per_class``, ``seed``, ``plots``)."""
    if test_dists is not None or prior is not None or adapt is not None or shift_options:
        from balpoe.shift_eval import evaluate_shift
        priors = [prior] if isinstance(prior, str) else prior
        return evaluate_shift(path, test_dists=test_dists, priors=priors, adapt_mode=adapt or "none",
                              device=device, batch_size=batch_size, overrides=overrides, out=out, **shift_options)
    model, recipe, ckpt, bundle, dev = load_for_eval(path, device, batch_size, overrides)
    report = evaluate_model(model, bundle, recipe, dev)
    report["checkpoint"] = str(path)
    report["epoch"] = ckpt["epoch"]
    out_path = Path(out) if out else Path(path).with_name("eval.json")
    atomic_write_text(json.dumps(report, indent=2) + "\n", out_path)
    print_report(report, title=f"{recipe.name} (epoch {ckpt['epoch']}): balanced test set")
    console.print(f"saved {out_path}")
    return report
