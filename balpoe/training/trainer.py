"""The training loop, stage-agnostic: a :class:`Plan` in, a trained network out.

:func:`balpoe.training.build.build_plan` turns a recipe into a :class:`Plan` (data loader, model,
loss, optimizer, schedule, how the model trains); :func:`train_model` runs it: per epoch
:func:`train_one_epoch`, a line in ``OUT/metrics.jsonl`` (and ``OUT/metrics.csv``), with
``train.val_every`` a validation score and ``OUT/best.pt``, and every ``train.checkpoint_every``
epochs and at the end an atomic ``OUT/last.pt``.  The final evaluation and the files it writes are
the caller's (:func:`balpoe.training.build.train`).

Host synchronisation inside an epoch: the loss is accumulated on the device and read once, at the
end of the epoch; the non-finite-loss flag is read every :data:`FINITE_CHECK_EVERY` steps (and at
the end), each read a wait for the device (and, under torchrun, an all-reduce).  With fp16 loss
scaling, ``GradScaler.step`` also reads its inf/NaN check every step; a disabled scaler reads nothing.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from balpoe.data.mixup import mixup_batch, mixup_targets
from balpoe.errors import BalpoeError, clip
from balpoe.evaluate.curve import summarize_test_curve
from balpoe.models.weights import load_state
from balpoe.runtime import distributed as dist
from balpoe.runtime.checkpoint import FORMAT, atomic_save, atomic_write_text, json_text, rng_state, set_rng_state
from balpoe.runtime.files import append_text
from balpoe.runtime.metrics_log import metrics_rows
from balpoe.runtime.console import console, training_progress
from balpoe.runtime.precision import autocast
from balpoe.runtime.seeding import numpy_stream, torch_stream


@dataclass
class Plan:
    """What the loop needs for one run (built from a recipe by :func:`balpoe.training.build.build_plan`):
    the objects it steps, the resolved recipe it reads its settings from (``optim.epochs``, ``seed``,
    the ``train`` section) and records, and the callables of the run's stage."""
    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: Any                                  # DeviceLoader or FolderLoader: set_epoch, num_samples, iter
    device: torch.device
    recipe: Any                                  # the resolved recipe: settings, checkpoints' 'recipe', OUT/recipe.yaml
    num_classes: int                             # mixup's soft targets
    set_train_mode: Callable[[nn.Module], Any]   # model.train(), or MiSLAS stage 2's shifted-BN mode
    checkpoint_meta: dict                        # saved with every checkpoint: the data description (counts, ...)
    amp: torch.dtype | None                      # autocast dtype (None: float32)
    scaler: torch.amp.GradScaler                 # loss scaling; disabled (a pass-through) unless fp16 autocast
    compile: bool                                # train.compile resolved on the device
    evaluate: Callable[[nn.Module], dict]        # model -> the test set's report (train.eval_every's curve)
    validate: Callable[[nn.Module], dict] | None = None  # model -> validation metrics (val_balanced_acc, val_nll)
    notes: list = field(default_factory=list)     # lines printed (rank 0) once the run has started: nothing refused it
    on_epoch: list = field(default_factory=list)  # callables (metrics row) run on rank 0 after each epoch


#: steps between checks for a non-finite loss (the flag lives on the device; reading it syncs)
FINITE_CHECK_EVERY = 50


class Diverged(BalpoeError):
    """The loss became NaN or infinite."""

    def __init__(self, epoch: int, step: int):
        self.epoch, self.step = epoch, step
        super().__init__(f"training diverged: non-finite loss in epoch {epoch + 1} by step {step}")


def _any_nonfinite(flag: torch.Tensor) -> bool:
    return bool(dist.all_reduce_sum(flag.float()).item() > 0)


