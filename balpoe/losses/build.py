"""Recipe ``loss`` section -> the training criterion.  The loss registry lives here.

To add a stage-1 loss, register a builder ``builder(recipe, class_counts, taus) -> nn.Module``
whose module maps ``(expert_logits [E, B, C], target)`` to a scalar (``target``: int64 labels
``[B]`` or soft targets ``[B, C]``), and name it in ``loss.name``::

    from balpoe.losses.build import register_loss
    register_loss("focal", lambda recipe, counts, taus: MyFocalLoss(counts))

Stage 2 (``stage: 2``) always trains with MiSLAS' label-aware smoothing plus per-expert offsets
(:func:`build_stage2_criterion`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from balpoe.errors import BalpoeError
from balpoe.losses.las import ExpertLabelAwareSmoothingLoss
from balpoe.losses.logit_adjusted import BalPoELoss
from balpoe.losses.priors import logit_prior_exponent, make_tau_list, stage2_expert_offsets

LossBuilder = Callable[[Any, torch.Tensor, list], nn.Module]

#: ``data.sampler`` values whose stream has a uniform label prior (every class equally often).
BALANCED_SAMPLERS = ("class_balanced", "class_aware")

#: ``loss.name`` -> builder(recipe, class_counts, taus)
LOSSES: dict[str, LossBuilder] = {
    "logit_adjusted": lambda recipe, counts, taus: BalPoELoss(counts, taus),
}


def register_loss(name: str, builder: LossBuilder) -> LossBuilder:
    """Add (or replace) a stage-1 loss under ``name``; recipes then use ``loss.name: <name>``."""
    LOSSES[name] = builder
    return builder


def expert_taus(recipe) -> list[float]:
    """The per-expert tau list: explicit ``loss.tau`` or evenly spaced from tau_min..tau_max."""
    lc = recipe.loss
    taus = lc.tau if lc.tau is not None else make_tau_list(recipe.model.num_experts, lc.tau_min, lc.tau_max,
                                                           lc.tau_spacing)
    return [float(t) for t in taus]


def build_stage2_criterion(recipe, class_counts) -> nn.Module:
    """MiSLAS stage 2: label-aware smoothing (MiSLAS Eq. 3, 7; target ``stage2.las_target``: Eq. 1
    (``paper``) or the official ``methods.py`` (``official``)) of each expert's logits plus its
    offset from :func:`~balpoe.losses.priors.stage2_expert_offsets` (``stage2.expert_adjust``), mean
    over experts.  ``eps_1 = eps_k = 0`` is cross-entropy; E = 1 is exactly label-aware smoothing."""
    s = recipe.stage2
    offsets = stage2_expert_offsets(expert_taus(recipe), s.expert_adjust)
    if len(offsets) != recipe.model.num_experts:
        raise BalpoeError(f"recipe key 'loss.tau' gives {len(offsets)} experts but model.num_experts is "
                          f"{recipe.model.num_experts}")
    try:
        return ExpertLabelAwareSmoothingLoss(class_counts, offsets, s.eps_1, s.eps_k, s.las_form, s.las_power,
                                             s.las_target)
    except BalpoeError as e:
        raise BalpoeError(f"recipe section 'stage2' (eps_1, eps_k, las_form, las_power, las_target): {e}") from None


def build_criterion(recipe, class_counts) -> nn.Module:
    """The loss of the recipe's stage: ``LOSSES[loss.name]`` in stage 1, :func:`build_stage2_criterion`
    in stage 2."""
    if recipe.stage == 2:
        return build_stage2_criterion(recipe, class_counts)
    name = recipe.loss.name
    if name not in LOSSES:
        raise BalpoeError(f"recipe key 'loss.name' is unknown: {name!r} (known: {', '.join(LOSSES)})")
    return LOSSES[name](recipe, torch.as_tensor(class_counts), expert_taus(recipe))


def model_prior_exponent(recipe) -> float:
    """``lambda_m``: the power of ``pi_train`` the trained ensemble's logits keep
    (:func:`~balpoe.losses.priors.logit_prior_exponent`): the stage-1 taus, or the stage-2 offsets,
    and whether the recipe samples with a uniform label prior (``class_balanced``, ``class_aware``)."""
    taus = expert_taus(recipe)
    offsets = stage2_expert_offsets(taus, recipe.stage2.expert_adjust) if recipe.stage == 2 else taus
    return logit_prior_exponent(offsets, recipe.data.sampler in BALANCED_SAMPLERS)
