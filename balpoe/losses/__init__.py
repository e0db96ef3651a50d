"""Losses: BalPoE's logit-adjusted expert loss and MiSLAS' label-aware smoothing."""

from balpoe.losses.las import ExpertLabelAwareSmoothingLoss, LabelAwareSmoothingLoss, label_aware_epsilons
from balpoe.losses.logit_adjusted import BalPoELoss, log_prior, make_tau_list

__all__ = ["BalPoELoss", "ExpertLabelAwareSmoothingLoss", "LabelAwareSmoothingLoss", "label_aware_epsilons",
           "log_prior", "make_tau_list"]
