"""Per-class re-weighting shared by the baseline losses: class-balanced weights by the effective
number of samples (Cui et al. CVPR 2019), deferred re-weighting (DRW, Cao et al. NeurIPS 2019), and
:class:`ReweightedExpertLoss`, the base of the losses that use them (:mod:`~balpoe.losses.focal`,
:mod:`~balpoe.losses.ldam`).

Class-balanced weights: the effective number of samples of class ``j`` is
``E_j = (1 - beta^n_j) / (1 - beta)`` (Cui et al. Sec. 3); class ``j`` is weighted by ``1 / E_j``,
normalised so that the weights sum to the number of classes ``C``, as both official codes do
(class-balanced-loss ``src/cifar_main.py`` l. 428-430; LDAM-DRW ``cifar_train.py`` l. 203-205).

Two reductions over the batch (:data:`REDUCTIONS`), both with the weight ``w_y`` of each sample's
label:

* ``mean``: ``(1/B) sum_b w_{y_b} l_b``, the batch mean of Cui et al.'s per-sample loss
  ``w_y L(f, y)`` (the official class-balanced-loss code: ``tf.losses.softmax_cross_entropy`` with
  ``weights=w_y``, whose default reduction divides by the number of non-zero weights, ``B``;
  ``src/cifar_main.py`` l. 333-335);
* ``weighted_mean``: ``sum_b w_{y_b} l_b / sum_b w_{y_b}``, torch's ``cross_entropy(weight=w)``: the
  official LDAM-DRW and RIDE codes (LDAM-DRW ``losses.py`` l. 45, RIDE ``model/loss.py`` l. 229).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from balpoe.errors import BalpoeError
from balpoe.losses.priors import log_prior

#: Batch reductions of the per-sample weighted losses (module docstring).
REDUCTIONS = ("mean", "weighted_mean")


def class_counts_vector(class_counts: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """``class_counts`` as a float64 ``[C]`` vector, validated as :func:`~balpoe.losses.priors.log_prior`
    validates it (1-D, finite, non-negative, not all zero)."""
    log_prior(class_counts)
    return torch.as_tensor(class_counts, dtype=torch.float64).detach().cpu()


def check_finite(what: str, value, bound: str = "") -> float:
    """``value`` as a float when it is a finite real number (not a bool) satisfying ``bound``
    (``""``, ``"> 0"`` or ``">= 0"``), else a one-line :class:`BalpoeError`
    ``<what> must be a finite number[ bound], got <value>``."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not (ok and (bound == "" or (value > 0 if bound == "> 0" else value >= 0))):
        raise BalpoeError(f"{what} must be a finite number{' ' + bound if bound else ''}, got {value!r}")
    return float(value)


def check_positive_counts(counts: torch.Tensor, what: str) -> None:
    """Every class count > 0, else a one-line :class:`BalpoeError` naming the first empty class."""
    if bool((counts <= 0).any()):
        raise BalpoeError(f"{what} need every class count > 0, "
                          f"class {int(torch.nonzero(counts <= 0)[0])} has {counts[counts <= 0][0].item():g}")


def class_balanced_weights(class_counts: torch.Tensor | Sequence[float], beta: float) -> torch.Tensor:
    """Class-balanced weights ``w_j ∝ (1 - beta) / (1 - beta^n_j)`` normalised to sum to ``C``
    (float64 ``[C]``).  ``beta = 0`` gives every class weight 1; ``beta -> 1`` tends to inverse class
    frequency.  Requires ``0 <= beta < 1`` and, for ``beta > 0``, every count > 0."""
    counts = class_counts_vector(class_counts)
    if not (isinstance(beta, (int, float)) and not isinstance(beta, bool) and 0.0 <= beta < 1.0):
        raise BalpoeError(f"class-balanced beta must be a number in [0, 1), got {beta!r}")
    if beta == 0:
        return torch.ones_like(counts)
    check_positive_counts(counts, f"class-balanced weights (beta={beta})")
    weights = (1.0 - beta) / -torch.expm1(counts * math.log(beta))   # (1 - beta) / (1 - beta^n)
    return weights / weights.sum() * counts.numel()


def check_num_experts(num_experts: int) -> int:
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise BalpoeError(f"num_experts must be a positive integer, got {num_experts!r}")
    return num_experts


def expert_logits_float(expert_logits: torch.Tensor, num_experts: int, num_classes: int) -> torch.Tensor:
    """The checked ``[E, B, C]`` logits in float32 (float64 stays float64)."""
    if expert_logits.dim() != 3 or expert_logits.shape[0] != num_experts or expert_logits.shape[2] != num_classes:
        raise ValueError(f"expected expert logits [E={num_experts}, B, C={num_classes}], "
                         f"got {tuple(expert_logits.shape)}")
    return expert_logits if expert_logits.dtype == torch.float64 else expert_logits.float()


def is_labels(target: torch.Tensor, batch: int, num_classes: int) -> bool:
    """True for int64 labels ``[B]``, False for soft targets ``[B, C]``; anything else raises."""
    if target.dtype == torch.long and target.shape == (batch,):
        return True
    if target.is_floating_point() and target.shape == (batch, num_classes):
        return False
    raise ValueError(f"target must be int64 labels [B={batch}] or soft targets [B={batch}, C={num_classes}], "
                     f"got {target.dtype} {tuple(target.shape)}")


