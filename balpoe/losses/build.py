"""Recipe ``loss`` section -> the training criterion.  The loss registry lives here.

To add a stage-1 loss, register a builder ``builder(loss, class_counts, taus) -> nn.Module``
(``loss``: the recipe's ``loss`` section, :class:`~balpoe.recipe.LossConfig`; ``class_counts``:
int64 ``[C]`` training counts; ``taus``: the per-expert taus, :func:`expert_taus`, one per expert)
whose module maps ``(expert_logits [E, B, C], target)`` to a scalar (``target``: int64 labels
``[B]`` or soft targets ``[B, C]``; a module with ``set_epoch(epoch)`` is told each epoch, 0-based,
before its first step), and name it in ``loss.name``::

    from balpoe.losses.build import register_loss
    register_loss("my_focal", lambda loss, counts, taus: MyFocalLoss(counts), keys=("gamma",),
                  prior_exponent=0.0)

Each entry (:class:`LossEntry`) also says which ``loss.*`` keys it reads (the others must stay at
their defaults, :func:`check_loss_keys`), the power of ``pi_train`` its trained logits keep
(``prior_exponent``, :func:`model_prior_exponent`; None: from the taus, as the logit-adjusted loss)
and any rule relating it to other recipe sections (``check``, :func:`check_loss`).

Registered: ``logit_adjusted`` (BalPoE), and the baselines ``ce``, ``focal``, ``class_balanced``,
``ldam`` (LDAM-DRW), ``balanced_softmax``, ``ride`` and ``sade``, each reading its constants from
the ``loss.*`` keys (null: the official default, :data:`DEFAULTS`).  Evaluation reports every
model's own logits, the baselines' raw (no post-hoc prior correction); ``prior_exponent`` only
tells the test-time adaptation modes how to balance them first: 1 for ``ce`` and ``focal``, whose
softmax estimates p(y|x) under the training prior (Menon et al. 2021, Sec. 2), 0 for the losses
that re-balance during training (class-balanced weights, LDAM-DRW, RIDE; Balanced Softmax; SADE,
whose forward, uniform and backward experts keep pi^1, pi^0 and pi^-1, mean 0).

Stage 2 (``stage: 2``) always trains with MiSLAS' label-aware smoothing plus per-expert offsets
(:func:`build_stage2_criterion`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from balpoe.errors import BalpoeError
from balpoe.losses.balanced_softmax import BalancedSoftmaxLoss
from balpoe.losses.focal import ClassBalancedLoss, CrossEntropyLoss, FocalLoss
from balpoe.losses.las import ExpertLabelAwareSmoothingLoss
from balpoe.losses.ldam import LDAMLoss
from balpoe.losses.logit_adjusted import BalPoELoss
from balpoe.losses.priors import logit_prior_exponent, make_tau_list, stage2_expert_offsets
from balpoe.losses.ride import RIDELoss
from balpoe.losses.sade import SADELoss
from balpoe.recipe import LossConfig, Recipe, Stage2Config

LossBuilder = Callable[[LossConfig, torch.Tensor, list], nn.Module]

#: ``data.sampler`` values whose stream has a uniform label prior (every class equally often).
BALANCED_SAMPLERS = ("class_balanced", "class_aware")

#: The logit-adjusted loss's keys (what every loss registered without ``keys`` may set).
TAU_KEYS = ("tau", "tau_min", "tau_max", "tau_spacing")

#: The official default of every ``loss.*`` key a null stands for, per loss (module docstring of
#: each loss: Lin et al. 2017; class-balanced-loss ``src/cifar_main.py``; LDAM-DRW
#: ``cifar_train.py``; RIDE ``model/loss.py``; SADE ``model/loss.py``).
DEFAULTS: dict[str, dict[str, Any]] = {
    "focal": {"gamma": 2.0, "focal_form": "paper"},
    "class_balanced": {"base": "ce", "beta": 0.9999, "reduction": "mean", "drw_epoch": 0, "gamma": 1.0,
                       "focal_form": "paper"},
    "ldam": {"max_m": 0.5, "s": 30.0, "beta": 0.9999, "drw_epoch": 160},
    "ride": {"max_m": 0.5, "s": 30.0, "beta": 0.9999, "drw_epoch": 160, "diversity_factor": -0.2,
             "diversity_temperature": 1.0, "reweight_factor": 0.05},
    "sade": {"sade_tau": 2.0},
}


def loss_value(loss: LossConfig, key: str) -> Any:
    """``loss.<key>``, or where it is null the official default of ``loss.name`` (:data:`DEFAULTS`)."""
    value = getattr(loss, key)
    return DEFAULTS.get(loss.name, {}).get(key) if value is None else value


@dataclass(frozen=True)
class LossEntry:
    """A registered stage-1 loss: its ``builder``, the ``loss.*`` ``keys`` it reads (besides
    ``name``), ``prior_exponent`` (``lambda_m`` of its trained logits; None: from the taus and the
    sampler, :func:`~balpoe.losses.priors.logit_prior_exponent`) and ``check(recipe)``, the rules
    relating it to other sections (None: none)."""
    builder: LossBuilder
    keys: tuple[str, ...] = TAU_KEYS
    prior_exponent: float | None = None
    check: Callable[[Recipe], None] | None = None


def _ldam_model_check(recipe: Recipe) -> None:
    """LDAM / RIDE subtract ``s * m_y`` from cosine logits already scaled by ``s``: the model's
    heads must be cosine heads of scale ``loss.s``."""
    name, m = recipe.loss.name, recipe.model
    if m.head != "cosine":
        raise BalpoeError(f"recipe key 'model.head' must be cosine for loss.name '{name}' (its margins act on "
                          f"scaled cosine logits), got {m.head!r}")
    s = loss_value(recipe.loss, "s")
    if s != m.scale:
        raise BalpoeError(f"recipe key 'loss.s' ({s:g}) must equal model.scale ({m.scale:g}) for loss.name "
                          f"'{name}': the margins are scaled by s and the cosine logits by model.scale")


def _sade_model_check(recipe: Recipe) -> None:
    if recipe.model.num_experts != 3:
        raise BalpoeError(f"recipe key 'model.num_experts' must be 3 for loss.name 'sade' (forward, uniform and "
                          f"backward experts), got {recipe.model.num_experts}")


def _class_balanced_focal(loss: LossConfig) -> bool:
    """Whether the class-balanced loss weights focal (``loss.base: focal``); the focal keys are refused
    with ``base: ce``."""
    focal = loss_value(loss, "base") == "focal"
    for key in ("gamma", "focal_form"):
        if not focal and getattr(loss, key) is not None:
            raise BalpoeError(f"recipe key 'loss.{key}' does not apply to loss.base 'ce' (set loss.base: focal)")
    return focal


def _class_balanced(loss: LossConfig, counts: torch.Tensor, taus: list) -> nn.Module:
    focal = _class_balanced_focal(loss)
    return ClassBalancedLoss(counts, len(taus), beta=loss_value(loss, "beta"),
                             gamma=loss_value(loss, "gamma") if focal else 0.0,
                             drw_epoch=loss_value(loss, "drw_epoch") or None, reduction=loss_value(loss, "reduction"),
                             form=loss_value(loss, "focal_form"))


#: The LDAM-DRW constants (ldam and ride).
_LDAM_KEYS = ("max_m", "s", "beta", "drw_epoch")


def _ldam_kwargs(loss: LossConfig) -> dict:
    return {k: loss_value(loss, k) for k in _LDAM_KEYS}

#: ``loss.name`` -> :class:`LossEntry`
LOSSES: dict[str, LossEntry] = {
    "logit_adjusted": LossEntry(lambda loss, counts, taus: BalPoELoss(counts, taus)),
    "ce": LossEntry(lambda loss, counts, taus: CrossEntropyLoss(counts, len(taus)), (), 1.0),
    "focal": LossEntry(lambda loss, counts, taus: FocalLoss(counts, len(taus), gamma=loss_value(loss, "gamma"),
                                                            form=loss_value(loss, "focal_form")),
                       ("gamma", "focal_form"), 1.0),
    "class_balanced": LossEntry(_class_balanced, ("base", "beta", "reduction", "drw_epoch", "gamma", "focal_form"),
                                0.0, lambda recipe: _class_balanced_focal(recipe.loss) and None),
    "ldam": LossEntry(lambda loss, counts, taus: LDAMLoss(counts, len(taus), **_ldam_kwargs(loss)), _LDAM_KEYS, 0.0,
                      _ldam_model_check),
    "balanced_softmax": LossEntry(lambda loss, counts, taus: BalancedSoftmaxLoss(counts, len(taus)), (), 0.0),
    "ride": LossEntry(lambda loss, counts, taus: RIDELoss(
        counts, len(taus), **_ldam_kwargs(loss),
        **{k: loss_value(loss, k) for k in ("diversity_factor", "diversity_temperature", "reweight_factor")}),
        (*_LDAM_KEYS, "diversity_factor", "diversity_temperature", "reweight_factor"), 0.0, _ldam_model_check),
    "sade": LossEntry(lambda loss, counts, taus: SADELoss(counts, len(taus), tau=loss_value(loss, "sade_tau")),
                      ("sade_tau",), 0.0, _sade_model_check),
}


def register_loss(name: str, builder: LossBuilder, *, keys: tuple[str, ...] = TAU_KEYS,
                  prior_exponent: float | None = None, check: Callable[[Recipe], None] | None = None) -> LossBuilder:
    """Add (or replace) a stage-1 loss under ``name`` (:class:`LossEntry`); recipes then use
    ``loss.name: <name>``."""
    LOSSES[name] = LossEntry(builder, tuple(keys), prior_exponent, check)
    return builder


def get_loss_entry(name: str) -> LossEntry:
    """The :class:`LossEntry` registered as ``loss.name`` ``name``; a one-line error naming the known ones."""
    if name not in LOSSES:
        raise BalpoeError(f"recipe key 'loss.name' is unknown: {name!r} (known: {', '.join(LOSSES)})")
    return LOSSES[name]


def get_loss(name: str) -> LossBuilder:
    """The builder registered as ``loss.name`` ``name``; a one-line error naming the known ones."""
    return get_loss_entry(name).builder


def check_loss_keys(loss: LossConfig) -> None:
    """Every ``loss.*`` key that ``loss.name`` does not read is at its default; else the one-line
    error ``recipe key 'loss.<key>' does not apply to loss.name '<name>'``."""
    entry = get_loss_entry(loss.name)
    for f in dataclasses.fields(LossConfig):
        if f.name != "name" and f.name not in entry.keys and getattr(loss, f.name) != f.default:
            raise BalpoeError(f"recipe key 'loss.{f.name}' does not apply to loss.name '{loss.name}'")
    if loss.beta is not None and not loss.beta < 1:
        raise BalpoeError(f"recipe key 'loss.beta' must be < 1, got {loss.beta:g}")


def check_loss(recipe: Recipe) -> None:
    """A stage-1 recipe's loss: a registered ``loss.name`` whose keys apply (:func:`check_loss_keys`)
    and whose rules on other sections hold (``LossEntry.check``: ldam / ride need cosine heads with
    ``model.scale == loss.s``; sade needs 3 experts).  Stage 2 trains with its own loss."""
    if recipe.stage != 1:
        return
    check_loss_keys(recipe.loss)
    entry = get_loss_entry(recipe.loss.name)
    if entry.check is not None:
        entry.check(recipe)


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
    check_loss_keys(loss)
    return get_loss(loss.name)(loss, torch.as_tensor(class_counts), expert_taus(loss, num_experts))


def model_prior_exponent(taus: list[float], sampler: str, stage2: Stage2Config | None = None,
                         loss: str = "logit_adjusted") -> float:
    """``lambda_m``: the power of ``pi_train`` the trained ensemble's logits keep.  Stage 1 with a
    loss registered with a ``prior_exponent`` (``loss``: ``loss.name``): that power of the training
    stream's prior, i.e. the value, or 0 when ``data.sampler`` draws classes uniformly.  Otherwise (:func:`~balpoe.losses.priors.logit_prior_exponent`): the
    stage-1 ``taus`` (:func:`expert_taus`), or, with the ``stage2`` section of a stage-2 recipe,
    their stage-2 offsets, and whether ``data.sampler`` draws with a uniform label prior
    (``class_balanced``, ``class_aware``)."""
    entry = LOSSES.get(loss)
    if stage2 is None and entry is not None and entry.prior_exponent is not None:
        return 0.0 if sampler in BALANCED_SAMPLERS else float(entry.prior_exponent)
    offsets = stage2_expert_offsets(taus, stage2.expert_adjust) if stage2 is not None else taus
    return logit_prior_exponent(offsets, sampler in BALANCED_SAMPLERS)
