"""Losses: the training prior and taus (:mod:`~balpoe.losses.priors`), BalPoE's logit-adjusted
expert loss, MiSLAS' label-aware smoothing, the baseline losses (cross-entropy, focal,
class-balanced, LDAM-DRW, Balanced Softmax, RIDE, SADE), and the loss registry
(:mod:`~balpoe.losses.build`)."""

from balpoe.losses.balanced_softmax import BalancedSoftmaxLoss
from balpoe.losses.focal import ClassBalancedLoss, CrossEntropyLoss, FocalLoss
from balpoe.losses.las import ExpertLabelAwareSmoothingLoss, LabelAwareSmoothingLoss, label_aware_epsilons
from balpoe.losses.ldam import LDAMLoss, ldam_margins
from balpoe.losses.logit_adjusted import BalPoELoss
from balpoe.losses.priors import log_prior, make_tau_list, stage2_expert_offsets
from balpoe.losses.reweighting import class_balanced_weights
from balpoe.losses.ride import RIDELoss, ride_diversity_weights
from balpoe.losses.sade import SADELoss, inverse_prior

__all__ = ["BalPoELoss", "BalancedSoftmaxLoss", "ClassBalancedLoss", "CrossEntropyLoss",
           "ExpertLabelAwareSmoothingLoss", "FocalLoss", "LDAMLoss", "LabelAwareSmoothingLoss", "RIDELoss",
           "SADELoss", "class_balanced_weights", "inverse_prior", "label_aware_epsilons", "ldam_margins",
           "log_prior", "make_tau_list", "ride_diversity_weights", "stage2_expert_offsets"]
