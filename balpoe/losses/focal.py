"""Cross-entropy, focal and class-balanced expert losses (mean over experts).

* Focal loss (Lin et al. ICCV 2017, Eq. 4, softmax form):
  ``FL(f, y) = -(1 - p_y)^gamma log p_y`` with ``p = softmax(f)``; ``gamma = 0`` is cross-entropy.
  The paper's ``alpha``-balancing (Eq. 5) is the per-class weight ``w_y`` below.
* Class-balanced loss (Cui et al. CVPR 2019, Sec. 3-4):
  ``CB(f, y) = (1 - beta) / (1 - beta^n_y) * L(f, y)`` with ``L`` softmax cross-entropy or focal,
  the weights normalised to sum to ``C`` (:func:`~balpoe.losses.reweighting.class_balanced_weights`).

Every expert is trained alone on the same target; the loss is the mean of the expert losses.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from balpoe.errors import BalpoeError
from balpoe.losses.reweighting import ReweightedExpertLoss, at_labels, check_finite

#: Where the class weight goes in the focal loss: ``paper`` ``w_y (1 - p_y)^gamma (-log p_y)``
#: (Lin et al. Eq. 5 with ``alpha_t = w_y``); ``ldam_drw`` the LDAM-DRW code's
#: ``(1 - exp(-w_y CE))^gamma w_y CE`` (its ``focal_loss`` on the weighted CE, ``losses.py`` l. 7-21).
FOCAL_FORMS = ("paper", "ldam_drw")


def _modulator(one_minus_p: torch.Tensor, gamma: float) -> torch.Tensor:
    """``(1 - p)^gamma``, its argument kept >= the smallest normal number: for ``gamma < 1`` the
    derivative of ``x^gamma`` is infinite at ``x = 0`` (a sample with ``p = 1`` in floating point) and
    would turn the gradient into NaN; the value changes by less than ``tiny^gamma``."""
    return one_minus_p.clamp_min(torch.finfo(one_minus_p.dtype).tiny) ** gamma


class FocalLoss(ReweightedExpertLoss):
    """Softmax focal loss of every expert, optionally class-balanced (``beta > 0``) and deferred
    (``drw_epoch``, as LDAM-DRW's "Focal + DRW"); mean over experts.

    ``gamma``: Lin et al.'s default 2 (Sec. 5.1, "gamma = 2 works best"); the LDAM-DRW code trains
    its focal baseline with ``gamma = 1`` (``cifar_train.py`` l. 215), the class-balanced-loss code
    defaults to ``--gamma 1.0`` (``src/cifar_main.py`` l. 671).  ``form`` (:data:`FOCAL_FORMS`) places
    the class weight; both forms agree when every weight is 1.  ``target``: int64 labels ``[B]`` or
    soft targets ``[B, C]`` (the expectation of the per-label loss over the target).
    """

    def __init__(self, class_counts: torch.Tensor | Sequence[float], num_experts: int = 1, gamma: float = 2.0,
                 beta: float = 0.0, drw_epoch: int | None = None, reduction: str = "mean", form: str = "paper"):
        super().__init__(class_counts, num_experts, beta, drw_epoch, reduction)
        check_finite("focal gamma", gamma, ">= 0")
        if form not in FOCAL_FORMS:
            raise BalpoeError(f"focal form must be one of {FOCAL_FORMS}, got {form!r}")
        self.gamma, self.form = float(gamma), form

    def class_losses(self, logits: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits, dim=-1)
        if self.gamma == 0:
            return -logp
        return -_modulator(-torch.expm1(logp), self.gamma) * logp    # -(1 - p)^gamma log p

    def weighted_losses(self, logits: torch.Tensor, target: torch.Tensor, labels: bool) -> torch.Tensor:
        if self.form == "paper" or self.gamma == 0:
            return super().weighted_losses(logits, target, labels)
        # LDAM-DRW: the modulating factor of the *weighted* cross-entropy x = w_y CE: (1 - e^-x)^gamma x
        w = self.class_weights.to(logits.dtype)
        ce = -F.log_softmax(logits, dim=-1)                         # [E, B, C]
        x = w * ce
        g = _modulator(-torch.expm1(-x), self.gamma) * x
        if labels:
            return at_labels(g, target)
        return (target.to(logits.dtype) * g).sum(-1)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gamma={self.gamma}, form={self.form!r}"


class CrossEntropyLoss(FocalLoss):
    """Plain softmax cross-entropy of every expert, mean over experts: ``mean_k CE(f_k, y)``
    (:class:`FocalLoss` with ``gamma = 0``, every class weight 1)."""

    def __init__(self, class_counts: torch.Tensor | Sequence[float], num_experts: int = 1):
        super().__init__(class_counts, num_experts, gamma=0.0)


class ClassBalancedLoss(FocalLoss):
    """Class-balanced loss (Cui et al. 2019): softmax cross-entropy (``gamma = 0``, default) or
    focal (``gamma > 0``) weighted by ``(1 - beta) / (1 - beta^n_y)``, normalised to sum to ``C``.

    ``beta = 0.9999`` as the official class-balanced-loss CIFAR scripts
    (``cifar_im_trainval_cb.sh`` l. 7) and LDAM-DRW's re-weighting (``cifar_train.py`` l. 194, 202);
    ``reduction='mean'`` (``(1/B) sum_b w_y l_b``) as the class-balanced-loss code
    (``src/cifar_main.py`` l. 333-335), ``'weighted_mean'`` as LDAM-DRW's ``Reweight`` / ``DRW`` rules
    (torch ``cross_entropy(weight=w)``, ``cifar_train.py`` l. 211); with ``drw_epoch=160`` and
    ``'weighted_mean'`` this is LDAM-DRW's "CE + DRW".
    """

    def __init__(self, class_counts: torch.Tensor | Sequence[float], num_experts: int = 1, beta: float = 0.9999,
                 gamma: float = 0.0, drw_epoch: int | None = None, reduction: str = "mean", form: str = "paper"):
        super().__init__(class_counts, num_experts, gamma, beta, drw_epoch, reduction, form)
