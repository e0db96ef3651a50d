"""The training loop, stage-agnostic: a :class:`Plan` in, epochs out.

:func:`balpoe.training.build.build_plan` turns a recipe into a :class:`Plan` (data loader, model,
loss, optimizer, schedule, how the model trains); :func:`train_model` runs it: per epoch
:func:`train_one_epoch`, a line in ``OUT/metrics.jsonl``, and every ``checkpoint_every`` epochs and
at the end an atomic ``OUT/last.pt``; then the final evaluation into ``OUT/eval.json``.  Inside
an epoch nothing synchronises with the host: the loss is accumulated on the device and read once
per epoch.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from balpoe.data.mixup import mixup_batch, mixup_targets
from balpoe.errors import BalpoeError
from balpoe.runtime import distributed as dist
from balpoe.runtime.checkpoint import FORMAT, atomic_save, atomic_write_text, rng_state, set_rng_state
from balpoe.runtime.console import console, training_progress
from balpoe.runtime.precision import autocast
from balpoe.runtime.seeding import numpy_stream, torch_stream


@dataclass
class Plan:
    """Everything one training run needs (built from a recipe by :func:`balpoe.training.build.build_plan`)."""
    name: str
    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: Any                                  # DeviceLoader or FolderLoader: set_epoch, num_samples, iter
    device: torch.device
    epochs: int
    seed: int
    num_classes: int
    set_train_mode: Callable[[nn.Module], Any]   # model.train(), or MiSLAS stage 2's shifted-BN mode
    evaluate: Callable[[nn.Module], dict]        # the balanced test set's report
    checkpoint_meta: dict                        # saved with every checkpoint: the resolved recipe, taus, counts, ...
    recipe_yaml: str                             # the resolved recipe, written to OUT/recipe.yaml
    mixup_alpha: float = 0.0
    amp: bool = False
    checkpoint_every: int = 10
    eval_every: int = 0
    compile: bool = False
    compile_mode: str = "default"
    sync_bn: bool = False
    finish: list = field(default_factory=list)   # callables (out_dir, report) run on rank 0 after the final evaluation


def train_one_epoch(model: nn.Module, loader, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    num_classes: int, mixup_alpha: float, seed: int, epoch: int, amp: bool,
                    progress=None, task=None) -> dict:
    """One pass over ``loader``; returns ``{'loss', 'images', 'seconds'}`` (one host sync)."""
    device = next(model.parameters()).device
    # Per-epoch streams (exactly resumable): one mixup lambda per global batch, the same on every
    # rank; the pairing permutation per rank.
    mix_rng = numpy_stream(seed, epoch, "mixup_lambda")
    mix_gen = torch_stream(seed, epoch, "mixup_pairs", dist.rank(), device=device)
    loss_sum = torch.zeros((), device=device)
    images, start = 0, time.perf_counter()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        target = y
        if mixup_alpha > 0:
            x, y_a, y_b, lam = mixup_batch(x, y, mixup_alpha, mix_rng, mix_gen)
            target = mixup_targets(y_a, y_b, lam, num_classes)
        with autocast(device, amp):
            logits = model(x)
        loss = criterion(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * x.shape[0]
        images += x.shape[0]
        if progress is not None:
            progress.advance(task, x.shape[0] * dist.world_size())  # global images (rank 0's bar)
    loss_sum = dist.all_reduce_sum(loss_sum)
    total = dist.all_reduce_sum(torch.tensor(float(images), device=device))
    return {"loss": (loss_sum / total).item(), "images": int(total.item()), "seconds": time.perf_counter() - start}


def _checkpoint(plan: Plan, epoch: int) -> dict:
    return {"format": FORMAT, "version": 1, **plan.checkpoint_meta, "epoch": epoch,
            "model": dist.unwrap(plan.model).state_dict(), "optimizer": plan.optimizer.state_dict(),
            "scheduler": plan.scheduler.state_dict(), "rng": rng_state()}


def train_model(plan: Plan, out: Path, resume: dict | None = None, show_progress: bool = True) -> dict:
    """Run ``plan`` into ``out`` (from the checkpoint dict ``resume``, if given); returns the final
    evaluation report (rank 0; ``{}`` on other ranks)."""
    is_main = dist.rank() == 0
    # 1. resume: weights, optimizer and schedule state, RNG states, the epoch reached
    start_epoch = 0
    if resume is not None:
        plan.model.load_state_dict(resume["model"])
        plan.optimizer.load_state_dict(resume["optimizer"])
        plan.scheduler.load_state_dict(resume["scheduler"])
        set_rng_state(resume["rng"])
        start_epoch = resume["epoch"]
    if is_main:
        atomic_write_text(plan.recipe_yaml, out / "recipe.yaml")

    # 2. the model as it trains: DDP under torchrun, torch.compile (static shapes: the smaller last
    #    batch gets its own graph instead of a slower dynamic one)
    model = dist.wrap_model(plan.model, plan.device, sync_bn=plan.sync_bn)
    step_model = torch.compile(model, mode=plan.compile_mode, dynamic=False) if plan.compile else model

    progress = training_progress() if (show_progress and is_main) else None
    task = None
    if progress is not None:
        task = progress.add_task(f"epoch {start_epoch + 1}/{plan.epochs}", loss="…", lr="…",
                                 total=plan.loader.num_samples * dist.world_size() * (plan.epochs - start_epoch))
        progress.start()
    metrics_path = out / "metrics.jsonl"
    try:
        for epoch in range(start_epoch, plan.epochs):
            # 3. one epoch: seed the data streams, set the train mode, step through the loader
            plan.loader.set_epoch(epoch)
            plan.set_train_mode(model)
            lr = plan.optimizer.param_groups[0]["lr"]
            if progress is not None:
                progress.update(task, description=f"epoch {epoch + 1}/{plan.epochs}", lr=f"{lr:.4g}")
            stats = train_one_epoch(step_model, plan.loader, plan.criterion, plan.optimizer, plan.num_classes,
                                    plan.mixup_alpha, plan.seed, epoch, plan.amp, progress, task)
            plan.scheduler.step()
            if not math.isfinite(stats["loss"]):
                raise BalpoeError(f"training diverged at epoch {epoch + 1} (loss {stats['loss']}); "
                                  "lower optim.lr or check the data")
            # 4. bookkeeping: metrics row, optional test evaluation, checkpoint (rank 0)
            row = {"epoch": epoch + 1, "loss": stats["loss"], "lr": lr, "epoch_time_s": stats["seconds"],
                   "img_per_s": stats["images"] / max(stats["seconds"], 1e-9)}
            if plan.eval_every and (epoch + 1) % plan.eval_every == 0 and epoch + 1 < plan.epochs and is_main:
                rep = plan.evaluate(dist.unwrap(model))
                row.update({"test_acc": rep["acc"], "test_ece": rep["ece"]})
            if progress is not None:
                progress.update(task, loss=f"{stats['loss']:.4f}")
            if is_main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                if (epoch + 1) % plan.checkpoint_every == 0 or epoch + 1 == plan.epochs:
                    atomic_save(_checkpoint(plan, epoch + 1), out / "last.pt")
    finally:
        if progress is not None:
            progress.stop()

    # 5. the final evaluation (rank 0)
    report: dict = {}
    if is_main:
        report = plan.evaluate(dist.unwrap(model))
        atomic_write_text(json.dumps(report, indent=2) + "\n", out / "eval.json")
        for fn in plan.finish:
            fn(out, report)
        console.print(f"saved {out / 'last.pt'}, {out / 'eval.json'}, {metrics_path}")
    return report
