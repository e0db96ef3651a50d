"""The training loop: recipe -> data -> model -> loss -> optimizer -> epochs -> checkpoint -> eval.

Read it top to bottom: :func:`train` builds every piece from the recipe, then runs epochs of
:func:`train_one_epoch`.  Per-epoch metrics go to ``OUT/metrics.jsonl``; the resolved recipe to
``OUT/recipe.yaml``; checkpoints to ``OUT/last.pt`` (atomic writes) every
``train.checkpoint_every`` epochs and at the end; the final evaluation to ``OUT/eval.json``.
Inside an epoch nothing synchronises with the host: the loss is accumulated on the device and
read once per epoch.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from balpoe import distributed as dist
from balpoe.checkpoint import FORMAT, atomic_save, atomic_write_text, load_checkpoint, rng_state, set_rng_state
from balpoe.console import console, training_progress
from balpoe.data.build import DataBundle, build_data, build_loader
from balpoe.data.device_loader import epoch_seed
from balpoe.errors import BalpoeError
from balpoe.losses import BalPoELoss, make_tau_list
from balpoe.mixup import mixup_batch, mixup_targets
from balpoe.models import MultiExpertNet, build_multi_expert
from balpoe.precision import autocast, use_amp
from balpoe.recipe import Recipe, warn_unbalanced_tau


# ------------------------------------------------------------------------------------------------
# Building blocks (each one step of the data flow)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BalpoeError(f"recipe key 'train.device' is {name!r} but CUDA is not available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise BalpoeError(f"recipe key 'train.device' is not a device: {name!r}") from None


def expert_taus(recipe: Recipe) -> list[float]:
    """The per-expert tau list: explicit ``loss.tau`` or evenly spaced from tau_min..tau_max."""
    lc = recipe.loss
    taus = lc.tau if lc.tau is not None else make_tau_list(recipe.model.num_experts, lc.tau_min, lc.tau_max,
                                                           lc.tau_spacing)
    return [float(t) for t in taus]


def build_model(recipe: Recipe, num_classes: int, in_chans: int) -> MultiExpertNet:
    """The stage-1 multi-expert network described by ``recipe.model``."""
    m = recipe.model
    return build_multi_expert(m.backbone, num_classes, m.num_experts, m.split, m.head, m.scale, in_chans,
                              m.pretrained_file, m.kwargs, batched=m.batched_experts)


def build_optimizer(recipe: Recipe, params) -> torch.optim.Optimizer:
    """SGD with momentum (Nesterov by default) and weight decay on all parameters (official code),
    through timm's optimizer factory."""
    from timm.optim import create_optimizer_v2
    o = recipe.optim
    return create_optimizer_v2(params, opt="sgd" if o.nesterov else "momentum", lr=o.lr,
                               weight_decay=o.weight_decay, momentum=o.momentum, filter_bias_and_bn=False)


def build_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer):
    """Per-epoch schedule: linear warmup ``lr * (e + 1) / W`` for ``e < W`` (official BalPoE), then
    multistep (x gamma at each milestone epoch), cosine to ``min_lr`` or constant."""
    from torch.optim import lr_scheduler as S
    o = recipe.optim
    w = o.warmup_epochs
    if o.schedule == "multistep":
        main = S.MultiStepLR(optimizer, [m - w for m in o.milestones], o.gamma)
    elif o.schedule == "cosine":
        main = S.CosineAnnealingLR(optimizer, T_max=o.epochs - w, eta_min=o.min_lr)
    else:
        main = S.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if w == 0:
        return main
    warm = S.LinearLR(optimizer, start_factor=1.0 / w, end_factor=1.0, total_iters=max(w - 1, 1))
    return S.SequentialLR(optimizer, [warm, main], milestones=[w])


# ------------------------------------------------------------------------------------------------
# One epoch


