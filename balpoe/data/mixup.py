"""Mixup (Zhang et al. 2018) as BalPoE and MiSLAS use it.

One lambda ~ Beta(alpha, alpha) per batch (no max(lam, 1 - lam)), each sample mixed with a random
permutation of the batch: x~ = lam x + (1 - lam) x[perm].  The loss is
lam * L(y) + (1 - lam) * L(y[perm]) or, equivalently for cross-entropy-type losses, the loss of
the soft target lam * onehot(y) + (1 - lam) * onehot(y[perm]) (see :func:`mixup_targets`).

timm's ``Mixup`` pairs samples by reversing the batch and requires an even batch size, so it is
not equivalent to the official code (random permutation, odd last batches); hence this module.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def mixup_batch(x: torch.Tensor, y: torch.Tensor, alpha: float, rng: np.random.Generator,
                generator: torch.Generator | None = None):
    """Returns ``(x_mixed, y_a, y_b, lam)``; ``lam`` is sampled on the host (no device sync).

    The mixed batch is computed as ``lam * x + (1 - lam) * x[perm]``, the official expression, so
    that it is bit-identical to the official code's for the same draws (a fused multiply-add such as
    ``x.mul(lam).add_(x[perm], alpha=1 - lam)`` rounds differently, by up to one float32 ulp)."""
    lam = float(rng.beta(alpha, alpha))
    perm = torch.randperm(x.shape[0], device=x.device, generator=generator)
    return lam * x + (1 - lam) * x[perm], y, y[perm], lam


def mixup_targets(y_a: torch.Tensor, y_b: torch.Tensor, lam: float, num_classes: int,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Soft targets ``lam * onehot(y_a) + (1 - lam) * onehot(y_b)``, ``[B, C]``, in ``dtype`` (the
    trainer passes the input batch's dtype: float32, or float64 where a model is run in double)."""
    return (F.one_hot(y_a, num_classes).to(dtype).mul_(lam)
            .add_(F.one_hot(y_b, num_classes).to(dtype), alpha=1.0 - lam))