def at_labels(values: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``values[k, b, target[b]]`` for per-expert, per-class values ``[E, B, C]``: ``[E, B]``."""
    return values.gather(-1, target.view(1, -1, 1).expand(values.shape[0], -1, 1)).squeeze(-1)


class ReweightedExpertLoss(nn.Module):
    """Base of the per-class-weighted expert losses: per expert ``k`` a per-sample loss
    ``l(f_k(x_b), y_b)`` weighted by ``w_{y_b}`` and reduced over the batch (:data:`REDUCTIONS`), then
    the mean over experts.

    ``w`` is :func:`class_balanced_weights` with ``beta``; with ``drw_epoch`` set the weights are
    deferred (DRW, Cao et al. 2019, Sec. 3.3): 1 for every class while the epoch is below
    ``drw_epoch``, the class-balanced weights from epoch ``drw_epoch`` on.  The training loop says
    which epoch it runs through :meth:`set_epoch` (0-based, as the data loader's ``set_epoch``);
    before any call the loss is in epoch 0.

    Subclasses give the per-sample losses: :meth:`class_losses` (``l(f, c)`` for every candidate
    label ``c``, ``[E, B, C]``) and, where labels have a cheaper or exacter form,
    :meth:`label_losses`.  A soft target ``t`` ``[B, C]`` (mixup) is the expectation over labels:
    sample ``b`` contributes ``sum_c t_bc w_c l(f, c)`` with weight ``sum_c t_bc w_c``, so the loss
    is linear in ``t`` under ``mean``, and under ``weighted_mean`` for mixup of a batch with a
    permutation of itself (both label halves then have the same total weight).
    """

    def __init__(self, class_counts: torch.Tensor | Sequence[float], num_experts: int, beta: float = 0.0,
                 drw_epoch: int | None = None, reduction: str = "mean"):
        super().__init__()
        counts = class_counts_vector(class_counts)
        self.num_experts = check_num_experts(num_experts)
        self.num_classes = counts.numel()
        if reduction not in REDUCTIONS:
            raise BalpoeError(f"loss reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if drw_epoch is not None and (isinstance(drw_epoch, bool) or not isinstance(drw_epoch, int) or drw_epoch < 0):
            raise BalpoeError(f"drw_epoch must be a non-negative integer or None, got {drw_epoch!r}")
        self.beta, self.drw_epoch, self.reduction = beta, drw_epoch, reduction
        balanced = class_balanced_weights(counts, beta).to(torch.float32)
        self.register_buffer("balanced_weights", balanced)
        self.register_buffer("class_weights", balanced.clone())
        self.epoch = 0
        self.set_epoch(0)

    @property
    def reweighting(self) -> bool:
        """Whether the class-balanced weights are in force in the current epoch."""
        return self.drw_epoch is None or self.epoch >= self.drw_epoch

    def set_epoch(self, epoch: int) -> None:
        """Tell the loss the (0-based) epoch about to run; switches the DRW weights on at ``drw_epoch``
        (in place, so the weights stay on their device)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise BalpoeError(f"epoch must be a non-negative integer, got {epoch!r}")
        self.epoch = epoch
        with torch.no_grad():
            if self.reweighting:
                self.class_weights.copy_(self.balanced_weights)
            else:
                self.class_weights.fill_(1.0)

    # ---- per-sample losses (subclasses)

    def class_losses(self, logits: torch.Tensor) -> torch.Tensor:
        """``l(f_k(x_b), c)`` for every expert, sample and candidate label ``c``: ``[E, B, C]``."""
        raise NotImplementedError

    def label_losses(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``l(f_k(x_b), y_b)``: ``[E, B]``."""
        return at_labels(self.class_losses(logits), target)

    def weighted_losses(self, logits: torch.Tensor, target: torch.Tensor, labels: bool) -> torch.Tensor:
        """``w_y l(f_k, y)`` per expert and sample (``[E, B]``); soft targets: ``sum_c t_c w_c l(f_k, c)``."""
        w = self.class_weights.to(logits.dtype)
        if labels:
            return w[target] * self.label_losses(logits, target)
        return (target.to(logits.dtype) * w * self.class_losses(logits)).sum(-1)

    def expert_losses(self, expert_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The reduced loss of every expert, ``[E]``."""
        logits = expert_logits_float(expert_logits, self.num_experts, self.num_classes)
        labels = is_labels(target, logits.shape[1], self.num_classes)
        losses = self.weighted_losses(logits, target, labels)
        if self.reduction == "mean":
            return losses.mean(-1)
        w = self.class_weights.to(logits.dtype)
        sample_weights = w[target] if labels else target.to(logits.dtype) @ w
        return losses.sum(-1) / sample_weights.sum()

    def forward(self, expert_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.expert_losses(expert_logits, target).mean()

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, num_experts={self.num_experts}, beta={self.beta}, "
                f"drw_epoch={self.drw_epoch}, reduction={self.reduction!r}")
