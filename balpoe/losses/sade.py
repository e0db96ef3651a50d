"""SADE's skill-diverse expert loss (Zhang et al. NeurIPS 2022, Sec. 3.1), stage 1.

Three experts see the same long-tailed data and learn three label priors::

    forward  (head) expert:  CE(v_1, y)                                  softmax cross-entropy
    uniform  expert:         CE(v_2 + log pi, y)                         Balanced Softmax
    backward (tail) expert:  CE(v_3 + log pi - lambda * log pi_inv, y)   inverse softmax loss

``pi`` is the training label distribution and ``pi_inv`` the *inverse* prior: the same values with
their order reversed by rank, the most frequent class getting the smallest frequency (the official
``DiverseExpertLoss.inverse_prior``, ``model/loss.py`` l. 255-261: sort, rank, ``C - 1 - rank``); for
classes sorted by count this is the prior read backwards.  Both logs add ``1e-9`` to the
frequencies (l. 278, 283), as :func:`~balpoe.losses.priors.log_prior` does.  The loss is the *sum*
of the three expert losses (l. 275-286), not their mean.

``lambda`` (``tau`` here, the official name): 2 by default and in the CIFAR-100-LT and ImageNet-LT
configs, 1 in the iNaturalist 2018 and Places-LT configs (``model/loss.py`` l. 245;
``configs/config_*_sade.json``).  For an exactly exponential profile (``log pi_inv = const - log pi``)
the backward expert is the logit-adjusted loss with ``tau = 1 + lambda`` (BalPoE's tail expert at
``tau = 3`` for ``lambda = 2``); for other profiles it is not a power of ``pi``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from balpoe.errors import BalpoeError
from balpoe.losses.priors import log_prior
from balpoe.losses.reweighting import ReweightedExpertLoss, check_finite


def inverse_prior(prior: torch.Tensor) -> torch.Tensor:
    """SADE's inverse prior: the values of ``prior`` ``[C]`` reassigned by reversed rank (the class
    with the r-th smallest value gets the r-th largest).  Ties are ranked in class order (stable
    sort), so the result does not depend on the sort's implementation."""
    order = torch.argsort(prior, stable=True)
    inverse = torch.empty_like(prior)
    inverse[order] = prior[order.flip(0)]
    return inverse


class SADELoss(ReweightedExpertLoss):
    """SADE's three expert losses (module docstring), summed.  ``expert_logits [3, B, C]``;
    ``target``: int64 labels ``[B]`` or soft targets ``[B, C]`` (each loss is a cross-entropy, linear
    in the target).  :meth:`set_epoch` is accepted and changes nothing."""

    def __init__(self, class_counts: torch.Tensor | Sequence[float], num_experts: int = 3, tau: float = 2.0):
        super().__init__(class_counts, num_experts)
        if num_experts != 3:
            raise BalpoeError(f"SADE trains exactly 3 experts (forward, uniform, backward), got num_experts={num_experts}")
        self.tau = check_finite("SADE tau", tau)
        lp = log_prior(class_counts, torch.float64)                 # log(pi + 1e-9)
        # log(pi_inv + 1e-9): pi_inv's values are pi's, so the reassignment commutes with log(. + 1e-9)
        lp_inv = inverse_prior(lp)
        offsets = torch.stack([torch.zeros_like(lp), lp, lp - self.tau * lp_inv])
        self.register_buffer("expert_offsets", offsets.to(torch.float32))

    def class_losses(self, logits: torch.Tensor) -> torch.Tensor:
        return -F.log_softmax(logits + self.expert_offsets.to(logits.dtype)[:, None, :], dim=-1)

    def forward(self, expert_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.expert_losses(expert_logits, target).sum()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, tau={self.tau}"