def train_one_epoch(model: nn.Module, loader, criterion: nn.Module, optimizer: torch.optim.Optimizer, *,
                    epoch: int, seed: int, num_classes: int, mixup_alpha: float = 0.0,
                    amp: bool | torch.dtype = False, scaler: torch.amp.GradScaler | None = None,
                    progress=None, task=None) -> dict:
    """One pass over ``loader`` (epoch ``epoch``, 0-based); returns ``{'loss', 'images', 'seconds'}``.

    ``seed`` and ``epoch`` seed the mixup streams (``mixup_alpha`` > 0; soft targets over
    ``num_classes``); ``amp``: False, True (bf16) or the autocast dtype; ``scaler``: loss scaling for
    fp16 (None: a disabled scaler, a pass-through); ``progress``/``task``: a rich progress bar to
    advance.  A non-finite loss is flagged on the device and the flag is read every
    :data:`FINITE_CHECK_EVERY` steps and at the end (no per-step host sync); it raises :class:`Diverged`."""
    device = next(model.parameters()).device
    if scaler is None:
        scaler = torch.amp.GradScaler(device.type, enabled=False)
    # Per-epoch streams (exactly resumable): one mixup lambda per global batch, the same on every
    # rank; the pairing permutation per rank.
    mix_rng = numpy_stream(seed, epoch, "mixup_lambda")
    mix_gen = torch_stream(seed, epoch, "mixup_pairs", dist.rank(), device=device)
    loss_sum = torch.zeros((), device=device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    images, start = 0, time.perf_counter()
    for step, (x, y) in enumerate(loader, start=1):
        # the batch on the device; mixup pairs images and mixes their labels into soft targets
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        target = y
        if mixup_alpha > 0:
            x, y_a, y_b, lam = mixup_batch(x, y, mixup_alpha, mix_rng, mix_gen)
            target = mixup_targets(y_a, y_b, lam, num_classes, dtype=x.dtype)
        # forward (autocast) and the loss of every expert's logits
        with autocast(device, amp):
            logits = model(x)
        loss = criterion(logits, target)
        # backward and step through the scaler (disabled: plain backward() and step())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        # bookkeeping on the device: the summed loss and the non-finite flag
        loss_sum += loss.detach() * x.shape[0]
        nonfinite |= ~torch.isfinite(loss.detach())
        images += x.shape[0]
        if progress is not None:
            progress.advance(task, x.shape[0] * dist.world_size())  # global images (rank 0's bar)
        if step % FINITE_CHECK_EVERY == 0 and _any_nonfinite(nonfinite):
            raise Diverged(epoch, step)
    if _any_nonfinite(nonfinite):
        raise Diverged(epoch, len(loader))
    loss_sum = dist.all_reduce_sum(loss_sum)
    total = dist.all_reduce_sum(torch.tensor(float(images), device=device))
    return {"loss": (loss_sum / total).item(), "images": int(total.item()), "seconds": time.perf_counter() - start}


def _checkpoint(plan: Plan, epoch: int, **extra) -> dict:
    return {"format": FORMAT, "version": 1, "recipe": plan.recipe.to_dict(), **plan.checkpoint_meta, **extra,
            "epoch": epoch, "model": dist.unwrap(plan.model).state_dict(), "optimizer": plan.optimizer.state_dict(),
            "scheduler": plan.scheduler.state_dict(), "rng": rng_state(),
            **({"scaler": plan.scaler.state_dict()} if plan.scaler.is_enabled() else {})}


def _restore(plan: Plan, resume: dict) -> int:
    """Weights, optimizer state, RNG states and the epoch reached; the learning-rate schedule is the
    plan's, fast-forwarded to that epoch (a resumed run with an unchanged recipe is bit-identical to an
    uninterrupted one; a changed schedule takes effect from the restored epoch).  A state that does
    not fit the plan (a damaged or foreign checkpoint) is one line, before anything is written."""
    load_state(plan.model, resume["model"], "the checkpoint's weights do not fit the model")
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in plan.optimizer.param_groups]
    try:
        plan.optimizer.load_state_dict(resume["optimizer"])
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
        raise BalpoeError(f"the checkpoint's optimizer state does not fit the model ({type(e).__name__}: "
                          f"{clip(str(e).strip().splitlines()[0] if str(e).strip() else '', 120)})") from None
    params = [p for g in plan.optimizer.param_groups for p in g["params"]]
    for p in params:
        for key, v in plan.optimizer.state.get(p, {}).items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape:
                raise BalpoeError(f"the checkpoint's optimizer state '{key}' has shape {tuple(v.shape)} for a "
                                  f"parameter of shape {tuple(p.shape)}; the checkpoint is damaged")
    for group, hyper in zip(plan.optimizer.param_groups, fresh):
        group.update(hyper)          # the plan's hyper-parameters (lr, initial_lr) over the saved ones
    with warnings.catch_warnings():  # stepping the schedule without optimizer steps is the point here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(resume["epoch"]):
            plan.scheduler.step()
    set_rng_state(resume["rng"])
    if "scaler" in resume:   # a disabled scaler ignores the state
        try:
            plan.scaler.load_state_dict(resume["scaler"])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise BalpoeError(f"the checkpoint's gradient-scaler state does not restore ({type(e).__name__})") from None
    return resume["epoch"]


def _metrics_rows(path: Path, upto: int) -> list[str]:
    """The lines of ``metrics.jsonl`` for epochs <= ``upto`` (:func:`~balpoe.runtime.metrics_log.metrics_rows`)."""
    return [line for _, line in metrics_rows(path, upto)]


def _curve_point(rep: dict) -> dict:
    """The test metrics a metrics.jsonl row keeps for the per-epoch test curve."""
    return {"test_acc": rep["acc"], "test_many": rep.get("many"), "test_medium": rep.get("medium"),
            "test_few": rep.get("few"), "test_ece": rep["ece"]}


