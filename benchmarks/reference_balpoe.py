# reference_balpoe.py -- the official-style BalPoE training step, the baseline of the speed and
# accuracy benchmarks.
# What: one epoch of BalPoE training exactly as the official code runs it (PIL/torchvision
# DataLoader, fp32 NCHW, global-RNG mixup, per-expert loss loop, SGD, loss.item() every step).
# How: plain PyTorch around the library's multi-expert model, no library training code.
# Used by: python benchmarks/speed.py --reference; python benchmarks/fast_vs_reference_accuracy.py
"""A plain-PyTorch re-implementation of the official BalPoE training step: the baseline that
``speed.py`` times and ``fast_vs_reference_accuracy.py`` checks accuracy against.

Written from the behaviour of the official implementation (emasa/BalPoE-CalibratedLT, the code of
Sanchez Aimar et al., "Balanced Product of Calibrated Experts for Long-Tailed Recognition", CVPR
2023: its CIFAR data loaders, ``BSExpertLoss``, mixup and trainer), not copied from it.  What makes
it "the reference":

* data: a ``torch.utils.data.DataLoader`` over PIL images with torchvision transforms
  (``RandomCrop(size, padding)``, ``RandomHorizontalFlip``, ``RandomRotation``, ``ToTensor``,
  ``Normalize``), ``shuffle=True``, worker processes (4 by default) restarted every epoch
  (no ``persistent_workers``), ``pin_memory`` on CUDA;
* model: the same multi-expert network as the fast path (its experts already run one after the
  other in a python loop), in fp32, contiguous (NCHW) memory format, not compiled; on CUDA the
  official ``seed_everything`` settings (``cudnn.deterministic=True``, ``cudnn.benchmark=False``);
* mixup: ``lam = np.random.beta(alpha, alpha)`` from numpy's global RNG and
  ``torch.randperm(B)`` from torch's global (CPU) RNG, then moved to the device;
* loss: the official ``BSExpertLoss`` shape -- a python loop over experts of
  ``CE(logits_k + tau_k * log prior, y)``, summed and divided by E; with mixup
  ``lam * L(y_a) + (1 - lam) * L(y_b)`` (two loss evaluations);
* optimizer: ``torch.optim.SGD`` (momentum, Nesterov, weight decay on every parameter; torch's
  default implementation choice);
* ``loss.item()`` every step (the official metric tracker logs the loss per step).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from balpoe.data.bundle import ImageArrays
from balpoe.data.folder_loader import ArrayImageDataset, array_transforms
from balpoe.losses.priors import log_prior


def reference_loader(bundle, recipe, batch_size: int, workers: int, seed: int, pin_memory: bool = False,
                     train: ImageArrays | None = None) -> torch.utils.data.DataLoader:
    """The official-style DataLoader over ``train`` (default: ``bundle.train``), with the recipe's
    ``data.augment`` (crop padding, flip, rotation) and the bundle's normalisation."""
    arrays = train if train is not None else bundle.train
    a = recipe.data.augment
    transform = array_transforms(tuple(arrays.images.shape[-2:]), bundle.mean, bundle.std, train=True,
                                 padding=a.crop_padding, flip=a.flip, rotation=a.rotation)
    dataset = ArrayImageDataset(arrays, transform)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                       pin_memory=pin_memory, drop_last=False,
                                       generator=torch.Generator().manual_seed(seed))


def reference_optimizer(model: torch.nn.Module, recipe) -> torch.optim.Optimizer:
    o = recipe.optim
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                           nesterov=o.nesterov)


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
    prior = log_prior(class_counts).to(device)
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
