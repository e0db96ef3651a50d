"""Test-time tau selector for a BalPoE ensemble (test-shift notes §0 and §5).

The ensemble's mean logits f̄ are balanced (mean tau = 1).  With ``v = log pi_train``, the logits
``z(tau') = f̄ + (1 - tau') v`` target the prior ``pi^lambda / Z`` with ``lambda = 1 - tau'`` (§0).
:class:`TauSelector` adapts f̄ to a test label distribution in three modes:

* ``known``: target prior q given: ``f̄ + log q`` (Bayes rule, §5a); reports the best scalar tau'.
* ``unlabelled``: only unlabelled target logits: calibrate on labelled source data, estimate q by
  a 1-D maximum likelihood over lambda and by smoothed EM (Saerens et al. 2002), §3 and §5b.
* ``labelled``: a small labelled target set: fit (beta = 1/T, lambda) jointly by NLL, §5c.

Everything works on logits ``[N, C]`` only, so any number of experts (E = 1 included) is fine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from balpoe.calibration import apply_calibration, fit_bcts, fit_temperature
from balpoe.errors import BalpoeError
from balpoe.test_dists import check_prior

PRIOR_FLOOR = 1e-8
MODES = ("none", "known", "unlabelled", "labelled")
CALIBRATIONS = ("bcts", "ts", "none")
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


@dataclass
class SelectorResult:
    """Adjusted logits and what the selector chose.

    ``tau`` is the scalar tau' = 1 - lambda of the reported prior family member ``pi^lambda / Z``;
    ``prior`` (float64 [C]) is the target prior used (known), estimated (unlabelled) or fitted
    (labelled, ``pi^lambda / Z``); ``temperature`` divides the logits (1 when not rescaled)."""

    logits: torch.Tensor
    mode: str
    tau: float
    prior: torch.Tensor
    temperature: float = 1.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def lam(self) -> float:
        """lambda = 1 - tau' (the exponent of the training prior)."""
        return 1.0 - self.tau


# ----------------------------------------------------------------------------- helpers


