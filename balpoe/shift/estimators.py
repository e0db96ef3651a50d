"""Label-shift estimators on calibrated logits: the prior family ``pi^lambda``, its 1-D maximum
likelihood, Saerens et al. (2002) EM, empirical-Bayes shrinkage, and the joint (1/T, lambda) fit
on a few labelled target images.

With ``v = log pi_train`` and balanced ensemble logits f̄ (BalPoE, mean tau 1), the logits
``f̄ + (1 - tau') v`` target the prior ``pi^lambda / Z(lambda)`` with ``lambda = 1 - tau'``
(BalPoE Sec. 3: expert k with tau_k targets ``pi^(1 - tau_k)``).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def prior_family(v: torch.Tensor, lam: float) -> torch.Tensor:
    """The scalar family ``pi^lambda / Z(lambda)`` = softmax(lambda v) (module docstring)."""
    return torch.softmax(lam * v, 0)


def best_lambda(prior: torch.Tensor, v: torch.Tensor, bound: float = 50.0) -> float:
    """argmin_lambda KL(q || pi^lambda / Z).  d/dlambda = E_{pi^l/Z}[v] - E_q[v] is
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


def log_mean_variance(probs: torch.Tensor) -> torch.Tensor:
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
    """L(lambda) = Sum_n log Sum_y p~(y|x_n) pi(y)^lambda / (Z(lambda) p0(y)) given
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
    """1-D MLE of lambda on [lo, hi]: a coarse grid to bracket the best point (the
    likelihood need not be concave in lambda), then golden-section search inside the bracket."""
    fn = LambdaLikelihood(log_ratio, v)
    lams = np.linspace(lo, hi, grid)
    lls = [fn(float(lam)) for lam in lams]
    i = int(np.argmax(lls))
    a, b = lams[max(i - 1, 0)], lams[min(i + 1, grid - 1)]
    return golden_section_max(fn, float(a), float(b), tol)


def em_prior(log_ratio: torch.Tensor, init: torch.Tensor, pseudo_counts: torch.Tensor,
             tol: float = 1e-6, max_iter: int = 100) -> tuple[torch.Tensor, int]:
    """Saerens et al. (2002) EM for the target prior with Dirichlet-MAP pseudo-counts.

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
    + l2/2 |(beta - 1, lambda)|^2.  Logits are affine in (beta, lambda), so the objective
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
