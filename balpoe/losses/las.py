"""Label-aware smoothing (MiSLAS, Zhong et al. CVPR 2021, Sec. 3.2 and Appendix D.2).

Each class ``y`` gets its own smoothing factor ``eps_y = f(N_y)`` that grows with its training
count ``N_y`` (Eq. 3 / Eq. 7), so head classes are smoothed more than tail classes.  Two target
distributions (:data:`TARGETS`), both with ``eps_y`` of the label ``y``:

* ``paper`` (MiSLAS Eq. 1): ``1 - eps_y`` on the label, ``eps_y / (K - 1)`` on every other class;
* ``official`` (the official code, ``LabelAwareSmoothing`` in ``methods.py`` of
  dvlab-research/MiSLAS: ``(1 - eps_y) * NLL + eps_y * mean_k(-log p_k)``): ``eps_y / K`` on every
  class, the label included, so ``1 - eps_y + eps_y / K`` on the label.

``paper`` with ``eps`` is ``official`` with ``eps * K / (K - 1)`` (11% more smoothing for K = 10):
the shipped MiSLAS recipes, which reproduce the paper's tables with the official code's values of
``eps_1, eps_K``, say ``stage2.las_target: official``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from balpoe.errors import BalpoeError
from balpoe.losses.priors import log_prior

FORMS = ("concave", "linear", "convex", "power")
#: Target distributions of the smoothing: ``paper`` (MiSLAS Eq. 1) or ``official`` (MiSLAS methods.py).
TARGETS = ("paper", "official")


def label_aware_epsilons(class_counts: torch.Tensor | Sequence[int], eps_1: float, eps_K: float,
                         form: str = "concave", power: float | None = None) -> torch.Tensor:
    """Per-class smoothing factors ``eps_y = f(N_y)`` (float64 tensor ``[C]``, class order as given).

    ``r_y = (N_y - N_K) / (N_1 - N_K)`` with ``N_1 = max`` and ``N_K = min`` of ``class_counts``:

    * ``concave`` (Eq. 3): ``eps_K + (eps_1 - eps_K) * sin(pi/2 * r_y)``  (paper default)
    * ``linear``  (Eq. 3): ``eps_K + (eps_1 - eps_K) * r_y``
    * ``convex``  (Eq. 3): ``eps_1 + (eps_1 - eps_K) * sin(3*pi/2 + pi/2 * r_y)``
    * ``power``   (Eq. 7): ``eps_K + (eps_1 - eps_K) * r_y ** power``  (``power > 0``)

    So ``f(N_1) = eps_1``, ``f(N_K) = eps_K`` and ``f`` is non-decreasing in ``N``.  When every
    class has the same count (``N_1 = N_K``) all classes are head classes and get ``eps_1``.
    Requires ``0 <= eps_K <= eps_1 <= 1``; the paper searches ``eps_1, eps_K`` in [0, 0.5]
    (CIFAR-100-LT: ``eps_1 = 0.4, eps_K = 0.1``).
    """
    counts = torch.as_tensor(class_counts).to(torch.float64)
    if counts.dim() != 1 or counts.numel() < 2:
        raise BalpoeError(f"class_counts must be a 1-D list of at least 2 class counts, "
                          f"got shape {tuple(counts.shape)}")
    if bool((counts < 0).any()):
        raise BalpoeError(f"class_counts must be non-negative, got min {counts.min().item():g}")
    if form not in FORMS:
        raise BalpoeError(f"label-aware smoothing form must be one of {FORMS}, got {form!r}")
    if not (0.0 <= eps_K <= eps_1 <= 1.0):
        raise BalpoeError(f"label-aware smoothing needs 0 <= eps_K <= eps_1 <= 1, got eps_1={eps_1}, eps_K={eps_K}")
    if form == "power":
        if power is None or not power > 0 or not math.isfinite(power):
            raise BalpoeError(f"label-aware smoothing form 'power' (Eq. 7) needs power > 0, got power={power}")
    elif power is not None:
        raise BalpoeError(f"power={power} is only used with form='power', got form={form!r}")

    n_1, n_k = counts.max(), counts.min()
    if n_1 == n_k:
        r = torch.ones_like(counts)
    else:
        r = (counts - n_k) / (n_1 - n_k)
    if form == "concave":
        g = torch.sin(0.5 * math.pi * r)
    elif form == "linear":
        g = r
    elif form == "convex":
        # eps_1 + (eps_1 - eps_K) sin(3pi/2 + pi r / 2) = eps_K + (eps_1 - eps_K) (1 - cos(pi r / 2)).
        g = 1.0 + torch.sin(1.5 * math.pi + 0.5 * math.pi * r)
    else:
        g = r ** power
    # Pin the end points exactly (sin(pi/2), sin(2 pi) are off by an ulp in floating point).
    g = torch.where(r == 1, torch.ones_like(g), torch.where(r == 0, torch.zeros_like(g), g))
    return eps_K + (eps_1 - eps_K) * g


class LabelAwareSmoothingLoss(nn.Module):
    """Label-aware smoothing loss ``l(q, p) = -sum_i q_i log p_i``, ``eps`` from
    :func:`label_aware_epsilons`; mean over the batch.  ``target`` picks ``q`` (:data:`TARGETS`):

    * ``'paper'`` (default; MiSLAS Eq. 1): ``q_i = 1 - eps_y`` for ``i = y``, ``eps_y / (K - 1)``
      otherwise;
    * ``'official'`` (official MiSLAS ``methods.py``, ``LabelAwareSmoothing``):
      ``q_i = (1 - eps_y) [i = y] + eps_y / K``, i.e. the loss
      ``(1 - eps_y) * (-log p_y) + eps_y * mean_k(-log p_k)``.

    ``logits`` is ``[B, C]`` or per-expert ``[E, B, C]`` (the loss is then the mean of the expert
    losses, each expert fitting the same targets).  ``target`` is int64 labels ``[B]`` or soft
    targets ``[B, C]`` (rows summing to 1, e.g. mixup); a soft target ``t`` uses the same mixture
    of the per-label distributions, ``q = sum_y t_y q^(y)``, so ``loss(t)`` is linear in ``t``
    (for two-label mixup ``t = lam e_a + (1 - lam) e_b`` this is the official
    ``lam * loss(y_a) + (1 - lam) * loss(y_b)``).
    """

    def __init__(self, class_counts: torch.Tensor | Sequence[int], eps_1: float, eps_K: float,
                 form: str = "concave", power: float | None = None, target: str = "paper"):
        super().__init__()
        if target not in TARGETS:
            raise BalpoeError(f"label-aware smoothing target must be one of {TARGETS}, got {target!r}")
        eps = label_aware_epsilons(class_counts, eps_1, eps_K, form, power)
        self.num_classes = eps.numel()
        self.form, self.power, self.eps_1, self.eps_K, self.target = form, power, eps_1, eps_K, target
        # the smoothing mass eps_y is spread over K - 1 classes (paper) or all K classes (official)
        self.spread = self.num_classes - 1 if target == "paper" else self.num_classes
        self.register_buffer("epsilons", eps.to(torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.dim() == 3:
            return torch.stack([self._loss(z, target) for z in logits.unbind(0)]).mean()
        if logits.dim() != 2:
            raise ValueError(f"logits must be [B, C] or [E, B, C], got {tuple(logits.shape)}")
        return self._loss(logits, target)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        K = self.num_classes
        if logits.shape[-1] != K:
            raise ValueError(f"logits have {logits.shape[-1]} classes, the loss was built for {K}")
        logp = F.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
        eps = self.epsilons.to(device=logp.device, dtype=logp.dtype)
        if target.dim() == 1:
            e = eps[target]                                          # [B]
            logp_y = logp.gather(1, target[:, None]).squeeze(1)      # [B]
            if self.target == "official":
                # methods.py: confidence * nll_loss + smoothing * smooth_loss
                loss = (1.0 - e) * -logp_y + e * -logp.mean(1)
            else:
                off = logp.sum(1) - logp_y                           # sum over i != y
                loss = -((1.0 - e) * logp_y + e / (K - 1) * off)
        else:
            t = target.to(logp.dtype)
            # the t-mixture of the per-label targets, q = (t . eps)/S * 1 + t * peak with S = K - 1 and
            # peak = 1 - eps - eps/S (paper: eps/S off the label only), S = K and peak = 1 - eps (official)
            uniform = (t @ eps) / self.spread                        # [B]
            peak = t * (1.0 - eps - eps / self.spread if self.target == "paper" else 1.0 - eps)  # [B, C]
            loss = -(uniform * logp.sum(1) + (peak * logp).sum(1))
        return loss.mean()

    def extra_repr(self) -> str:
        p = f", power={self.power}" if self.power is not None else ""
        return (f"num_classes={self.num_classes}, eps_1={self.eps_1}, eps_K={self.eps_K}, form={self.form!r}{p}, "
                f"target={self.target!r}")


class ExpertLabelAwareSmoothingLoss(LabelAwareSmoothingLoss):
    """Label-aware smoothing of per-expert logits with a fixed logit offset per expert:
    ``mean_k LAS(f_k + delta_k * log pi_train, y)`` for logits ``[E, B, C]``.

    ``expert_offsets`` (``delta_k``, one per expert) say which prior each expert's *raw* logits
    ``f_k`` keep after training on the sampled stream; see
    :func:`balpoe.losses.priors.stage2_expert_offsets` for the stage-2 choice.  With every offset 0 this
    is exactly :class:`LabelAwareSmoothingLoss` (the logits are passed through untouched).
    """

    def __init__(self, class_counts: torch.Tensor | Sequence[int], expert_offsets: Sequence[float],
                 eps_1: float, eps_K: float, form: str = "concave", power: float | None = None,
                 target: str = "paper"):
        super().__init__(class_counts, eps_1, eps_K, form, power, target)
        offsets = torch.tensor([float(d) for d in expert_offsets], dtype=torch.float32)
        if offsets.dim() != 1 or offsets.numel() < 1 or not bool(torch.isfinite(offsets).all()):
            raise BalpoeError(f"expert_offsets must be a non-empty list of finite numbers, got {list(expert_offsets)}")
        self.register_buffer("expert_offsets", offsets)
        self.register_buffer("log_prior", log_prior(class_counts))
        self.adjusts = bool((offsets != 0).any())

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        E = self.expert_offsets.numel()
        if logits.dim() != 3 or logits.shape[0] != E:
            raise ValueError(f"expected expert logits [E={E}, B, C], got {tuple(logits.shape)}")
        if self.adjusts:
            logits = logits.float() + self.expert_offsets[:, None, None] * self.log_prior
        return super().forward(logits, target)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", expert_offsets={self.expert_offsets.tolist()}"