def _check_logits(logits: torch.Tensor, num_classes: int, what: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        raise BalpoeError(f"{what} must be a tensor of shape [N, C]")
    if logits.shape[1] != num_classes:
        raise BalpoeError(f"{what} have {logits.shape[1]} classes, class_counts has {num_classes}")
    if logits.shape[0] == 0:
        raise BalpoeError(f"{what} are empty (N = 0)")
    if not torch.isfinite(logits).all():
        raise BalpoeError(f"{what} contain NaN or inf")


def _check_labels(labels: torch.Tensor, n: int, num_classes: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.shape[0] != n:
        raise BalpoeError(f"labels must be a 1-D tensor of length {n}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise BalpoeError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise BalpoeError(f"labels must lie in [0, {num_classes})")
    return labels.long()


def normalize_prior(prior: Any, num_classes: int, what: str = "prior") -> torch.Tensor:
    """Class weights -> float64 probability vector [C] (validated by :func:`check_prior`)."""
    return torch.from_numpy(check_prior(prior, num_classes, what))


def log_train_prior(class_counts: Any) -> torch.Tensor:
    """v = log pi_train (float64 [C]); classes with no training image get log(1e-8)."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64).detach().cpu()
    if counts.ndim != 1 or counts.numel() == 0:
        raise BalpoeError("class_counts must be a non-empty 1-D vector")
    if not torch.isfinite(counts).all() or (counts < 0).any() or counts.sum() <= 0:
        raise BalpoeError("class_counts must be finite, non-negative and not all zero")
    return torch.log((counts / counts.sum()).clamp_min(PRIOR_FLOOR))


def prior_family(v: torch.Tensor, lam: float) -> torch.Tensor:
    """The scalar family ``pi^lambda / Z(lambda)`` = softmax(lambda v) (notes §0)."""
    return torch.softmax(lam * v, 0)


def best_lambda(prior: torch.Tensor, v: torch.Tensor, bound: float = 50.0) -> float:
    """argmin_lambda KL(q || pi^lambda / Z) (notes §5a).  d/dlambda = E_{pi^l/Z}[v] - E_q[v] is
    increasing (the KL is convex), so bisection on [-bound, bound] finds the global minimum."""
    target = float((prior * v).sum())
    if float(v.max() - v.min()) < 1e-12:
        return 0.0
    lo, hi = -bound, bound
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float((prior_family(v, mid) * v).sum()) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def shrink_class_offsets(x: torch.Tensor, var: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Empirical-Bayes (method-of-moments, James-Stein type) shrinkage of noisy per-class log-scale
    estimates, e.g. log p0 or BCTS biases, with sampling variances ``var`` [C].

    x = mean + slope * u + d with u = centred, unit-norm v (the head/tail trend).  The per-class
    residual d is shrunk by :func:`eb_shrink_residual` (each class keeps s^2 / (s^2 + var_y));
    the slope keeps max(0, slope^2 - se^2) / slope^2 with se^2 = Sum_y u_y^2 var_y.  A calibrated model (pure noise) collapses to a constant (uniform
    p0); real deviations survive.  Returns (shrunk x, s^2)."""
    x, var = x.double(), var.double()
    k = x.numel()
    fit = torch.full_like(x, float(x.mean()))
    dof = k - 1
    vc = v.double() - v.double().mean()
    if float(vc.norm()) > 1e-9 and k > 2:
        u = vc / vc.norm()
        slope = float(x @ u)
        se2 = float((u * u) @ var)
        keep_slope = max(0.0, slope * slope - se2) / (slope * slope) if slope != 0 else 0.0
        fit = fit + slope * u
        dof = k - 2
    else:
        keep_slope, u = 0.0, torch.zeros_like(x)
    shrunk_d, signal = eb_shrink_residual(x - fit, var, dof)
    out = fit - (1.0 - keep_slope) * float(x @ u) * u + shrunk_d
    return out, signal


def eb_shrink_residual(d: torch.Tensor, var: torch.Tensor, dof: int | None = None) -> tuple[torch.Tensor, float]:
    """Empirical Bayes for a residual d_y = signal_y + noise_y with known noise variances ``var_y``
    and signal_y ~ N(0, s^2): s^2 maximises Sum_y log N(d_y; 0, s^2 + var_y) (score equation
    Sum_y (d_y^2 - s^2 - var_y) / (s^2 + var_y)^2 = 0, solved by bisection; precision-weighted, so
    a few very noisy classes do not hide the signal of the others), then
    d_y <- d_y s^2 / (s^2 + var_y) (posterior mean).  ``dof`` rescales for fitted parameters
    (degrees of freedom / C).  Returns (shrunk d, s^2)."""
    d, var = d.double(), var.double().to(d.device)
    scale = d.numel() / max(dof if dof is not None else d.numel(), 1)
    d2 = d * d

    def score(s2: float) -> float:
        tot = s2 + var
        return float(((d2 - tot / scale) / (tot * tot)).sum())

    if score(0.0) <= 0:
        return torch.zeros_like(d), 0.0
    lo, hi = 0.0, float(d2.max()) + 1e-12
    while score(hi) > 0:
        hi *= 2.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if score(mid) > 0:
            lo = mid
        else:
            hi = mid
    signal = 0.5 * (lo + hi)
    return d * (signal / (signal + var)), signal


def _log_mean_variance(probs: torch.Tensor) -> torch.Tensor:
    """Sampling variance of log(mean_n probs[n, y]) by the delta method: Var_n(p_ny) / (N mean_y^2)."""
    mean = probs.mean(0)
    return (probs.var(0, unbiased=True) / (probs.shape[0] * mean.clamp_min(1e-300) ** 2)).cpu()


def trend_slope(x: torch.Tensor, v: torch.Tensor) -> float:
    """Least-squares slope of a per-class vector on v (x ≈ c + slope * v); 0 if v is constant."""
    vc = v.double() - v.double().mean()
    den = float(vc @ vc)
    return float((x.double() - x.double().mean()) @ vc) / den if den > 1e-12 else 0.0


def golden_section_max(fn: Callable[[float], float], lo: float, hi: float, tol: float = 1e-6) -> float:
    """Maximiser of a unimodal ``fn`` on [lo, hi] by golden-section search."""
    a, b = lo, hi
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = fn(c), fn(d)
    while b - a > tol:
        if fc >= fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = fn(c)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = fn(d)
    return 0.5 * (a + b)


class LambdaLikelihood:
    """L(lambda) = Sum_n log Sum_y p~(y|x_n) pi(y)^lambda / (Z(lambda) p0(y)) (notes §5b.2), given
    ``log_ratio = log p~(y|x) - log p0(y)`` [N, C].

    Each row is shifted by its max once (E = exp(log_ratio - rowmax) in (0, 1]), so one evaluation
    is a mat-vec: L = Sum_n [m_n + c + log(E_n . exp(lambda v - c))] - N logsumexp(lambda v) with
    c = max(lambda v).  Exact, and stable: each row of E holds a 1 and lambda v - c >= -|lambda| range(v)."""

    def __init__(self, log_ratio: torch.Tensor, v: torch.Tensor):
        self.row_max = log_ratio.max(1).values
        self.shifted = torch.exp(log_ratio - self.row_max[:, None])
        self.sum_row_max = float(self.row_max.sum())
        self.n = log_ratio.shape[0]
        self.v = v.to(log_ratio)

    def __call__(self, lam: float) -> float:
        lv = lam * self.v
        c = lv.max()
        inner = torch.log(self.shifted @ torch.exp(lv - c)).sum()
        return float(self.sum_row_max + self.n * c + inner - self.n * torch.logsumexp(lv, 0))


def mle_lambda(log_ratio: torch.Tensor, v: torch.Tensor, lo: float = -2.0, hi: float = 2.0,
               grid: int = 17, tol: float = 1e-5) -> float:
    """1-D MLE of lambda on [lo, hi] (notes §5b.2): a coarse grid to bracket the best point (the
    likelihood need not be concave in lambda), then golden-section search inside the bracket."""
    fn = LambdaLikelihood(log_ratio, v)
    lams = np.linspace(lo, hi, grid)
    lls = [fn(float(lam)) for lam in lams]
    i = int(np.argmax(lls))
    a, b = lams[max(i - 1, 0)], lams[min(i + 1, grid - 1)]
    return golden_section_max(fn, float(a), float(b), tol)


def em_prior(log_ratio: torch.Tensor, init: torch.Tensor, pseudo_counts: torch.Tensor,
             tol: float = 1e-6, max_iter: int = 100) -> tuple[torch.Tensor, int]:
    """Saerens et al. (2002) EM for the target prior with Dirichlet-MAP pseudo-counts (notes §3, §5b.3).

    E-step ``r_ny = softmax_y(log p~(y|x_n) - log p0(y) + log q(y))``, M-step
    ``q <- (Sum_n r_ny + a_y) / (N + Sum_y a_y)``; stops when every |dq_y| <= ``tol`` or after
    ``max_iter`` iterations.  Log-space stabilised once: with E = exp(log_ratio - rowmax) (each row
    holds a 1), Sum_n r_ny = q_y (E^T (1 / (E q)))_y, two mat-vecs per iteration, exact.
    ``init`` is p0 for the classic start.  Returns (q, iterations)."""
    n = log_ratio.shape[0]
    shifted = torch.exp(log_ratio - log_ratio.max(1, keepdim=True).values)
    q = init.to(log_ratio)
    a = pseudo_counts.to(log_ratio)
    denom = n + float(a.sum())
    it = 0
    for it in range(1, max_iter + 1):
        r_sum = q * (shifted.T @ (1.0 / (shifted @ q).clamp_min(1e-300)))
        q_new = (r_sum + a) / denom
        done = float((q_new - q).abs().max()) <= tol
        q = q_new
        if done:
            break
    return q / q.sum(), it


def fit_beta_lambda(logits: torch.Tensor, labels: torch.Tensor, v: torch.Tensor, l2: float = 0.1,
                    max_iter: int = 100) -> tuple[float, float, int]:
    """(beta, lambda) minimising Sum_i [-(beta z_iy + lambda v_y) + logsumexp(beta z_i + lambda v)]
    + l2/2 |(beta - 1, lambda)|^2 (notes §5c).  Logits are affine in (beta, lambda), so the objective
    is jointly convex; damped Newton (backtracking) reaches the global optimum.  ``l2`` keeps the
    optimum finite when a tiny labelled set is separable.  Returns (beta, lambda, iterations)."""
    z = logits.double()
    v = v.to(z)
    y = labels.to(z.device)
    zy, vy = z.gather(1, y[:, None]).squeeze(1), v[y]
    theta = torch.tensor([1.0, 0.0], dtype=torch.float64)
    prior_mean = theta.clone()

    def objective(th: torch.Tensor) -> float:
        s = th[0] * z + th[1] * v
        nll = torch.logsumexp(s, 1).sum() - (th[0] * zy + th[1] * vy).sum()
        return float(nll) + 0.5 * l2 * float(((th - prior_mean) ** 2).sum())

    f = objective(theta)
    it = 0
    for it in range(1, max_iter + 1):
        p = torch.softmax(theta[0] * z + theta[1] * v, 1)
        ez, ev = (p * z).sum(1), p @ v
        ezz, ezv, evv = (p * z * z).sum(1), (p * z) @ v, p @ (v * v)
        grad = torch.stack([(ez - zy).sum(), (ev - vy).sum()]).cpu() + l2 * (theta - prior_mean)
        hess = torch.stack([torch.stack([(ezz - ez * ez).sum(), (ezv - ez * ev).sum()]),
                            torch.stack([(ezv - ez * ev).sum(), (evv - ev * ev).sum()])]).cpu()
        hess = hess + (l2 + 1e-12) * torch.eye(2, dtype=torch.float64)
        step = -torch.linalg.solve(hess, grad)
        decrement = float(-(grad * step).sum())
        if decrement < 1e-12:
            break
        t = 1.0
        while True:
            cand = theta + t * step
            cand[0] = cand[0].clamp_min(1e-3)  # keep beta = 1/T positive
            f_new = objective(cand)
            if f_new <= f - 0.25 * t * decrement or t < 1e-10:
                break
            t *= 0.5
        if abs(f - f_new) < 1e-13 * max(1.0, abs(f)):
            theta, f = cand, min(f, f_new)
            break
        theta, f = cand, f_new
    return float(theta[0]), float(theta[1]), it


# ----------------------------------------------------------------------------- selector


class TauSelector:
    """Adapt balanced ensemble logits to a test label distribution (notes §5).

    Args:
        class_counts: training images per class ``[C]`` (pi_train = counts / sum).
        calibration: ``"bcts"`` (T and per-class biases), ``"ts"`` or ``"none"``; fitted on
            labelled source data by :meth:`fit_source` (needed by the unlabelled mode).
        smoothing: EM's Dirichlet-MAP pseudo-count per class, a in (Sum r + a)/(N + K a) (§5b.3).
        shrinkage: optional extra pseudo-counts per class placed on the 1-D fit (a fixed-strength
            pull of EM toward it; 0 by default, the empirical-Bayes step below adapts instead).
        shrink_em: shrink log q_em - log q_1d by empirical Bayes (:func:`eb_shrink_residual`,
            noise = 1/Sum_n r_ny^2 - 1/Sum_n r_ny): "EM shrunk toward the 1-D fit" (§5b.4) with a
            data-driven strength, so a target without off-family shift gets ~the 1-D fit.
        min_samples_per_class: below this N/K the unlabelled mode uses the 1-D fit alone.
        lambda_range: search interval of the 1-D MLE (notes: [-2, 2]).
        shrink_source: empirical-Bayes shrinkage of the source-fitted p0 and BCTS biases
            (False: the raw mean posterior and BCTS biases of notes §5b.1).
    """

    def __init__(self, class_counts: Sequence[int] | torch.Tensor, calibration: str = "ts",
                 smoothing: float = 1.0, shrinkage: float = 0.0, min_samples_per_class: float = 20.0,
                 lambda_range: tuple[float, float] = (-2.0, 2.0), em_tol: float = 1e-6, em_max_iter: int = 100,
                 shrink_source: bool = True, shrink_em: bool = True):
        if calibration not in CALIBRATIONS:
            raise BalpoeError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}")
        if smoothing < 0 or shrinkage < 0:
            raise BalpoeError("smoothing and shrinkage must be >= 0")
        if not lambda_range[0] < lambda_range[1]:
            raise BalpoeError(f"lambda_range must be (low, high) with low < high, got {lambda_range}")
        self.v = log_train_prior(class_counts)
        self.num_classes = self.v.numel()
        self.calibration = calibration
        self.smoothing = float(smoothing)
        self.shrinkage = float(shrinkage)
        self.min_samples_per_class = float(min_samples_per_class)
        self.lambda_range = (float(lambda_range[0]), float(lambda_range[1]))
        self.em_tol, self.em_max_iter = float(em_tol), int(em_max_iter)
        self.shrink_source = bool(shrink_source)
        self.shrink_em = bool(shrink_em)
        self.source_info: dict[str, Any] = {}
        # Filled by fit_source.
        self.temperature = 1.0
        self.bias: torch.Tensor | None = None
        self.p0: torch.Tensor | None = None

    # --- the scalar family ------------------------------------------------------------------

    def tau_logits(self, logits: torch.Tensor, tau: float) -> torch.Tensor:
        """z(tau') = f̄ + (1 - tau') log pi_train (notes §0)."""
        _check_logits(logits, self.num_classes)
        return logits + ((1.0 - tau) * self.v).to(logits)

    def best_tau(self, prior: Any) -> float:
        """tau' = 1 - argmin_lambda KL(q || pi^lambda / Z) of a target prior q (notes §5a)."""
        return 1.0 - best_lambda(normalize_prior(prior, self.num_classes), self.v)

    # --- calibration on labelled source data -----------------------------------------------

    def fit_source(self, logits: torch.Tensor, labels: torch.Tensor, source_prior: Any = None) -> "TauSelector":
        """Fit the calibrator on held-out labelled *source* data and the reference prior p0 (§5b.1).

        ``logits`` are balanced ensemble logits f̄ of the source images.  ``source_prior`` is the
        label distribution of that source set: ``None`` for a balanced set (e.g. a val split),
        ``"train"`` for a holdout of the long-tailed training set, or class weights ``[C]``.
        The calibrated model is scored as ``softmax(f̄/T + b + log p_s)``, and
        p0 ∝ mean_n softmax(f̄/T + b + log p_s) / p_s (the mean calibrated posterior of the
        balanced head; ≈ uniform for a calibrated model).  With ``shrink_source`` (default) the
        per-class parts of log p0 and of the BCTS biases, which carry the sampling noise of a
        small source set (~10% per class at 20 images/class), are shrunk by
        :func:`shrink_class_offsets`; the head/tail trend is kept."""
        _check_logits(logits, self.num_classes, "source logits")
        labels = _check_labels(labels, logits.shape[0], self.num_classes)
        if source_prior is None:
            log_ps = None
        elif isinstance(source_prior, str):
            if source_prior != "train":
                raise BalpoeError(f"source_prior must be None, 'train' or class weights, got {source_prior!r}")
            log_ps = self.v
        else:
            log_ps = torch.log(normalize_prior(source_prior, self.num_classes, "source_prior").clamp_min(PRIOR_FLOOR))
        offset = None if log_ps is None else log_ps.to(logits.device)
        info: dict[str, Any] = {"n_source": int(labels.numel()), "calibration": self.calibration}
        if self.calibration == "bcts":
            self.temperature, bias = fit_bcts(logits, labels, offset=offset)
            if self.shrink_source:
                probs = torch.softmax(apply_calibration(logits.double(), self.temperature, bias)
                                      + (0.0 if offset is None else offset.double()), 1)
                bias, info["bias_signal_var"] = shrink_class_offsets(bias.cpu(), _log_mean_variance(probs), self.v)
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
        if self.shrink_source:
            log_p0, info["p0_signal_var"] = shrink_class_offsets(log_p0, _log_mean_variance(probs), self.v)
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
        """Known target prior q (notes §5a): ``logits + log max(q, 1e-8)`` with q normalised to
        sum 1; reports tau' = 1 - argmin_lambda KL(q || pi^lambda / Z)."""
        _check_logits(logits, self.num_classes)
        q = normalize_prior(prior, self.num_classes)
        lam = best_lambda(q, self.v)
        kl = float((q * (torch.log(q.clamp_min(1e-300)) - torch.log(prior_family(self.v, lam)))).sum())
        out = logits + torch.log(q.clamp_min(PRIOR_FLOOR)).to(logits)
        return SelectorResult(out, "known", 1.0 - lam, q, 1.0, {"lambda": lam, "kl_to_family": kl})

    def unlabelled(self, logits: torch.Tensor) -> SelectorResult:
        """Unlabelled target logits (notes §5b): calibrate, fit the 1-D MLE lambda (§5b.2), then
        if N/K >= ``min_samples_per_class`` smoothed EM (§5b.3) shrunk toward the 1-D fit by
        empirical Bayes (§5b.4); returns ``f̄/T + b + log q_hat - log p0``.

        ``tau`` = 1 - lambda_hat of the 1-D fit (the target prior's exponent, comparable with the
        notes §0 table); ``info["tau_effective"]`` = 1 - the slope on v of the bias actually added
        to f̄/T (b + log q_hat - log p0); they differ by the model's own head/tail trend in p0."""
        _check_logits(logits, self.num_classes)
        if self.p0 is None:
            if self.calibration != "none":
                raise BalpoeError("the unlabelled mode needs labelled source data: call fit_source first "
                                  "(or use calibration='none')")
            p0 = torch.full((self.num_classes,), 1.0 / self.num_classes, dtype=torch.float64)
        else:
            p0 = self.p0
        cal = self._calibrate(logits)
        log_p0 = torch.log(p0).to(cal)
        log_ratio = torch.log_softmax(cal, 1) - log_p0
        v = self.v.to(cal)
        lam = mle_lambda(log_ratio, v, *self.lambda_range)
        q1d = prior_family(v, lam)
        n, k = logits.shape
        per_class = n / k
        info: dict[str, Any] = {"lambda_1d": lam, "samples_per_class": per_class, "p0": p0,
                                "prior_1d": q1d.cpu(), "calibration": self.calibration}
        if per_class < self.min_samples_per_class:
            q, info["estimator"] = q1d, "1d"
        else:
            pseudo = self.smoothing + self.shrinkage * k * q1d
            q, info["em_iterations"] = em_prior(log_ratio, p0.to(cal), pseudo, self.em_tol, self.em_max_iter)
            info["estimator"] = "em"
            if self.shrink_em:
                # Noise of log q_y given the target labels: 1 / Sum_n r_ny^2 (diagonal observed
                # information) minus the multinomial part 1 / Sum_n r_ny (the deviation of the
                # test set's own label counts is signal); 0 for a perfect classifier.  Keep the
                # part of log q_em - log q_1d that exceeds that noise (eb_shrink_residual).
                log_q = torch.log(q.clamp_min(1e-300))
                r = torch.softmax(log_ratio + log_q, 1)
                var = (1.0 / (r * r).sum(0).clamp_min(1e-12) - 1.0 / r.sum(0).clamp_min(1e-12)).clamp_min(0.0)
                d = log_q - torch.log(q1d)
                d = d - d.mean()
                d, info["em_signal_var"] = eb_shrink_residual(d, var, k - 1)
                q = torch.softmax(torch.log(q1d) + d, 0)
            info["lambda_em"] = best_lambda(q.cpu(), self.v)
        bias = torch.log(q.clamp_min(PRIOR_FLOOR)) - log_p0
        applied = bias.cpu() + (self.bias if self.bias is not None else 0.0)
        info["tau_effective"] = 1.0 - trend_slope(applied, self.v)
        out = (cal + bias).to(logits.dtype)
        return SelectorResult(out, "unlabelled", 1.0 - lam, q.cpu(), self.temperature, info)

    def labelled(self, logits: torch.Tensor, target_logits: torch.Tensor, target_labels: torch.Tensor,
                 l2: float = 0.1) -> SelectorResult:
        """A small labelled target set (notes §5c): fit (beta = 1/T, lambda) jointly by the NLL of
        ``beta f̄ + lambda v`` on (``target_logits``, ``target_labels``), apply to ``logits``;
        reports T = 1/beta and tau' = 1 - lambda."""
        _check_logits(logits, self.num_classes)
        _check_logits(target_logits, self.num_classes, "labelled target logits")
        target_labels = _check_labels(target_labels, target_logits.shape[0], self.num_classes)
        beta, lam, iters = fit_beta_lambda(target_logits, target_labels, self.v, l2=l2)
        out = beta * logits + (lam * self.v).to(logits)
        return SelectorResult(out, "labelled", 1.0 - lam, prior_family(self.v, lam), 1.0 / beta,
                              {"beta": beta, "lambda": lam, "newton_iterations": iters,
                               "n_labelled": int(target_labels.numel())})

    def select(self, mode: str, logits: torch.Tensor, **kwargs: Any) -> SelectorResult:
        """Dispatch by mode name (for the CLI): ``none`` returns the logits unchanged (tau' = 1)."""
        if mode == "none":
            _check_logits(logits, self.num_classes)
            uniform = torch.full((self.num_classes,), 1.0 / self.num_classes, dtype=torch.float64)
            return SelectorResult(logits, "none", 1.0, uniform, 1.0, {})
        if mode == "known":
            if kwargs.get("prior") is None:
                raise BalpoeError("selector mode 'known' needs the target prior (prior=...)")
            return self.known(logits, kwargs["prior"])
        if mode == "unlabelled":
            return self.unlabelled(logits)
        if mode == "labelled":
            if kwargs.get("target_logits") is None or kwargs.get("target_labels") is None:
                raise BalpoeError("selector mode 'labelled' needs target_logits and target_labels")
            return self.labelled(logits, kwargs["target_logits"], kwargs["target_labels"])
        raise BalpoeError(f"unknown selector mode {mode!r}: expected one of {MODES}")
