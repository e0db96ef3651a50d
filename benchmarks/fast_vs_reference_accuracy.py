#!/usr/bin/env python
# fast_vs_reference_accuracy.py -- accuracy is not traded for speed: the library's fast training
# path and the official-style reference (reference_balpoe.py) train the same recipe from the same
# seeds; balanced top-1, many/medium/few and ECE on the balanced test set, mean +- std over seeds
# and the paired difference (fast - reference) against the seed-to-seed spread.
# Command (the README's figure: Fashion-MNIST-LT IR100 CPU demo, 12 epochs, 2 seeds, ~6 min on 2 cores):
#   python benchmarks/fast_vs_reference_accuracy.py --epochs 12 --seeds 0 1 --workers 2
"""Accuracy is not traded for speed: the fast path and the official-style reference, same seeds.

    python benchmarks/fast_vs_reference_accuracy.py                      # demo recipe, 2 epochs, seeds 0 1
    python benchmarks/fast_vs_reference_accuracy.py --epochs 12 --seeds 0 1 2 --json acc.json

For every seed both paths train the recipe (default: Fashion-MNIST-LT IR100 BalPoE, the CPU demo)
for ``--epochs`` epochs with the same learning-rate schedule (``build_scheduler``; warm-up
shortened to ``epochs - 1`` if needed) and are evaluated by the same evaluator on the balanced
test set:

* **fast**: ``balpoe.training.build.train`` (what ``balpoe train`` runs) -- device-resident loader
  with batched augmentation, the library's loss, mixup and optimizer, whatever ``train.*`` speed
  switches the recipe sets;
* **reference**: ``reference_balpoe.py`` -- PIL/torchvision DataLoader, per-expert loss loop,
  global-RNG mixup, ``torch.optim.SGD``, fp32 (the model is built by the same code from the same
  seed).

The two paths draw different random numbers (augmentation, shuffling, mixup), so per seed they
differ by training noise; the claim checked is that the mean difference is within the seed-to-seed
spread.  Prints balanced top-1, many/medium/few, ECE per seed, then mean +- std per path and the
paired difference.  Keep ``--epochs`` small on a busy CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from balpoe.data.build import build_data
from balpoe.errors import run_reporting_errors
from balpoe.evaluate.build import evaluate_model
from balpoe.losses.build import expert_taus
from balpoe.models.build import build_model
from balpoe.recipe import load_recipe
from balpoe.runtime.console import console as balpoe_console
from balpoe.runtime.device import resolve_device
from balpoe.training.build import build_scheduler, train

# a sibling in benchmarks/ (a script's own directory is importable)
from reference_balpoe import (official_cudnn_settings, reference_loader, reference_optimizer,  # isort: skip
                              reference_train_epoch)

DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "balpoe" / "fashion_mnist_lt_ir100_cpu_demo.yaml"
METRICS = ("acc", "many", "medium", "few", "ece")


def seed_recipe(path, overrides: list[str], seed: int, epochs: int):
    base = load_recipe(path, overrides)
    warmup = min(base.optim.warmup_epochs, epochs - 1)
    return load_recipe(path, overrides + [f"seed={seed}", f"optim.epochs={epochs}", f"optim.warmup_epochs={warmup}"])


def run_fast(recipe, out_dir: Path) -> dict:
    quiet, balpoe_console.quiet = balpoe_console.quiet, True
    try:
        return train(recipe, out_dir, show_progress=False)
    finally:
        balpoe_console.quiet = quiet


def run_reference(recipe, workers: int) -> dict:
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    device = resolve_device(recipe.train.device)
    torch.manual_seed(recipe.seed)          # the trainer's order: seed, data, model
    np.random.seed(recipe.seed)
    bundle = build_data(recipe.data, device, seed=recipe.seed)
    loader = reference_loader(bundle, recipe, recipe.optim.batch_size, workers, recipe.seed,
                              pin_memory=device.type == "cuda")
    model = build_model(recipe.model, bundle.num_classes, bundle.in_chans).to(device)
    optimizer = reference_optimizer(model, recipe)
    scheduler = build_scheduler(recipe.optim, optimizer)
    with official_cudnn_settings(device):
        for _ in range(recipe.optim.epochs):
            reference_train_epoch(model, loader, bundle.class_counts, expert_taus(recipe), optimizer, device,
                                  recipe.train.mixup_alpha)
            scheduler.step()
    return evaluate_model(model, bundle, recipe, device)


def mean_std(values) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", nargs="?", default=str(DEFAULT_RECIPE))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per run (the recipe's schedule is compressed)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="at least 2 seeds")
    ap.add_argument("--workers", type=int, default=2, help="reference DataLoader workers")
    ap.add_argument("--json", help="write the results as JSON here")
    args = ap.parse_args(argv)
    if len(args.seeds) < 2:
        ap.error("--seeds needs at least 2 seeds (the spread is the point)")
    if args.epochs < 1:
        ap.error("--epochs must be >= 1")

    console = Console() if sys.stdout.isatty() else Console(width=160)

    runs = []
    with tempfile.TemporaryDirectory(prefix="balpoe-acc-") as tmp:
        for seed in args.seeds:
            recipe = seed_recipe(args.recipe, args.overrides, seed, args.epochs)
            for mode in ("fast", "reference"):
                console.print(f"seed {seed}: training {mode} ({args.epochs} epochs)")
                rep = run_fast(recipe, Path(tmp) / f"fast-{seed}") if mode == "fast" else \
                    run_reference(recipe, args.workers)
                runs.append({"seed": seed, "mode": mode, **{k: float(rep[k]) for k in METRICS}})

    table = Table(title=f"{recipe.name}: balanced test set after {args.epochs} epoch(s)")
    for col in ("seed", "path", *METRICS):
        table.add_column(col, justify="right")
    for r in runs:
        table.add_row(str(r["seed"]), r["mode"], *[f"{r[k]:.2f}" for k in METRICS])
    summary = {}
    for mode in ("fast", "reference"):
        summary[mode] = {k: mean_std([r[k] for r in runs if r["mode"] == mode]) for k in METRICS}
        table.add_row("mean±std", mode, *[f"{m:.2f}±{s:.2f}" for m, s in summary[mode].values()])
    diffs = {k: mean_std([f[k] - g[k] for f, g in zip(runs[0::2], runs[1::2])]) for k in METRICS}
    table.add_row("paired", "fast-ref", *[f"{m:+.2f}±{s:.2f}" for m, s in diffs.values()])
    console.print(table)
    for k in ("acc", "ece"):
        (m, s), spread = diffs[k], max(summary["fast"][k][1], summary["reference"][k][1])
        console.print(f"{k}: fast - reference = {m:+.2f} (paired std {s:.2f}); seed-to-seed std "
                      f"{spread:.2f} -> {'within' if abs(m) <= 2 * max(spread, s, 1e-9) else 'OUTSIDE'} 2 std")
    result = {"benchmark": "fast_vs_reference_accuracy", "recipe": recipe.name, "epochs": args.epochs,
              "seeds": args.seeds, "runs": runs,
              "summary": {m: {k: {"mean": v[0], "std": v[1]} for k, v in s.items()} for m, s in summary.items()},
              "paired_difference": {k: {"mean": v[0], "std": v[1]} for k, v in diffs.items()}}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    run_reporting_errors(main)
