# reference_balpoe.py -- the official-style BalPoE training step and training run, the baseline of
# the speed and fidelity benchmarks.
# What: BalPoE training exactly as the official code runs it (PIL/torchvision DataLoader, fp32 NCHW,
# global-RNG mixup, per-expert loss loop, torch.optim.SGD, the CustomLR schedule, seed_everything,
# loss.item() every step).
# How: plain PyTorch around the library's multi-expert model, no library training code.
# Used by: python benchmarks/speed.py --reference; python benchmarks/fidelity.py
"""A plain-PyTorch re-implementation of the official BalPoE training step and run: the baseline
that ``speed.py`` times and ``fidelity.py`` checks accuracy against.

Written from the behaviour of the official implementation (emasa/BalPoE-CalibratedLT, the code of
Sanchez Aimar et al., "Balanced Product of Calibrated Experts for Long-Tailed Recognition", CVPR
2023: ``train.py``, ``utils/util.py`` (``seed_everything``, ``learning_rate_scheduler``),
``data_loader/cifar_data_loaders.py``, ``data_loader/imbalance_cifar.py``, ``model/loss.py``
(``BSExpertLoss``), ``utils/combiner.py`` (mixup) and ``trainer/trainer.py``), not copied from it.
What makes it "the reference":

* seeding (:func:`seed_everything`): ``random``, ``np.random`` and ``torch.manual_seed`` with the
  run's seed, ``cudnn.deterministic=True`` / ``cudnn.benchmark=False`` on CUDA
  (:func:`official_cudnn_settings`); then, as ``IMBALANCECIFAR10.__init__`` does while the data
  are built, numpy's global generator is re-seeded with 0 and consumed by the per-class shuffles of
  the long-tailed subsampling (:func:`official_numpy_reset`): the mixup lambdas of the official
  code come from that stream, whatever the run's seed;
* data: a ``torch.utils.data.DataLoader`` over PIL images with torchvision transforms
  (``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``RandomRotation(15)``, ``ToTensor``,
  ``Normalize``), ``shuffle=True``, worker processes restarted every epoch (no
  ``persistent_workers``), no ``pin_memory``, shuffling and worker seeds from torch's global RNG;
* model: the same multi-expert network as the library (built from the recipe, so architecture
  differences are excluded), experts run one after the other in a python loop (never the batched
  grouped-convolution form), fp32, contiguous (NCHW) memory format, not compiled;
* mixup: ``lam = np.random.beta(alpha, alpha)`` from numpy's global RNG and ``torch.randperm(B)``
  from torch's global (CPU) RNG, ``lam * x + (1 - lam) * x[perm]``;
* loss: the official ``BSExpertLoss`` shape -- a python loop over experts of
  ``CE(logits_k + tau_k * log(prior + 1e-9), y)`` (float32 prior), summed and divided by E; with
  mixup ``lam * L(y_a) + (1 - lam) * L(y_b)`` (two loss evaluations);
* optimizer: ``torch.optim.SGD`` (momentum, Nesterov, weight decay on every parameter; torch's
  default implementation choice); schedule: the official ``CustomLR`` ``LambdaLR`` (linear warmup
  ``(1 + e) / W``, x gamma at step1 and step2) for a multistep recipe, stepped once per epoch;
* ``loss.item()`` every step (the official metric tracker logs the loss per step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from balpoe.data.bundle import ImageArrays
from balpoe.data.folder_loader import ArrayImageDataset, array_transforms
from balpoe.losses.build import expert_taus
from balpoe.models.build import build_model
from balpoe.training.build import build_scheduler

#: BSExpertLoss' eps in log(prior + eps)
OFFICIAL_PRIOR_EPS = 1e-9


def seed_everything(seed: int) -> None:
    """The official ``seed_everything`` minus the cudnn flags (:func:`official_cudnn_settings` sets
    those for the duration of a run): ``random``, ``np.random`` and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def official_numpy_reset(train_labels, num_classes: int, rand_number: int = 0) -> None:
    """Leave numpy's global generator where the official CIFAR-LT dataset leaves it:
    ``IMBALANCECIFAR10.__init__`` calls ``np.random.seed(rand_number)`` (0) and shuffles each
    class's indices of the full training set once (``gen_imbalanced_data``).  The official mixup
    lambdas come from this stream, so they are the same for every run seed."""
    labels = np.asarray(train_labels, dtype=np.int64)
    np.random.seed(rand_number)
    for c in range(num_classes):
        np.random.shuffle(np.where(labels == c)[0])