def add_test_curve(report: dict, metrics_path: Path, epochs: int, every: int) -> None:
    """``train.eval_every``: the final evaluation ``report`` completes the last metrics.jsonl row (the
    curve's last point; metrics.csv follows), and ``report['test_curve']`` gets the curve with its
    best epoch on the test set (:func:`~balpoe.evaluate.curve.summarize_test_curve`, labelled
    optimistic; the headline stays the last epoch)."""
    rows = [json.loads(r) for r in _metrics_rows(metrics_path, epochs)]
    if rows and rows[-1].get("epoch") == epochs:
        rows[-1].update(_curve_point(report))
        atomic_write_text("".join(json_text(r, indent=None) + "\n" for r in rows), metrics_path)
    curve = summarize_test_curve(rows, every)
    if curve is not None:
        report["test_curve"] = curve
        console.print(f"{curve['label']}: epoch {curve['best_epoch']}, {curve['best_acc']:.2f}% "
                      f"(headline, last epoch {curve['last_epoch']}: {curve['last_acc']:.2f}%)", highlight=False)
    _write_metrics_csv(metrics_path)     # the curve's last point


def metrics_csv(rows: list[dict]) -> str:
    """``metrics.jsonl`` rows as CSV text: one column per key, in order of first appearance (a key a
    row lacks, e.g. validation metrics of epochs without validation, is an empty cell)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _write_metrics_csv(metrics_path: Path) -> None:
    rows = [json.loads(line) for line in _metrics_rows(metrics_path, 10 ** 9)]
    atomic_write_text(metrics_csv(rows), metrics_path.with_suffix(".csv"))


def interactive() -> bool:
    """Whether a progress bar has someone to look at: stdout and the console are terminals (not a
    batch job's log file)."""
    return sys.stdout.isatty() and console.is_terminal


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def epoch_line(row: dict, epochs: int, eta_s: float) -> str:
    """The plain per-epoch line of a batch job: epoch, loss, lr, images/s, ETA, validation metrics."""
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {row['loss']:.4f}", f"lr {row['lr']:.4g}",
             f"{row['img_per_s']:,.0f} img/s", f"ETA {_duration(eta_s)}"]
    if "val_balanced_acc" in row:
        parts += [f"val_balanced_acc {row['val_balanced_acc']:.2f}", f"val_nll {row['val_nll']:.4f}"]
    if "test_acc" in row:
        parts += [f"test_acc {row['test_acc']:.2f}"]
    return "  ".join(parts)


def _better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value > best if metric == "val_balanced_acc" else value < best


