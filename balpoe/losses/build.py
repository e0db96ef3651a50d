"""Recipe ``loss`` section -> the training criterion.  The loss registry lives here.

To add a stage-1 loss, register a builder ``builder(loss, class_counts, taus) -> nn.Module``
(``loss``: the recipe's ``loss`` section, :class:`~balpoe.recipe.LossConfig`; ``class_counts``:
int64 ``[C]`` training counts; ``taus``: the per-expert taus, :func:`expert_taus`) whose module
maps ``(expert_logits [E, B, C], target)`` to a scalar (``target``: int64 labels ``[B]`` or soft
targets ``[B, C]``; a module with ``set_epoch(epoch)`` is told each epoch, 0-based, before its
first step), and name it in ``loss.name``::

    from balpoe.losses.build import register_loss
    register_loss("focal", lambda loss, counts, taus: MyFocalLoss(counts))

Stage 2 (``stage: 2``) always trains with MiSLAS' label-aware smoothing plus per-expert offsets
(:func:`build_stage2_criterion`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from balpoe.errors import BalpoeError
from balpoe.losses.las import ExpertLabelAwareSmoothingLoss
from balpoe.losses.logit_adjusted import BalPoELoss
from balpoe.losses.priors import logit_prior_exponent, make_tau_list, stage2_expert_offsets
from balpoe.recipe import LossConfig, Stage2Config

LossBuilder = Callable[[LossConfig, torch.Tensor, list], nn.Module]

#: ``data.sampler`` values whose stream has a uniform label prior (every class equally often).
BALANCED_SAMPLERS = ("class_balanced", "class_aware")

#: ``loss.name`` -> builder(loss, class_counts, taus)
LOSSES: dict[str, LossBuilder] = {
    "logit_adjusted": lambda loss, counts, taus: BalPoELoss(counts, taus),
}


def register_loss(name: str, builder: LossBuilder) -> LossBuilder:
    """Add (or replace) a stage-1 loss under ``name``; recipes then use ``loss.name: <name>``."""
    LOSSES[name] = builder
    return builder


def get_loss(name: str) -> LossBuilder:
    """The builder registered as ``loss.name`` ``name``; a one-line error naming the known ones."""
    if name not in LOSSES:
        raise BalpoeError(f"recipe key 'loss.name' is unknown: {name!r} (known: {', '.join(LOSSES)})")
    return LOSSES[name]


def expert_taus(loss: LossConfig, num_experts: int) -> list[float]:
    """The per-expert tau list: explicit ``loss.tau`` or ``num_experts`` taus evenly spaced from
    ``loss.tau_min`` to ``loss.tau_max`` (``loss.tau_spacing``)."""
    taus = loss.tau if loss.tau is not None else make_tau_list(num_experts, loss.tau_min, loss.tau_max,
                                                               loss.tau_spacing)
    return [float(t) for t in taus]


def build_stage2_criterion(stage2: Stage2Config, loss: LossConfig, num_experts: int, class_counts) -> nn.Module:
    """MiSLAS stage 2: label-aware smoothing (MiSLAS Eq. 3, 7; target ``stage2.las_target``: Eq. 1
    (``paper``) or the official ``methods.py`` (``official``)) of each expert's logits plus its
    offset from :func:`~balpoe.losses.priors.stage2_expert_offsets` (``stage2.expert_adjust`` of the
    taus of ``loss``), mean over experts.  ``eps_1 = eps_k = 0`` is cross-entropy; E = 1 is exactly
    label-aware smoothing."""
    s = stage2
    offsets = stage2_expert_offsets(expert_taus(loss, num_experts), s.expert_adjust)
    if len(offsets) != num_experts:
        raise BalpoeError(f"recipe key 'loss.tau' gives {len(offsets)} experts but model.num_experts is "
                          f"{num_experts}")
    try:
        return ExpertLabelAwareSmoothingLoss(class_counts, offsets, s.eps_1, s.eps_k, s.las_form, s.las_power,
                                             s.las_target)
    except BalpoeError as e:
        raise BalpoeError(f"recipe section 'stage2' (eps_1, eps_k, las_form, las_power, las_target): {e}") from None


def build_criterion(loss: LossConfig, num_experts: int, class_counts, stage2: Stage2Config | None = None
                    ) -> nn.Module:
    """The training loss of a ``num_experts`` network: ``LOSSES[loss.name]`` in stage 1 or, with
    the ``stage2`` section of a stage-2 recipe, :func:`build_stage2_criterion`."""
    if stage2 is not None:
        return build_stage2_criterion(stage2, loss, num_experts, class_counts)
    return get_loss(loss.name)(loss, torch.as_tensor(class_counts), expert_taus(loss, num_experts))


def model_prior_exponent(taus: list[float], sampler: str, stage2: Stage2Config | None = None) -> float:
    """``lambda_m``: the power of ``pi_train`` the trained ensemble's logits keep
    (:func:`~balpoe.losses.priors.logit_prior_exponent`): the stage-1 ``taus`` (:func:`expert_taus`),
    or, with the ``stage2`` section of a stage-2 recipe, their stage-2 offsets, and whether
    ``data.sampler`` draws with a uniform label prior (``class_balanced``, ``class_aware``)."""
    offsets = stage2_expert_offsets(taus, stage2.expert_adjust) if stage2 is not None else taus
    return logit_prior_exponent(offsets, sampler in BALANCED_SAMPLERS)