def reference_loader(bundle, recipe, batch_size: int, workers: int, seed: int | None, pin_memory: bool = False,
                     train: ImageArrays | None = None) -> torch.utils.data.DataLoader:
    """The official-style DataLoader over ``train`` (default: ``bundle.train``), with the recipe's
    ``data.augment`` (crop padding, flip, rotation) and the bundle's normalisation.

    ``seed=None``: shuffling and worker seeds come from torch's global RNG, as in the official code;
    an integer gives the loader its own generator (the speed benchmark's repeatable epochs)."""
    arrays = train if train is not None else bundle.train
    a = recipe.data.augment
    transform = array_transforms(tuple(arrays.images.shape[-2:]), bundle.mean, bundle.std, train=True,
                                 padding=a.crop_padding, flip=a.flip, rotation=a.rotation)
    dataset = ArrayImageDataset(arrays, transform)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                       pin_memory=pin_memory, drop_last=False, generator=generator)


def reference_model(recipe, num_classes: int, in_chans: int, device: torch.device) -> torch.nn.Module:
    """The recipe's multi-expert network as the official code runs it: experts in a python loop
    (``model.batched_experts`` ignored), on ``device``."""
    return build_model(dataclasses.replace(recipe.model, batched_experts=False), num_classes, in_chans).to(device)


def reference_optimizer(model: torch.nn.Module, recipe) -> torch.optim.Optimizer:
    o = recipe.optim
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                           nesterov=o.nesterov)


def official_lr_factor(epoch: int, warmup_epochs: int, milestones: list[int], gamma: float) -> float:
    """The official ``CustomLR`` multiplier of epoch ``epoch`` (0-based) with ``milestones = [step1,
    step2]``: gamma^2 from step2, gamma from step1, 1 before; times ``(1 + epoch) / warmup`` during
    the warmup."""
    step1, step2 = milestones
    factor = gamma * gamma if epoch >= step2 else gamma if epoch >= step1 else 1.0
    if epoch < warmup_epochs:
        factor *= float(1 + epoch) / warmup_epochs
    return factor


def reference_scheduler(optimizer: torch.optim.Optimizer, recipe):
    """Per-epoch schedule: the official ``CustomLR`` ``LambdaLR`` for a multistep recipe with two
    milestones (step1, step2, as every official CIFAR config); any other schedule (cosine, constant,
    other milestone counts) as the library builds it."""
    o = recipe.optim
    if o.schedule == "multistep" and len(o.milestones) == 2:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda e: official_lr_factor(e, o.warmup_epochs, list(o.milestones), o.gamma))
    return build_scheduler(o, optimizer)


def official_log_prior(class_counts, device=None) -> torch.Tensor:
    """``BSExpertLoss.get_default_bias(tau=1)``: ``log(n / sum(n) + 1e-9)`` in float32."""
    counts = torch.as_tensor(class_counts).float()
    prior = counts / counts.sum()
    return torch.log(prior + OFFICIAL_PRIOR_EPS).to(device)


def bs_expert_loss(expert_logits: torch.Tensor, target: torch.Tensor, prior: torch.Tensor,
                   taus: list[float]) -> torch.Tensor:
    """Official loss shape: per expert CE(f_k + tau_k log pi, y) in a python loop, mean over experts."""
    loss = expert_logits.new_zeros(())
    for k, tau in enumerate(taus):
        loss = loss + F.cross_entropy(expert_logits[k] + tau * prior, target)
    return loss / len(taus)