def train_model(plan: Plan, out: Path, resume: dict | None = None, show_progress: bool = True) -> nn.Module:
    """Run ``plan``'s epochs into ``out`` (from the checkpoint dict ``resume``, if given); returns the
    trained network (unwrapped from DDP, not compiled), on every rank.

    With ``plan.validate`` the validation split is scored every ``train.val_every`` epochs; the
    best model by ``val_<train.select_metric>`` is written to ``OUT/best.pt`` (the test set chooses
    nothing), and after ``train.early_stop_patience`` validations without a better one training stops
    (``OUT/last.pt`` then holds that epoch).  The selection state travels in every checkpoint, so a
    resumed run keeps its best model and patience."""
    tc, epochs = plan.recipe.train, plan.recipe.optim.epochs
    is_main = dist.rank() == 0
    metrics_path = out / "metrics.jsonl"
    # 1. resume: weights, optimizer state, the schedule at the restored epoch, RNG states; metrics.jsonl
    #    keeps exactly the rows of the epochs the checkpoint holds (a fresh start keeps none)
    start_epoch = _restore(plan, resume) if resume is not None else 0
    if is_main:
        for note in plan.notes:
            console.print(note, highlight=False, soft_wrap=True)
        atomic_write_text("".join(r + "\n" for r in _metrics_rows(metrics_path, start_epoch)), metrics_path)
        _write_metrics_csv(metrics_path)
        atomic_write_text(plan.recipe.to_yaml(), out / "recipe.yaml")
    # 2. model selection on the validation split: its state (metric, best value and epoch, stale
    #    validations, stopped) comes back with a resumed checkpoint
    metric = f"val_{tc.select_metric}"
    selection = dict((resume or {}).get("selection") or {}) if plan.validate is not None else {}
    selection.setdefault("metric", metric)
    end_epoch = start_epoch if selection.get("stopped") else epochs

    # 3. the model as it trains: DDP under torchrun, torch.compile (static shapes: the smaller last
    #    batch gets its own graph instead of a slower dynamic one)
    model = dist.wrap_model(plan.model, plan.device, sync_bn=tc.sync_bn)
    step_model = torch.compile(model, mode=tc.compile_mode, dynamic=False) if plan.compile else model

    # 4. progress: a bar on a terminal, else one plain line per epoch (rank 0)
    progress = training_progress() if (show_progress and is_main and interactive()) else None
    plain = is_main and progress is None
    loop_start = time.perf_counter()
    task = None
    if progress is not None:
        task = progress.add_task(f"epoch {start_epoch + 1}/{epochs}", loss="…", lr="…",
                                 total=plan.loader.num_samples * dist.world_size() * (epochs - start_epoch))
        progress.start()
    try:
        for epoch in range(start_epoch, end_epoch):
            # 5. one epoch: seed the data streams, set the train mode, step through the loader, then
            #    the schedule
            plan.loader.set_epoch(epoch)
            if hasattr(plan.criterion, "set_epoch"):  # a loss that changes with the epoch (LDAM-DRW's re-weighting)
                plan.criterion.set_epoch(epoch)
            plan.set_train_mode(model)
            lr = plan.optimizer.param_groups[0]["lr"]
            if progress is not None:
                progress.update(task, description=f"epoch {epoch + 1}/{epochs}", lr=f"{lr:.4g}")
            try:
                stats = train_one_epoch(step_model, plan.loader, plan.criterion, plan.optimizer, epoch=epoch,
                                        seed=plan.recipe.seed, num_classes=plan.num_classes,
                                        mixup_alpha=tc.mixup_alpha, amp=plan.amp or False, scaler=plan.scaler,
                                        progress=progress, task=task)
            except Diverged as e:
                kept = f"'{out / 'last.pt'}' (the last good checkpoint) is kept" if (out / "last.pt").exists() \
                    else "no checkpoint was written"
                raise BalpoeError(f"{e}; {kept}; lower optim.lr or check the data") from None
            plan.scheduler.step()
            # 6. the metrics row; the test curve every train.eval_every epochs (the last epoch's point
            #    comes from the final evaluation)
            row = {"epoch": epoch + 1, "loss": stats["loss"], "lr": lr, "epoch_time_s": stats["seconds"],
                   "img_per_s": stats["images"] / max(stats["seconds"], 1e-9)}
            if tc.eval_every and (epoch + 1) % tc.eval_every == 0 and epoch + 1 < epochs and is_main:
                row.update(_curve_point(plan.evaluate(dist.unwrap(model))))
            # 7. validation every train.val_every epochs and at the end: a better score selects this
            #    epoch; train.early_stop_patience stale validations stop every rank
            improved = stop = False
            if plan.validate is not None and ((epoch + 1) % tc.val_every == 0 or epoch + 1 == epochs):
                if is_main:
                    row.update(plan.validate(dist.unwrap(model)))
                    improved = _better(metric, row[metric], selection.get("value"))
                    if improved:
                        selection.update(value=row[metric], epoch=epoch + 1, stale=0)
                    else:
                        selection["stale"] = selection.get("stale", 0) + 1
                    stop = bool(tc.early_stop_patience) and selection["stale"] >= tc.early_stop_patience \
                        and epoch + 1 < epochs
                    selection["stopped"] = stop
                stop = bool(dist.all_reduce_sum(torch.tensor(float(stop), device=plan.device)).item() > 0)  # all ranks
            if progress is not None:
                progress.update(task, loss=f"{stats['loss']:.4f}")
            if is_main:
                # 8. the row into metrics.jsonl / metrics.csv, the plain line, the per-epoch callbacks
                append_text(metrics_path, json_text(row, indent=None) + "\n")
                _write_metrics_csv(metrics_path)
                if plain:
                    done = epoch + 1 - start_epoch
                    eta = (time.perf_counter() - loop_start) / done * (epochs - epoch - 1)
                    console.print(epoch_line(row, epochs, 0.0 if stop else eta), highlight=False, soft_wrap=True)
                for fn in plan.on_epoch:
                    fn(row)
                # 9. checkpoints: best.pt on a better validation, last.pt every train.checkpoint_every
                #    epochs, at the end and on an early stop
                extra = {"selection": dict(selection)} if plan.validate is not None else {}
                if improved:
                    atomic_save(_checkpoint(plan, epoch + 1, **extra), out / "best.pt")
                if (epoch + 1) % tc.checkpoint_every == 0 or epoch + 1 == epochs or stop:
                    atomic_save(_checkpoint(plan, epoch + 1, **extra), out / "last.pt")
                if stop:
                    console.print(f"early stop after epoch {epoch + 1}: {metric} has not improved for "
                                  f"{tc.early_stop_patience} validations (best {selection['value']:.4f} at epoch "
                                  f"{selection['epoch']})")
            if stop:
                break
    finally:
        if progress is not None:
            progress.stop()
    if is_main and selection.get("epoch"):
        console.print(f"best.pt: epoch {selection['epoch']}, {metric} {selection['value']:.4f} on the validation "
                      f"split (balpoe eval {out / 'best.pt'} scores it on the test set)")
    return dist.unwrap(model)
