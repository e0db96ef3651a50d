"""Balanced Softmax (Ren et al. NeurIPS 2020, Sec. 3.1).

Balanced Softmax models the training posterior as ``phi_y = n_y e^(z_y) / sum_j n_j e^(z_j)`` and
trains with ``-log phi_y = CE(z + log n, y) = CE(z + log pi_train, y)`` (the constant ``log N``
cancels in the softmax).  That is exactly the logit-adjusted loss with ``tau = 1``
(Menon et al. 2021; BalPoE's loss of a single balanced expert), so this loss *is*
:class:`~balpoe.losses.logit_adjusted.BalPoELoss` with every tau 1: ``BalancedSoftmaxLoss(counts, E)``
equals ``BalPoELoss(counts, [1.0] * E)`` (with the same ``1e-9`` added to every class frequency).
"""

from __future__ import annotations

from typing import Sequence

import torch

from balpoe.losses.logit_adjusted import BalPoELoss
from balpoe.losses.reweighting import check_num_experts


class BalancedSoftmaxLoss(BalPoELoss):
    """Balanced Softmax of every expert, mean over experts: :class:`BalPoELoss` with tau 1 for each
    of the ``num_experts`` experts.  ``target``: int64 labels ``[B]`` or soft targets ``[B, C]``."""

    def __init__(self, class_counts: torch.Tensor | Sequence[float], num_experts: int = 1):
        super().__init__(class_counts, [1.0] * check_num_experts(num_experts))
