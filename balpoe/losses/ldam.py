"""Label-distribution-aware margin loss with deferred re-weighting, LDAM-DRW (Cao et al. NeurIPS 2019).

LDAM (Sec. 3.2, Eq. 13): with per-class margins ``Delta_j = C / n_j^(1/4)``,
``L(f, y) = -log( e^(z_y - Delta_y) / (e^(z_y - Delta_y) + sum_{j != y} e^(z_j)) )``.
The official code (``losses.py`` l. 27-28, 45) sets ``C`` so that the largest margin is
``max_m = 0.5`` and applies the margin to cosine logits scaled by ``s = 30``:
``CE(s * (cos - m_y e_y), y)``.  The project's cosine head (``CosineHead``, scale 30) already returns
``z = s * cos``, so this loss subtracts ``s * m_y`` from ``z_y`` (the form of the RIDE code,
``model/loss.py`` l. 105-114): the same numbers when the head's scale equals ``s``.

DRW (Sec. 3.3, Algorithm 1): plain LDAM until epoch ``drw_epoch``, then the class-balanced weights
of Cui et al. with ``beta = 0.9999``.  The official rule (``cifar_train.py`` l. 199-206,
``idx = epoch // 160``, ``betas = [0, 0.9999]``, 0-based epochs of 200) gives every class weight
``(1 - 0) / (1 - 0^n) = 1`` in epochs 0-159 and the normalised class-balanced weights in 160-199,
reduced as torch's ``cross_entropy(weight=w)`` (``sum w_y l / sum w_y``; ``losses.py`` l. 45).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from balpoe.losses.reweighting import (ReweightedExpertLoss, at_labels, check_finite, check_positive_counts,
                                      class_counts_vector)


def ldam_margins(class_counts: torch.Tensor | Sequence[float], max_m: float = 0.5) -> torch.Tensor:
    """LDAM margins ``m_j ∝ n_j^(-1/4)`` scaled so that the largest (the rarest class's) is ``max_m``
    (float64 ``[C]``).  Every count must be > 0."""
    counts = class_counts_vector(class_counts)
    check_positive_counts(counts, "LDAM margins")
    check_finite("LDAM max_m", max_m, "> 0")
    m = counts ** -0.25
    return m * (max_m / m.max())


class LDAMLoss(ReweightedExpertLoss):
    """LDAM-DRW of every expert, mean over experts.

    Defaults are the official CIFAR settings: ``max_m = 0.5``, ``s = 30`` (``cifar_train.py``
    l. 213), class-balanced ``beta = 0.9999`` deferred to epoch ``drw_epoch = 160`` of 200
    (l. 201-202), ``reduction = 'weighted_mean'``.  ``drw_epoch=None`` re-weights from the start
    (LDAM-DRW's ``Reweight`` rule); ``beta=0`` is plain LDAM.  Call :meth:`set_epoch` every epoch.

    ``expert_logits`` must be the scaled cosine logits ``s * cos`` (a cosine head of scale ``s``).
    ``target``: int64 labels ``[B]``, or soft targets ``[B, C]``: the expectation over labels of
    the per-label loss, each label with its own margin (computed in float64 from
    ``-log p_c + a_c + log(1 - p_c (1 - e^-a_c))``, ``a_c = s m_c``, ``p = softmax(z)``).
    """

    def __init__(self, class_counts: torch.Tensor | Sequence[float], num_experts: int = 1, max_m: float = 0.5,
                 s: float = 30.0, beta: float = 0.9999, drw_epoch: int | None = 160,
                 reduction: str = "weighted_mean"):
        super().__init__(class_counts, num_experts, beta, drw_epoch, reduction)
        self.max_m, self.s = float(max_m), check_finite("LDAM scale s", s, "> 0")
        margins = ldam_margins(class_counts, max_m)
        self.register_buffer("margins", margins.to(torch.float32))
        self.register_buffer("logit_margins", (self.s * margins).to(torch.float32))   # a_j = s * m_j

    def label_losses(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # subtract s * m_y from the label's logit only, then cross-entropy (official arithmetic)
        a = self.logit_margins.to(logits.dtype)[target]                       # [B]
        onehot = F.one_hot(target, self.num_classes).to(logits.dtype)         # [B, C]
        logp = F.log_softmax(logits - a[:, None] * onehot, dim=-1)
        return -at_labels(logp, target)

    def class_losses(self, logits: torch.Tensor) -> torch.Tensor:
        # l(z, c) = -log softmax(z - a_c e_c)_c = -log p_c + a_c + log(1 - p_c (1 - e^-a_c)), in float64
        z = logits.double()
        a = self.logit_margins.double()
        logp = F.log_softmax(z, dim=-1)
        losses = -logp + a + torch.log1p(logp.exp() * torch.expm1(-a))
        return losses.to(logits.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", max_m={self.max_m}, s={self.s}"
