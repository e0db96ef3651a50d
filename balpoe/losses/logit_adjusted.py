"""BalPoE's logit-adjusted expert loss (Sanchez Aimar et al., CVPR 2023, Sec. 3).

Expert k is trained with ``l_tau(y, f) = -log softmax(f_k(x) + tau_k * log pi_train)_y``; the total
loss is the mean over experts.  tau = 0 is plain cross-entropy (the head expert), tau = 1 is logit
adjustment / Balanced Softmax (Menon et al. 2021; Ren et al. 2020), tau = 2 the tail expert.  The
ensemble (mean logits) is balanced when the mean tau is 1.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from balpoe.losses.priors import log_prior
from balpoe.losses.reweighting import at_labels


class BalPoELoss(nn.Module):
    """Mean over experts of CE(f_k + tau_k * log pi_train, y).

    ``forward(expert_logits [E, B, C], target)`` where ``target`` is int64 labels ``[B]`` or soft
    targets ``[B, C]`` (mixup's soft-target form: the loss is linear in the target, so
    ``lam * L(y_a) + (1 - lam) * L(y_b)`` equals the loss of ``lam * onehot(y_a) + (1 - lam) * onehot(y_b)``).
    """

    def __init__(self, class_counts: torch.Tensor | Sequence[int], tau: Sequence[float]):
        super().__init__()
        self.register_buffer("log_prior", log_prior(class_counts))
        self.register_buffer("tau", torch.tensor(list(tau), dtype=torch.float32))

    def adjusted_logits(self, expert_logits: torch.Tensor) -> torch.Tensor:
        """``f_k + tau_k * log pi_train`` for every expert, ``[E, B, C]`` in float32 (float64 logits stay
        float64, so that a model run in double is compared in double)."""
        if expert_logits.dim() != 3 or expert_logits.shape[0] != self.tau.numel():
            raise ValueError(f"expected expert logits [E={self.tau.numel()}, B, C], got {tuple(expert_logits.shape)}")
        logits = expert_logits if expert_logits.dtype == torch.float64 else expert_logits.float()
        return logits + self.tau[:, None, None] * self.log_prior

    def forward(self, expert_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(self.adjusted_logits(expert_logits), dim=-1)
        if target.dtype == torch.long:
            nll = -at_labels(logp, target)
        else:
            nll = -(target.to(logp.dtype) * logp).sum(-1)
        return nll.mean()
