"""Losses: the training prior and taus (:mod:`~balpoe.losses.priors`), BalPoE's logit-adjusted
expert loss, MiSLAS' label-aware smoothing, and the loss registry (:mod:`~balpoe.losses.build`)."""

from balpoe.losses.las import ExpertLabelAwareSmoothingLoss, LabelAwareSmoothingLoss, label_aware_epsilons
from balpoe.losses.logit_adjusted import BalPoELoss
from balpoe.losses.priors import log_prior, make_tau_list, stage2_expert_offsets

__all__ = ["BalPoELoss", "ExpertLabelAwareSmoothingLoss", "LabelAwareSmoothingLoss", "label_aware_epsilons",
           "log_prior", "make_tau_list", "stage2_expert_offsets"]
