"""Post-hoc calibration on held-out labelled source data (test-shift notes §3, "Calibration").

* temperature scaling (TS): ``softmax(z / T)``;
* bias-corrected TS (BCTS): ``softmax(z / T + b)``, one bias per class.

Both minimise the mean NLL with L-BFGS in float64, with ``T = exp(t)`` so it stays positive.
An optional fixed ``offset`` is added after scaling (``softmax(z / T + b + offset)``): to fit the
temperature of balanced logits f̄ on a long-tailed train holdout, pass ``offset = log pi_train``
(notes §5, "scored with f̄/T + v").
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from balpoe.errors import BalpoeError

# Fitted temperatures are kept in [T_MIN, T_MAX]: outside it the data are (nearly) separable or
# uninformative and the NLL has no finite minimiser.
T_MIN, T_MAX = 1e-2, 1e2


def _check(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.ndim != 2:
        raise BalpoeError(f"logits must have shape [N, C], got {tuple(logits.shape)}")
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0] or labels.numel() == 0:
        raise BalpoeError(f"labels must have shape [{logits.shape[0]}] with N > 0, got {tuple(labels.shape)}")
    labels = labels.long()
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise BalpoeError(f"labels must lie in [0, {logits.shape[1]})")
    if not torch.isfinite(logits).all():
        raise BalpoeError("logits contain NaN or inf")
    return logits.detach().double(), labels.to(logits.device)


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
    """Temperature T minimising mean NLL of ``softmax(logits / T + offset)`` (TS, notes §3)."""
    z, y = _check(logits, labels)
    off = _offset(offset, z)
    t = torch.zeros((), dtype=torch.float64, device=z.device, requires_grad=True)
    lo, hi = float(np.log(T_MIN)), float(np.log(T_MAX))
    _lbfgs([t], lambda: F.cross_entropy(z * torch.exp(-t.clamp(lo, hi)) + off, y), max_iter)
    return float(np.exp(np.clip(t.item(), lo, hi)))


def fit_bcts(logits: torch.Tensor, labels: torch.Tensor, offset: torch.Tensor | None = None,
             l2: float | None = None, max_iter: int = 200) -> tuple[float, torch.Tensor]:
    """BCTS: (T, b) minimising mean NLL of ``softmax(logits / T + b + offset)`` + ``l2 |b|^2`` (notes §3).

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


def holdout_split(labels: torch.Tensor | np.ndarray, fraction: float, seed: int = 0,
                  min_per_class: int = 0) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Stratified split of labelled source data into (kept, held_out) index tensors (sorted).

    Each class with n_c images puts ``max(min_per_class, round(fraction * n_c))`` of them in the
    held-out part, but always leaves at least one in the kept part.  Own RNG (``seed``)."""
    if not 0.0 <= fraction < 1.0:
        raise BalpoeError(f"holdout fraction must be in [0, 1), got {fraction}")
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if y.ndim != 1:
        raise BalpoeError(f"labels must be 1-D, got shape {tuple(y.shape)}")
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(y):
        idx = np.where(y == c)[0]
        k = min(max(min_per_class, int(round(fraction * len(idx)))), len(idx) - 1)
        if k > 0:
            held.append(rng.choice(idx, size=k, replace=False))
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(y), dtype=bool)
    mask[held_idx] = False
    return torch.from_numpy(np.where(mask)[0].astype(np.int64)), torch.from_numpy(held_idx.astype(np.int64))
