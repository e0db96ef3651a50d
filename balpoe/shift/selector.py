"""The test-time tau selector for a BalPoE ensemble, and the registry of adaptation modes.

The ensemble's mean logits f̄ are balanced (mean tau = 1).  With ``v = log pi_train``, the logits
``z(tau') = f̄ + (1 - tau') v`` target the prior ``pi^lambda / Z`` with ``lambda = 1 - tau'``
(BalPoE, Sanchez Aimar et al. CVPR 2023, Sec. 3).  :class:`TauSelector` adapts f̄ to a test label
distribution:

* ``known``: target prior q given: ``f̄ + log q`` (Bayes rule); reports the best scalar tau'.
* ``unlabelled``: only unlabelled target logits: calibrate on labelled source data (TS, Guo et al.
  2017; BCTS, Alexandari et al. 2020), estimate q by a 1-D maximum likelihood over lambda and by
  smoothed EM (Saerens et al. 2002) shrunk toward it.
* ``labelled``: a small labelled target set: fit (beta = 1/T, lambda) jointly by NLL.
* ``sade`` (registered here, not a selector method): SADE's expert weights learnt on each target
  set's unlabelled images (:mod:`balpoe.shift.aggregation`, Zhang et al. 2022), applied to the
  cached per-expert logits; the only mode that runs the model again (``needs_images``).

Everything works on logits ``[N, C]``, so any number of experts (E = 1 included) is fine.

Adaptation modes are entries of :data:`ADAPT_MODES`; to add one, register a function
``run(selector, logits, labels, *, prior, labels_per_class, seed, expert_logits) -> (SelectorResult, rest)``
(``rest``: positions of the images the metrics are computed on, or None for all)::

    @register_adapt_mode("my_mode", "one line for the CLI help")
    def my_mode(selector, logits, labels, **_): ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from balpoe.errors import BalpoeError, check_choice
from balpoe.evaluate.calibration import apply_calibration, fit_bcts, fit_temperature
from balpoe.evaluate.metrics import check_logits_labels
from balpoe.losses.priors import empirical_prior, log_prior
from balpoe.shift.distributions import PRIOR_FLOOR, floored_log, normalize_prior, uniform_prior
from balpoe.shift.estimators import (best_lambda, eb_shrink_residual, em_prior, fit_beta_lambda, log_mean_variance,
                                     mle_lambda, prior_family, shrink_class_offsets, trend_slope)

#: post-hoc calibrators of the unlabelled mode
CALIBRATIONS = ("bcts", "ts", "none")


@dataclass(frozen=True)
class PriorEstimator:
    """How the unlabelled mode estimates the target prior of N images of K classes: smoothed EM
    (Saerens et al. 2002) shrunk toward the 1-D MLE over lambda when the set has at least ``em_from``
    images per class (N/K), else the 1-D MLE alone (``em_from``: infinite = never EM, 0 = always)."""
    em_from: float
    description: str

    def uses_em(self, images_per_class: float) -> bool:
        return images_per_class >= self.em_from


#: images per class (N/K) from which the ``auto`` estimator runs EM
AUTO_EM_FROM = 20.0
#: the unlabelled prior estimators, by name (``TauSelector(estimator=...)``)
ESTIMATORS = {
    "1d": PriorEstimator(float("inf"), "1-D MLE of the prior exponent"),
    "em": PriorEstimator(0.0, "EM shrunk toward the 1-D MLE"),
    "auto": PriorEstimator(AUTO_EM_FROM,
                           f"EM shrunk toward the 1-D MLE when N/K >= {AUTO_EM_FROM:g}, else the 1-D MLE"),
}


def get_estimator(name: str) -> PriorEstimator:
    """The :data:`ESTIMATORS` entry ``name``; another name is a one-line :class:`BalpoeError`."""
    return ESTIMATORS[check_choice("estimator", name, ESTIMATORS)]


#: EM's Dirichlet-MAP pseudo-count per class, a in (Sum r + a) / (N + K a)
EM_PSEUDO_COUNT = 1.0
#: search interval of the 1-D MLE of lambda
LAMBDA_RANGE = (-2.0, 2.0)


@dataclass
class SelectorResult:
    """Adjusted logits and what the selector chose.

    ``tau`` is the scalar tau' = 1 - lambda of the reported prior family member ``pi^lambda / Z``;
    ``prior`` (float64 [C]) is the target prior used (known), estimated (unlabelled) or fitted
    (labelled, ``pi^lambda / Z``); both None for a mode that chooses neither (sade);
    ``temperature`` divides the logits (1 when not rescaled)."""

    logits: torch.Tensor
    mode: str
    tau: float | None
    prior: torch.Tensor | None
    temperature: float = 1.0
    info: dict[str, Any] = field(default_factory=dict)


class TauSelector:
    """Adapt balanced ensemble logits to a test label distribution.

    Args:
        class_counts: training images per class ``[C]`` (pi_train = counts / sum).
        calibration: ``"bcts"`` (T and per-class biases), ``"ts"`` or ``"none"``; fitted on
            labelled source data by :meth:`fit_source` (needed by the unlabelled mode).
        estimator: how the unlabelled mode estimates the prior, a name of :data:`ESTIMATORS`
            (:class:`PriorEstimator`): ``"1d"``, ``"em"`` or ``"auto"``.
    """

    def __init__(self, class_counts: Sequence[int] | torch.Tensor, calibration: str = "ts",
                 estimator: str = "auto"):
        check_choice("calibration", calibration, CALIBRATIONS)
        self.v = log_prior(class_counts, torch.float64)
        self.num_classes = self.v.numel()
        self.calibration = calibration
        self.estimator = get_estimator(estimator)
        self.source_info: dict[str, Any] = {}
        # Filled by fit_source.
        self.temperature = 1.0
        self.bias: torch.Tensor | None = None
        self.p0: torch.Tensor | None = None

    def _check(self, logits: torch.Tensor, what: str = "logits") -> None:
        check_logits_labels(logits, num_classes=self.num_classes, what=what, nonempty=True, finite=True)

    def best_tau(self, prior: Any) -> float:
        """tau' = 1 - argmin_lambda KL(q || pi^lambda / Z) of a target prior q."""
        return 1.0 - best_lambda(normalize_prior(prior, self.num_classes), self.v)

    # --- calibration on labelled source data -----------------------------------------------

    def fit_source(self, logits: torch.Tensor, labels: torch.Tensor, source_prior: Any = None) -> "TauSelector":
        """Fit the calibrator on held-out labelled *source* data and the reference prior p0.

        ``logits`` are balanced ensemble logits f̄ of the source images.  ``source_prior`` is the
        label distribution of that source set: ``None`` for a balanced set (e.g. a val split),
        ``"train"`` for a holdout of the long-tailed training set, or class weights ``[C]``.
        The calibrated model is scored as ``softmax(f̄/T + b + log p_s)``, and
        p0 ∝ mean_n softmax(f̄/T + b + log p_s) / p_s (the mean calibrated posterior of the
        balanced head, as the EM of Alexandari et al. 2020 uses; ≈ uniform for a calibrated
        model).  The per-class parts of log p0 and of the BCTS biases, which carry the sampling
        noise of a small source set (~10% per class at 20 images/class), are shrunk by
        :func:`~balpoe.shift.estimators.shrink_class_offsets`; the head/tail trend is kept."""
        self._check(logits, "source logits")
        check_logits_labels(logits, labels, what="source logits")
        labels = labels.long()
        if source_prior is None:
            log_ps = None
        elif isinstance(source_prior, str):
            if source_prior != "train":
                raise BalpoeError(f"source_prior must be None, 'train' or class weights, got {source_prior!r}")
            log_ps = self.v
        else:
            log_ps = floored_log(normalize_prior(source_prior, self.num_classes, "source_prior"))
        offset = None if log_ps is None else log_ps.to(logits.device)
        info: dict[str, Any] = {"n_source": int(labels.numel()), "calibration": self.calibration}
        if self.calibration == "bcts":
            self.temperature, bias = fit_bcts(logits, labels, offset=offset)
            probs = torch.softmax(apply_calibration(logits.double(), self.temperature, bias)
                                  + (0.0 if offset is None else offset.double()), 1)
            bias, info["bias_signal_var"] = shrink_class_offsets(bias.cpu(), log_mean_variance(probs), self.v)
            self.bias = (bias - bias.mean()).cpu()
        elif self.calibration == "ts":
            self.temperature, self.bias = fit_temperature(logits, labels, offset=offset), None
        else:
            self.temperature, self.bias = 1.0, None
        cal = self._calibrate(logits)
        if offset is not None:
            cal = cal + offset.to(cal)
        probs = torch.softmax(cal, 1)
        log_p0 = torch.log(probs.mean(0).clamp_min(1e-300)).cpu()
        if log_ps is not None:
            log_p0 = log_p0 - log_ps
        info["p0_raw"] = torch.softmax(log_p0, 0)
        log_p0, info["p0_signal_var"] = shrink_class_offsets(log_p0, log_mean_variance(probs), self.v)
        p0 = torch.softmax(log_p0, 0).clamp_min(PRIOR_FLOOR)
        self.p0 = p0 / p0.sum()
        info["temperature"] = self.temperature
        self.source_info = info
        return self

    def _calibrate(self, logits: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(logits.device)
        return apply_calibration(logits.double(), self.temperature, bias)

    # --- modes -----------------------------------------------------------------------------

    def known(self, logits: torch.Tensor, prior: Any) -> SelectorResult:
        """Known target prior q: ``logits + log max(q, 1e-8)`` with q normalised to sum 1 (Bayes
        rule); reports tau' = 1 - argmin_lambda KL(q || pi^lambda / Z)."""
        self._check(logits)
        q = normalize_prior(prior, self.num_classes)
        lam = best_lambda(q, self.v)
        kl = float((q * (torch.log(q.clamp_min(1e-300)) - torch.log(prior_family(self.v, lam)))).sum())
        out = logits + floored_log(q).to(logits)
        return SelectorResult(out, "known", 1.0 - lam, q, 1.0, {"lambda": lam, "kl_to_family": kl})

    def unlabelled(self, logits: torch.Tensor) -> SelectorResult:
        """Unlabelled target logits: calibrate, fit the 1-D MLE lambda, then if the estimator runs EM
        at N/K images per class (:meth:`PriorEstimator.uses_em`) smoothed EM (Saerens et al. 2002)
        shrunk toward the 1-D fit by empirical Bayes; returns ``f̄/T + b + log q_hat - log p0``.

        ``tau`` = 1 - lambda_hat of the 1-D fit (the target prior's exponent);
        ``info["tau_effective"]`` = 1 - the slope on v of the bias actually added to f̄/T
        (b + log q_hat - log p0); they differ by the model's own head/tail trend in p0."""
        self._check(logits)
        if self.p0 is None:
            if self.calibration != "none":
                raise BalpoeError("the unlabelled mode needs labelled source data: call fit_source first "
                                  "(or use calibration='none')")
            p0 = uniform_prior(self.num_classes)
        else:
            p0 = self.p0
        cal = self._calibrate(logits)
        log_p0 = torch.log(p0).to(cal)
        log_ratio = torch.log_softmax(cal, 1) - log_p0
        v = self.v.to(cal)
        lam = mle_lambda(log_ratio, v, *LAMBDA_RANGE)
        q1d = prior_family(v, lam)
        n, k = logits.shape
        per_class = n / k
        info: dict[str, Any] = {"lambda_1d": lam, "samples_per_class": per_class, "p0": p0,
                                "prior_1d": q1d.cpu(), "calibration": self.calibration}
        if not self.estimator.uses_em(per_class):
            q, info["estimator"] = q1d, "1d"
        else:
            pseudo = torch.full_like(q1d, EM_PSEUDO_COUNT)
            q, info["em_iterations"] = em_prior(log_ratio, p0.to(cal), pseudo)
            info["estimator"] = "em"
            # Noise of log q_y given the target labels: 1 / Sum_n r_ny^2 (diagonal observed
            # information) minus the multinomial part 1 / Sum_n r_ny (the deviation of the test
            # set's own label counts is signal); 0 for a perfect classifier.  Keep the part of
            # log q_em - log q_1d that exceeds that noise (eb_shrink_residual).
            log_q = torch.log(q.clamp_min(1e-300))
            r = torch.softmax(log_ratio + log_q, 1)
            var = (1.0 / (r * r).sum(0).clamp_min(1e-12) - 1.0 / r.sum(0).clamp_min(1e-12)).clamp_min(0.0)
            d = log_q - torch.log(q1d)
            d = d - d.mean()
            d, info["em_signal_var"] = eb_shrink_residual(d, var, k - 1)
            q = torch.softmax(torch.log(q1d) + d, 0)
            info["lambda_em"] = best_lambda(q.cpu(), self.v)
        bias = floored_log(q) - log_p0
        applied = bias.cpu() + (self.bias if self.bias is not None else 0.0)
        info["tau_effective"] = 1.0 - trend_slope(applied, self.v)
        out = (cal + bias).to(logits.dtype)
        return SelectorResult(out, "unlabelled", 1.0 - lam, q.cpu(), self.temperature, info)

    def labelled(self, logits: torch.Tensor, target_logits: torch.Tensor, target_labels: torch.Tensor,
                 l2: float = 0.1) -> SelectorResult:
        """A small labelled target set: fit (beta = 1/T, lambda) jointly by the NLL of
        ``beta f̄ + lambda v`` on (``target_logits``, ``target_labels``) (jointly convex: the
        logits are affine in both), apply to ``logits``; reports T = 1/beta and tau' = 1 - lambda."""
        self._check(logits)
        self._check(target_logits, "labelled target logits")
        check_logits_labels(target_logits, target_labels, what="labelled target logits")
        beta, lam, iters = fit_beta_lambda(target_logits, target_labels.long(), self.v, l2=l2)
        out = beta * logits + (lam * self.v).to(logits)
        return SelectorResult(out, "labelled", 1.0 - lam, prior_family(self.v, lam), 1.0 / beta,
                              {"beta": beta, "lambda": lam, "newton_iterations": iters,
                               "n_labelled": int(target_labels.numel())})


# ------------------------------------------------------------------------------------------------
# Adaptation modes: one registry, used by the label-shift evaluation, the CLI and the benchmark


@dataclass(frozen=True)
class AdaptMode:
    """An adaptation mode: ``run(selector, logits, labels, *, prior, labels_per_class, seed,
    expert_logits)`` returns ``(SelectorResult, rest)``; ``needs_source``: it needs a calibrated
    selector (:meth:`TauSelector.fit_source`); ``adapts``: it adapts balanced logits (False: it scores
    the model's own ensemble logits as they are, so the label-shift evaluation passes those, not
    balanced, and reports no before / after columns); ``needs_images``: it runs the model again on
    each target set's images (the label-shift evaluation passes ``aggregation``, learnt on them),
    where every other mode works on the logits computed once; ``min_experts``: the fewest experts
    a model needs for the mode to apply (2 for a mode that weighs experts)."""
    run: Callable[..., tuple[SelectorResult, torch.LongTensor | None]]
    help: str
    needs_source: bool = False
    adapts: bool = True
    needs_images: bool = False
    min_experts: int = 1


ADAPT_MODES: dict[str, AdaptMode] = {}


def register_adapt_mode(name: str, help: str, needs_source: bool = False, adapts: bool = True,  # noqa: A002
                        needs_images: bool = False, min_experts: int = 1):
    """Decorator: add ``run`` to :data:`ADAPT_MODES` under ``name`` (:class:`AdaptMode`)."""
    def deco(run):
        ADAPT_MODES[name] = AdaptMode(run, help, needs_source, adapts, needs_images, min_experts)
        return run
    return deco


def get_adapt_mode(name: str) -> AdaptMode:
    if name not in ADAPT_MODES:
        raise BalpoeError(f"adaptation mode must be one of {', '.join(ADAPT_MODES)}; got {name!r}")
    return ADAPT_MODES[name]


def labelled_split(labels: torch.Tensor, per_class: float, seed: int = 0,
                   num_classes: int | None = None) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Positions (into ``labels``) of a labelled budget of ``per_class`` labels per class *on
    average* -- ``round(per_class * C)`` images drawn uniformly without replacement from the target
    set (``np.random.default_rng(seed)``) -- and of the remaining images (evaluated).  Both sorted.

    The draw is i.i.d. from the target set, so the labelled images follow the target prior (a
    frequent class gets more labels, a rare one may get none).  A per-class stratified draw would
    be class-balanced whatever the target prior is and would carry no information about it."""
    if per_class <= 0:
        raise BalpoeError(f"labels per class must be > 0, got {per_class}")
    n = int(labels.numel())
    num_classes = num_classes or (int(labels.max()) + 1 if n else 1)
    k = max(1, int(round(per_class * num_classes)))
    if k >= n:
        raise BalpoeError(f"{per_class:g} labels per class: {k} labelled images leave none of the {n} images of "
                          "the target set to evaluate on")
    rng = np.random.default_rng(seed)
    fit = np.sort(rng.choice(n, size=k, replace=False))
    rest = np.setdiff1d(np.arange(n), fit)
    return torch.from_numpy(fit.astype(np.int64)), torch.from_numpy(rest.astype(np.int64))


@register_adapt_mode("none", "no adaptation: the model's own (balanced) ensemble logits", adapts=False)
def _adapt_none(selector: TauSelector, logits, labels, **_):
    # the logits are scored as they are (non-finite values included), only their shape is checked
    check_logits_labels(logits, num_classes=selector.num_classes)
    return SelectorResult(logits, "none", 1.0, uniform_prior(selector.num_classes), 1.0, {}), None


@register_adapt_mode("known", "known prior: the target set's class frequencies, f̄ + log q (an oracle)")
def _adapt_known(selector: TauSelector, logits, labels, *, prior=None, **_):
    q = prior if prior is not None else empirical_prior(labels, logits.shape[1])
    return selector.known(logits, q), None


@register_adapt_mode("unlabelled", "unlabelled, transductive on each whole target set after calibration on "
                     "labelled source data (1-D MLE of the prior exponent, or EM shrunk toward it)", needs_source=True)
def _adapt_unlabelled(selector: TauSelector, logits, labels, **_):
    return selector.unlabelled(logits), None


@register_adapt_mode("labelled", "labelled: K*C images drawn at random from each target set (K labels per class on "
                     "average) fit (1/T, tau'); metrics on the rest")
def _adapt_labelled(selector: TauSelector, logits, labels, *, labels_per_class: float = 5, seed: int = 0, **_):
    fit, rest = labelled_split(labels, labels_per_class, seed, logits.shape[1])
    return selector.labelled(logits[rest], logits[fit], labels[fit]), rest


@register_adapt_mode("sade", "SADE test-time aggregation: expert weights learnt on each target set's unlabelled images "
                     "by agreement of two augmented views (Zhang et al. 2022); the model runs again per set",
                     needs_images=True, min_experts=2)
def _adapt_sade(selector: TauSelector, logits, labels, *, expert_logits=None, aggregation=None, **_):
    if expert_logits is None or aggregation is None:
        raise BalpoeError("adaptation mode 'sade' needs the target set's expert logits and the aggregation weights "
                          "learnt on its images (balpoe.shift.aggregation.learn_aggregation_weights)")
    return SelectorResult(aggregation.apply(expert_logits), "sade", None, None, 1.0,
                          {"aggregation": aggregation.as_dict()}), None
