"""Post-hoc calibration on held-out labelled source data.

* temperature scaling (TS, Guo et al. 2017): ``softmax(z / T)``;
* bias-corrected TS (BCTS, Alexandari et al. 2020): ``softmax(z / T + b)``, one bias per class.

Both minimise the mean NLL with L-BFGS in float64, with ``T = exp(t)`` so it stays positive.
An optional fixed ``offset`` is added after scaling (``softmax(z / T + b + offset)``): to fit the
temperature of balanced logits f̄ on a long-tailed slice of the training split, pass
``offset = log p_s`` (the slice's label distribution), so that the balanced model is scored on it
as ``f̄ / T + log p_s``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from balpoe.errors import BalpoeError
from balpoe.evaluate.metrics import check_logits_labels

# Fitted temperatures are kept in [T_MIN, T_MAX]: outside it the data are (nearly) separable or
# uninformative and the NLL has no finite minimiser.
T_MIN, T_MAX = 1e-2, 1e2


def _check(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_logits_labels(logits, labels, nonempty=True, finite=True)
    return logits.detach().double(), labels.long().to(logits.device)


def _offset(offset: torch.Tensor | None, z: torch.Tensor) -> torch.Tensor | float:
    if offset is None:
        return 0.0
    offset = torch.as_tensor(offset, dtype=torch.float64, device=z.device)
    if offset.shape[-1] != z.shape[1]:
        raise BalpoeError(f"calibration offset has {offset.shape[-1]} classes, logits have {z.shape[1]}")
    return offset


def _lbfgs(params: list[torch.Tensor], closure_loss, max_iter: int) -> None:
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, tolerance_grad=1e-7,
                            tolerance_change=1e-10, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = closure_loss()
        loss.backward()
        return loss

    opt.step(closure)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, offset: torch.Tensor | None = None,
                    max_iter: int = 200) -> float:
    """Temperature T minimising mean NLL of ``softmax(logits / T + offset)`` (TS, Guo et al. 2017)."""
    z, y = _check(logits, labels)
    off = _offset(offset, z)
    t = torch.zeros((), dtype=torch.float64, device=z.device, requires_grad=True)
    lo, hi = float(np.log(T_MIN)), float(np.log(T_MAX))
    _lbfgs([t], lambda: F.cross_entropy(z * torch.exp(-t.clamp(lo, hi)) + off, y), max_iter)
    return float(np.exp(np.clip(t.item(), lo, hi)))


def fit_bcts(logits: torch.Tensor, labels: torch.Tensor, offset: torch.Tensor | None = None,
             l2: float | None = None, max_iter: int = 200) -> tuple[float, torch.Tensor]:
    """BCTS: (T, b) minimising mean NLL of ``softmax(logits / T + b + offset)`` + ``l2 |b|^2`` (Alexandari et al. 2020).

    ``b`` (float64 [C]) has mean 0 (the NLL does not see a common shift).  The default
    ``l2 = 1 / (2N)`` is a unit-Gaussian prior on each bias (MAP; worth about one sample), which
    keeps b finite for a class absent from the held-out labels and tames classes with 1-2 images."""
    z, y = _check(logits, labels)
    if l2 is None:
        l2 = 0.5 / z.shape[0]
    off = _offset(offset, z)
    t = torch.zeros((), dtype=torch.float64, device=z.device, requires_grad=True)
    b = torch.zeros(z.shape[1], dtype=torch.float64, device=z.device, requires_grad=True)
    lo, hi = float(np.log(T_MIN)), float(np.log(T_MAX))

    def loss():
        return F.cross_entropy(z * torch.exp(-t.clamp(lo, hi)) + b + off, y) + l2 * (b * b).sum()

    _lbfgs([t, b], loss, max_iter)
    bias = b.detach()
    return float(np.exp(np.clip(t.item(), lo, hi))), bias - bias.mean()


def apply_calibration(logits: torch.Tensor, temperature: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Calibrated logits ``logits / T + b`` (same dtype and device as ``logits``)."""
    if not temperature > 0:
        raise BalpoeError(f"temperature must be > 0, got {temperature}")
    out = logits / temperature
    if bias is not None:
        bias = torch.as_tensor(bias, device=logits.device)
        if bias.shape != (logits.shape[-1],):
            raise BalpoeError(f"calibration bias has shape {tuple(bias.shape)}, expected ({logits.shape[-1]},)")
        out = out + bias.to(out.dtype)
    return out


def fit_post_hoc(logits: torch.Tensor, labels: torch.Tensor, source_prior: torch.Tensor | None = None) -> dict:
    """TS and BCTS fitted by NLL on labelled source data, scored with the source label
    distribution ``source_prior`` (``offset = log p_s``; None: none):
    ``{"ts": {"temperature", "bias": None}, "bcts": {"temperature", "bias"}}``."""
    offset = None if source_prior is None else torch.log(torch.as_tensor(source_prior, dtype=torch.float64)
                                                          .clamp_min(1e-8))
    t_ts = fit_temperature(logits, labels, offset=offset)
    t_b, bias = fit_bcts(logits, labels, offset=offset)
    return {"ts": {"temperature": t_ts, "bias": None}, "bcts": {"temperature": t_b, "bias": bias}}