def mixup_data(x: torch.Tensor, y: torch.Tensor, alpha: float):
    """Official mixup: numpy global RNG for lambda, torch global RNG for the permutation."""
    lam = float(np.random.beta(alpha, alpha))
    index = torch.randperm(x.size(0)).to(x.device)
    return lam * x + (1 - lam) * x[index], y, y[index], lam


@contextlib.contextmanager
def official_cudnn_settings(device: torch.device):
    """``cudnn.deterministic=True, benchmark=False`` (official ``seed_everything``) inside the block."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def reference_train_epoch(model: torch.nn.Module, loader, class_counts, taus: list[float],
                          optimizer: torch.optim.Optimizer, device: torch.device, mixup_alpha: float) -> dict:
    """One epoch of the official training step; returns ``{'loss', 'images'}``."""
    prior = official_log_prior(class_counts, device)
    model.train()
    total, images = 0.0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        if mixup_alpha > 0:
            x, y_a, y_b, lam = mixup_data(x, y, mixup_alpha)
            logits = model(x)
            loss = lam * bs_expert_loss(logits, y_a, prior, taus) + (1 - lam) * bs_expert_loss(logits, y_b, prior, taus)
        else:
            loss = bs_expert_loss(model(x), y, prior, taus)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item() * x.shape[0]   # host sync every step, as the official metric tracker
        images += x.shape[0]
    return {"loss": total / max(images, 1), "images": images}


def train_reference(recipe, bundle, device: torch.device, workers: int, full_train_labels=None,
                    train: ImageArrays | None = None, metrics_path: str | Path | None = None,
                    on_epoch=None) -> tuple[torch.nn.Module, list[dict]]:
    """A whole official-style training run of ``recipe`` (stage 1, instance-balanced sampling).

    Order as the official ``train.py``: :func:`seed_everything` (``recipe.seed``), the data (with
    ``full_train_labels``, the labels of the training set before long-tailed subsampling,
    :func:`official_numpy_reset`), the model (the recipe's network, experts in a loop, fp32 NCHW),
    ``torch.optim.SGD``, :func:`reference_scheduler`; then ``optim.epochs`` epochs of
    :func:`reference_train_epoch` under :func:`official_cudnn_settings`.  ``train``: the training
    arrays (default ``bundle.train``).  Returns the model and one row per epoch (epoch, loss, lr,
    seconds), also appended to ``metrics_path`` as JSON lines; ``on_epoch(row)`` after each."""
    with official_cudnn_settings(device):
        seed_everything(recipe.seed)
        if full_train_labels is not None:
            official_numpy_reset(full_train_labels, bundle.num_classes)
        arrays = train if train is not None else bundle.train
        counts = torch.bincount(arrays.labels.cpu(), minlength=bundle.num_classes)
        loader = reference_loader(bundle, recipe, recipe.optim.batch_size, workers, None, train=arrays)
        model = reference_model(recipe, bundle.num_classes, bundle.in_chans, device)
        optimizer = reference_optimizer(model, recipe)
        scheduler = reference_scheduler(optimizer, recipe)
        taus = expert_taus(recipe.loss, recipe.model.num_experts)
        rows = []
        for epoch in range(recipe.optim.epochs):
            lr = optimizer.param_groups[0]["lr"]
            start = time.perf_counter()
            stats = reference_train_epoch(model, loader, counts, taus, optimizer, device, recipe.train.mixup_alpha)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            scheduler.step()
            row = {"epoch": epoch + 1, "loss": stats["loss"], "lr": lr, "epoch_time_s": time.perf_counter() - start,
                   "images": stats["images"]}
            rows.append(row)
            if metrics_path is not None:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            if on_epoch is not None:
                on_epoch(row)
    return model, rows
