"""The training prior and what the losses do with it: ``log pi_train``, the experts' taus, the
stage-2 logit offsets, and the prior a model's logits keep; the class frequencies of a labelled set.

Notation (BalPoE, Sanchez Aimar et al. CVPR 2023, Sec. 3): ``pi_y = n_y / N`` is the training
label distribution; expert ``k`` is trained with ``CE(f_k + tau_k log pi, y)``.  Fitting
``softmax(f + delta log pi)`` to a sample stream whose label prior is ``rho`` leaves
``f = log p(x|y) + log rho - delta log pi + c(x)``: the raw logits keep the prior ``rho * pi^-delta``.
"""

from __future__ import annotations

from typing import Sequence

import warnings

import torch

from balpoe.errors import BalpoeError

#: added to every class frequency before the log (as the official BalPoE code); keeps empty classes finite
PRIOR_EPS = 1e-9


def log_prior(class_counts: torch.Tensor | Sequence[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``log pi_train`` with ``pi_y = n_y / N``: ``log(n_y / N + 1e-9)``, computed in float64 and
    returned as ``dtype`` (``[C]``).  The counts must be a non-empty 1-D vector of finite,
    non-negative numbers that are not all zero."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64).detach().cpu()
    if counts.ndim != 1 or counts.numel() == 0:
        raise BalpoeError(f"class_counts must be a non-empty 1-D vector, got shape {tuple(counts.shape)}")
    if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()) or float(counts.sum()) <= 0:
        raise BalpoeError("class_counts must be finite, non-negative and not all zero")
    return torch.log(counts / counts.sum() + PRIOR_EPS).to(dtype)


def empirical_prior(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class frequencies (float64 [C]) of a label vector: the label distribution of a labelled set
    (a target set's oracle prior, a calibration source's prior)."""
    counts = torch.bincount(torch.as_tensor(labels).cpu().long(), minlength=num_classes).double()
    return counts / counts.sum()


def make_tau_list(num_experts: int, tau_min: float = 0.0, tau_max: float = 2.0, spacing: str = "limits") -> list[float]:
    """Evenly spaced tau values, as the official ``--tau_list`` options.

    ``limits``: tau_i = tau_min + (tau_max - tau_min) * i / (E - 1), both ends included (E = 1: the
    midpoint); ``uniform``: bin centres tau_min + (tau_max - tau_min) * (i + 0.5) / E.
    """
    span = tau_max - tau_min
    if spacing == "limits":
        if num_experts == 1:
            return [tau_min + span / 2]
        return [tau_min + span * i / (num_experts - 1) for i in range(num_experts)]
    if spacing == "uniform":
        return [tau_min + span * (i + 0.5) / num_experts for i in range(num_experts)]
    raise BalpoeError(f"tau spacing must be 'limits' or 'uniform', got {spacing!r}")


def stage2_expert_offsets(taus: Sequence[float], mode: str = "relative") -> list[float]:
    """Per-expert logit offsets ``delta_k`` of the stage-2 loss ``LAS(f_k + delta_k log pi, y)``.

    Stage 1 samples instance-balanced (``rho = pi``) with ``delta = tau_k``, so BalPoE expert k
    ends with the prior ``pi^(1 - tau_k)`` (tau 0: head expert, 1: balanced, 2: tail expert) and
    the ensemble (mean logits) with ``pi^(1 - mean tau)``.  Stage 2 samples class-balanced
    (``rho = 1``, MiSLAS Sec. 3.3): the sampler already removes one power of ``pi``.

    * ``relative`` (default): ``delta_k = tau_k - mean(tau)``.  Expert k ends with the prior
      ``pi^(mean tau - tau_k)``: the ensemble is balanced after stage 2 and every expert keeps its
      offset from it, so with a balanced BalPoE (mean tau = 1) each expert keeps exactly its
      stage-1 target ``pi^(1 - tau_k)``.  For E = 1 the offset is 0 whatever tau is: MiSLAS'
      stage 2 is exactly LAS.
    * ``absolute``: ``delta_k = tau_k``, the stage-1 adjustment.  Under class-balanced sampling
      expert k then ends with ``pi^-tau_k``: a balanced BalPoE ensemble ends at ``pi^-1``
      (over-corrected); kept for comparison.
    * ``none``: ``delta_k = 0``; every expert is re-balanced, the experts' diversity in bias is lost.
    """
    taus = [float(t) for t in taus]
    if not taus:
        raise BalpoeError("stage 2 needs at least one expert tau")
    if mode == "relative":
        mean = sum(taus) / len(taus)
        return [t - mean for t in taus]
    if mode == "absolute":
        return list(taus)
    if mode == "none":
        return [0.0] * len(taus)
    raise BalpoeError(f"recipe key 'stage2.expert_adjust' must be one of relative, absolute, none; got {mode!r}")


def logit_prior_exponent(offsets: Sequence[float], class_balanced: bool) -> float:
    """``lambda_m`` with ``mean_k f_k ≈ log p(x|y) + lambda_m log pi_train + c(x)``: the sampler's
    prior exponent (1 for instance-balanced sampling, 0 for class-balanced) minus the mean logit
    offset of the loss (module docstring).  0 for BalPoE (mean tau 1) and for a single
    logit-adjusted expert with tau 1; 1 for plain cross-entropy."""
    offsets = [float(d) for d in offsets]
    return (0.0 if class_balanced else 1.0) - sum(offsets) / len(offsets)


def balance_logits(logits: torch.Tensor, class_counts, lam_model: float) -> torch.Tensor:
    """Balanced ensemble logits ``f̄ - lambda_m log pi_train`` (unchanged when ``lambda_m = 0``):
    removes the training prior a model's logits keep (:func:`logit_prior_exponent`)."""
    if lam_model == 0:
        return logits
    return logits - (lam_model * log_prior(class_counts, torch.float64)).to(logits)


def warn_unbalanced_tau(taus: Sequence[float]) -> None:
    """Warn when the mean tau is not 1: the ensemble then targets ``pi_train^(1 - mean tau)``, not
    the balanced prior (BalPoE Sec. 3)."""
    mean = sum(taus) / len(taus)
    if abs(mean - 1.0) > 1e-6:
        warnings.warn(f"mean tau is {mean:g}, not 1: the ensemble is not balanced "
                      f"(it targets a prior proportional to pi_train^{1 - mean:g})", stacklevel=2)
