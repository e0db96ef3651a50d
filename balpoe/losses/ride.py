"""RIDE's expert loss (Wang et al. ICLR 2021, Sec. 3, "distribution-aware diversity loss"), stage 1.

Each expert ``k`` is trained with LDAM-DRW (:class:`~balpoe.losses.ldam.LDAMLoss`) plus a diversity
term that pushes its temperature-scaled prediction away from the ensemble's::

    L = sum_k [ LDAM-DRW(z_k, y) + lambda * T_bar^2 * KL( softmax(z_bar / T) || softmax(z_k / T) ) ]

with ``z_bar = mean_k z_k`` (the RIDE model's output is the mean of the expert logits,
``model/ldam_drw_resnets/ride_resnet_cifar.py`` l. 196), the ensemble distribution held constant
(no gradient, ``model/loss.py`` l. 241-243; with ``z_bar`` the mean of all the ``z_k`` that gradient
would vanish anyway, since ``sum_k (log p - log q_k)`` is the same for every class), the KL
averaged over the batch (``batchmean``) and
``lambda = diversity_factor < 0``, so that minimising ``L`` *increases* the divergence.  The
temperature is per class once re-weighting is on (epoch >= ``drw_epoch``, the same switch as DRW,
``model/loss.py`` l. 190-199): ``T_c = T * w_c`` with ``w_c = C pi_c r + 1 - r`` divided by its
maximum (``r = reweight_factor``, l. 162-168), so rare classes get a lower temperature;
``T_bar = mean_c T_c`` (l. 233-238).  Before it ``T_c = T`` for every class.

Official constants (``model/loss.py`` l. 125-126): ``T = 1``, ``max_m = 0.5``, ``s = 30``,
``lambda = -0.2``, ``r = 0.05``; the CIFAR-100-LT config keeps ``lambda = -0.2``
(``configs/config_imbalance_cifar100_ride.json`` l. 36, ``additional_diversity_factor``) and the
ImageNet-LT / iNaturalist configs set ``r = 0.02`` / ``0.015``, with ``drw_epoch`` 160 of 200 (CIFAR) or 80 of 100.  The loss is the
*sum* over experts, as the official code (not the mean): keep it in mind when comparing learning
rates with the mean-over-experts losses.

Not here, because they are model concerns: RIDE's experts have reduced width (``reduce_dimension``:
layer2/layer3 of 24/48 instead of 32/64 channels on CIFAR, ``ride_resnet_cifar.py`` l. 111-121; the
recipe key ``model.reduce_dimension``), its logits are cosine logits scaled by ``s = 30``
(``use_norm``, l. 127-131, 175; ``model.head: cosine``, ``model.scale`` = ``loss.s``).  RIDE's
dynamic expert router (RIDE-EA, a second training stage) and its expert distillation are absent
from this library: the ``ride`` recipes evaluate the mean of all the experts' logits.  The official code also has a branch where,
with ``lambda = 0``, every expert's LDAM term is computed on the ensemble logits (``model/loss.py``
l. 224); it is not reproduced (no official config uses ``lambda = 0``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from balpoe.errors import BalpoeError
from balpoe.losses.ldam import LDAMLoss
from balpoe.losses.reweighting import check_finite, class_counts_vector, expert_logits_float


def ride_diversity_weights(class_counts: torch.Tensor | Sequence[float], reweight_factor: float = 0.05) -> torch.Tensor:
    """RIDE's per-class temperature factors ``w_c = (C pi_c r + 1 - r) / max_j (C pi_j r + 1 - r)``
    (float64 ``[C]``, largest 1); they must all be > 0."""
    counts = class_counts_vector(class_counts)
    r = reweight_factor
    check_finite("RIDE reweight_factor", r, ">= 0")
    w = counts.numel() * counts / counts.sum() * r + 1.0 - r
    if bool((w <= 0).any()):
        raise BalpoeError(f"RIDE reweight_factor {r} is too large: it makes a class temperature <= 0")
    return w / w.max()


class RIDELoss(nn.Module):
    """RIDE's stage-1 loss (module docstring): per-expert LDAM-DRW plus the distribution-aware
    diversity term, summed over experts.  Call :meth:`set_epoch` every epoch (0-based).

    ``expert_logits [E, B, C]`` are the experts' scaled cosine logits; ``target`` int64 labels
    ``[B]`` or soft targets ``[B, C]`` (the LDAM term is linear in them, the diversity term does not
    use them).
    """

    def __init__(self, class_counts: torch.Tensor | Sequence[float], num_experts: int = 3, max_m: float = 0.5,
                 s: float = 30.0, beta: float = 0.9999, drw_epoch: int | None = 160,
                 diversity_factor: float = -0.2, diversity_temperature: float = 1.0, reweight_factor: float = 0.05):
        super().__init__()
        self.base = LDAMLoss(class_counts, num_experts, max_m, s, beta, drw_epoch, "weighted_mean")
        self.diversity_factor = check_finite("RIDE diversity_factor", diversity_factor)
        self.diversity_temperature = check_finite("RIDE diversity_temperature", diversity_temperature, "> 0")
        self.reweight_factor = reweight_factor
        self.register_buffer("diversity_weights", ride_diversity_weights(class_counts, reweight_factor).float())

    @property
    def num_experts(self) -> int:
        return self.base.num_experts

    def set_epoch(self, epoch: int) -> None:
        """The (0-based) epoch about to run: from ``drw_epoch`` on, the LDAM term is class-balanced
        and the diversity temperature per class."""
        self.base.set_epoch(epoch)

    def temperatures(self) -> torch.Tensor:
        """The diversity temperature of every class in the current epoch, ``[C]``."""
        if self.base.reweighting:
            return self.diversity_temperature * self.diversity_weights
        return torch.full_like(self.diversity_weights, self.diversity_temperature)

    def diversity(self, expert_logits: torch.Tensor) -> torch.Tensor:
        """``T_bar^2 * sum_k KL(softmax(z_bar / T) || softmax(z_k / T))``, the KL averaged over the batch
        (without ``lambda``)."""
        z = expert_logits_float(expert_logits, self.num_experts, self.base.num_classes)
        T = self.temperatures().to(z.dtype)
        with torch.no_grad():
            ensemble = F.softmax(z.mean(0) / T, dim=-1)                     # [B, C]
        logq = F.log_softmax(z / T, dim=-1)                                 # [E, B, C]
        kl = F.kl_div(logq, ensemble.expand_as(logq), reduction="sum") / z.shape[1]
        return T.mean() ** 2 * kl

    def forward(self, expert_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        base = self.base.expert_losses(expert_logits, target).sum()
        if self.diversity_factor == 0:
            return base
        return base + self.diversity_factor * self.diversity(expert_logits)

    def extra_repr(self) -> str:
        return (f"diversity_factor={self.diversity_factor}, diversity_temperature={self.diversity_temperature}, "
                f"reweight_factor={self.reweight_factor}")