def train_one_epoch(model: nn.Module, loader, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    num_classes: int, mixup_alpha: float, seed: int, epoch: int, amp: bool,
                    progress=None, task=None) -> dict:
    """One pass over ``loader``; returns ``{'loss', 'images', 'seconds'}`` (one host sync)."""
    device = next(model.parameters()).device
    # Per-epoch streams (exactly resumable). lambda is shared by all ranks (one lambda per global
    # batch, as the official code); the pairing permutation is drawn per rank.
    mix_rng = np.random.default_rng(epoch_seed(seed, epoch))
    mix_gen = torch.Generator(device=device).manual_seed(epoch_seed(seed + 1 + 104729 * dist.rank(), epoch))
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


# ------------------------------------------------------------------------------------------------
# The whole run


def _checkpoint(recipe: Recipe, epoch: int, model, optimizer, scheduler, bundle: DataBundle, taus) -> dict:
    return {"format": FORMAT, "version": 1, "recipe": recipe.to_dict(), "epoch": epoch,
            "model": dist.unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": rng_state(), "taus": taus,
            "class_counts": bundle.class_counts.tolist(), "num_classes": bundle.num_classes,
            "in_chans": bundle.in_chans, "mean": list(bundle.mean), "std": list(bundle.std),
            "class_names": bundle.class_names}


def prepare_output_dir(out: Path, recipe: Recipe, resume: bool) -> Path | None:
    """Create ``out``; refuse to overwrite an existing run unless resuming.  Returns the checkpoint
    to resume from, if any."""
    last = out / "last.pt"
    if resume:
        if not last.is_file():
            raise BalpoeError(f"--resume: no checkpoint to resume in '{out}' (expected {last.name})")
        return last
    if last.exists():
        raise BalpoeError(f"output directory '{out}' already holds a run; pass --resume to continue it or "
                          f"--out to choose another directory")
    out.mkdir(parents=True, exist_ok=True)
    return None


def train(recipe: Recipe, out_dir: str | Path, resume: bool = False, show_progress: bool = True) -> dict:
    """Train a (multi-expert) model as the recipe says; returns the final evaluation report."""
    from balpoe import stage2
    from balpoe.evaluate import evaluate_model, print_report

    out = Path(out_dir)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    device = resolve_device(recipe.train.device)
    # Under torchrun: join the process group (gloo on CPU; NCCL with one GPU per process, cuda:LOCAL_RANK).
    rank, world_size, device = dist.init_distributed(device)
    is_main = rank == 0
    resume_from = prepare_output_dir(out, recipe, resume)  # every rank checks, so all fail alike
    dist.barrier()
    torch.manual_seed(recipe.seed)
    np.random.seed(recipe.seed)

    # data -> loader
    bundle = build_data(recipe.data, device, seed=recipe.seed)
    tc = recipe.train
    train_loader = build_loader(bundle, "train", dist.local_batch_size(recipe.optim.batch_size, world_size),
                                recipe.data, train=True, seed=recipe.seed, rank=rank, world_size=world_size,
                                channels_last=tc.channels_last)

    # model -> loss
    taus = expert_taus(recipe)
    if recipe.stage == 1:
        model = build_model(recipe, bundle.num_classes, bundle.in_chans)
        if is_main and (recipe.model.num_experts > 1 or taus != [0.0]):
            warn_unbalanced_tau(taus)
        criterion = BalPoELoss(bundle.class_counts, taus)
        params = model.parameters()
    else:
        model = stage2.build_stage2_model(recipe, bundle)  # takes model/loss sections from the stage-1 checkpoint
        taus = expert_taus(recipe)                          # so: the stage-1 experts' taus
        criterion = stage2.build_stage2_criterion(recipe, bundle.class_counts)
        params = stage2.stage2_param_groups(model, recipe.optim.lr, recipe.stage2.delta_lr_factor,
                                            recipe.optim.weight_decay)
    model = model.to(device)
    criterion = criterion.to(device)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(recipe, params)
    scheduler = build_scheduler(recipe, optimizer)

    start_epoch = 0
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from, map_location=device)
        was_batched = bool(ckpt["recipe"].get("model", {}).get("batched_experts", False))
        if recipe.stage == 1 and was_batched != recipe.model.batched_experts:
            # the weights would load (same keys) but the optimizer state is per parameter tensor
            raise BalpoeError(f"--resume: recipe key 'model.batched_experts' is {recipe.model.batched_experts} but "
                              f"'{resume_from}' was trained with {was_batched}; resume with the same setting")
        if is_main and ckpt["recipe"] != recipe.to_dict():
            warnings.warn(f"--resume: the recipe differs from the one '{resume_from}' was trained with; "
                          "continuing with the new recipe", stacklevel=2)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        start_epoch = ckpt["epoch"]
    if is_main:
        atomic_write_text(recipe.to_yaml(), out / "recipe.yaml")

    model = dist.wrap_model(model, device, sync_bn=tc.sync_bn)
    # static shapes: the last, smaller batch gets its own graph instead of a slower dynamic one
    train_model = torch.compile(model, mode=tc.compile_mode, dynamic=False) if tc.compile else model
    epochs = recipe.optim.epochs
    amp = use_amp(device, tc.amp, warn=is_main)  # bf16 where native (CUDA; AVX512-BF16 / AMX CPUs)

    progress = training_progress() if (show_progress and is_main) else None
    task = None
    if progress is not None:
        per_rank = getattr(train_loader, "num_samples", None) or len(train_loader.loader.sampler)
        task = progress.add_task(f"epoch {start_epoch + 1}/{epochs}",
                                 total=per_rank * world_size * (epochs - start_epoch), loss="…", lr="…")
        progress.start()
    metrics_path = out / "metrics.jsonl"
    try:
        for epoch in range(start_epoch, epochs):
            train_loader.set_epoch(epoch)
            if recipe.stage == 1:
                model.train()
            else:
                stage2.set_stage2_mode(dist.unwrap(model), recipe.stage2.shifted_bn)
            lr = optimizer.param_groups[0]["lr"]
            if progress is not None:
                progress.update(task, description=f"epoch {epoch + 1}/{epochs}", lr=f"{lr:.4g}")
            stats = train_one_epoch(train_model, train_loader, criterion, optimizer, bundle.num_classes,
                                    tc.mixup_alpha, recipe.seed, epoch, amp, progress, task)
            scheduler.step()
            if not math.isfinite(stats["loss"]):
                raise BalpoeError(f"training diverged at epoch {epoch + 1} (loss {stats['loss']}); "
                                  "lower optim.lr or check the data")
            row = {"epoch": epoch + 1, "loss": stats["loss"], "lr": lr, "epoch_time_s": stats["seconds"],
                   "img_per_s": stats["images"] / max(stats["seconds"], 1e-9)}
            if tc.eval_every and (epoch + 1) % tc.eval_every == 0 and epoch + 1 < epochs and is_main:
                rep = evaluate_model(dist.unwrap(model), bundle, recipe, device)
                row.update({"test_acc": rep["acc"], "test_ece": rep["ece"]})
            if progress is not None:
                progress.update(task, loss=f"{stats['loss']:.4f}")
            if is_main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                if (epoch + 1) % tc.checkpoint_every == 0 or epoch + 1 == epochs:
                    atomic_save(_checkpoint(recipe, epoch + 1, model, optimizer, scheduler, bundle, taus),
                                out / "last.pt")
    finally:
        if progress is not None:
            progress.stop()

    report = {}
    if is_main:
        report = evaluate_model(dist.unwrap(model), bundle, recipe, device)
        atomic_write_text(json.dumps(report, indent=2) + "\n", out / "eval.json")
        print_report(report, title=f"{recipe.name}: balanced test set")
        console.print(f"saved {out / 'last.pt'}, {out / 'eval.json'}, {metrics_path}")
    dist.barrier()
    dist.shutdown()
    return report


__all__ = ["build_model", "build_optimizer", "build_scheduler", "expert_taus", "train", "train_one_epoch",
           "resolve_device"]
