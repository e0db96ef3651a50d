"""BalPoE expert loss and mixup against closed forms."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from balpoe.losses import BalPoELoss, log_prior, make_tau_list
from balpoe.data.mixup import mixup_batch, mixup_targets

COUNTS = torch.tensor([500, 200, 80, 30, 12, 5])


def _logits(e=3, b=16, c=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(e, b, c, generator=g) * 3, torch.randint(0, c, (b,), generator=g)


def test_tau_list_closed_forms():
    assert make_tau_list(3, 0, 2) == [0.0, 1.0, 2.0]
    assert make_tau_list(5, -1, 3) == [-1.0, 0.0, 1.0, 2.0, 3.0]
    assert make_tau_list(1, 0, 2) == [1.0]
    assert make_tau_list(4, 0, 2, "uniform") == pytest.approx([0.25, 0.75, 1.25, 1.75])


def test_log_prior_is_log_of_frequencies():
    expected = torch.log(COUNTS.double() / COUNTS.sum()).float()
    assert torch.allclose(log_prior(COUNTS), expected, atol=1e-6)


def test_tau_zero_is_plain_cross_entropy():
    logits, y = _logits(e=1)
    loss = BalPoELoss(COUNTS, [0.0])(logits, y)
    assert torch.allclose(loss, F.cross_entropy(logits[0], y), atol=1e-6)


def test_adjusted_loss_equals_formula_and_mean_over_experts():
    logits, y = _logits()
    taus = [0.0, 1.0, 2.0]
    loss = BalPoELoss(COUNTS, taus)(logits, y)
    pi = COUNTS.double() / COUNTS.sum()
    per_expert = []
    for k, tau in enumerate(taus):
        z = logits[k].double() + tau * torch.log(pi)
        # -log softmax written out: -(z_y - log sum_j exp z_j)
        nll = -(z.gather(1, y[:, None]).squeeze(1) - torch.log(torch.exp(z).sum(1)))
        per_expert.append(nll.mean())
    assert loss.item() == pytest.approx(torch.stack(per_expert).mean().item(), rel=1e-5)


def test_tau_one_is_logit_adjustment():
    logits, y = _logits(e=1)
    loss = BalPoELoss(COUNTS, [1.0])(logits, y)
    expected = F.cross_entropy(logits[0] + log_prior(COUNTS), y)
    assert torch.allclose(loss, expected, atol=1e-6)


def test_soft_target_form_equals_mixed_losses():
    logits, y_a = _logits(seed=1)
    y_b = y_a.roll(3)
    crit = BalPoELoss(COUNTS, [0.0, 1.0, 2.0])
    lam = 0.37
    mixed = lam * crit(logits, y_a) + (1 - lam) * crit(logits, y_b)
    soft = crit(logits, mixup_targets(y_a, y_b, lam, COUNTS.numel()))
    assert torch.allclose(mixed, soft, atol=1e-6)


def test_mixup_batch_mixes_with_a_permutation():
    x = torch.randn(9, 3, 4, 4)
    y = torch.arange(9)
    rng = np.random.default_rng(0)
    xm, ya, yb, lam = mixup_batch(x.clone(), y, 0.4, rng, torch.Generator().manual_seed(1))
    assert 0.0 <= lam <= 1.0
    assert torch.equal(ya, y) and sorted(yb.tolist()) == list(range(9))  # y_b is a permutation of y
    assert torch.allclose(xm, lam * x + (1 - lam) * x[yb], atol=1e-6)    # labels are indices here
    # lam comes from Beta(alpha, alpha): mean 0.5, variance 1 / (4 (2 alpha + 1)).
    lams = [mixup_batch(x, y, 0.4, rng)[3] for _ in range(4000)]
    assert np.mean(lams) == pytest.approx(0.5, abs=0.02)
    assert np.var(lams) == pytest.approx(1 / (4 * 1.8), rel=0.1)


def test_loss_rejects_wrong_number_of_experts():
    logits, y = _logits(e=2)
    with pytest.raises(ValueError, match="E=3"):
        BalPoELoss(COUNTS, [0, 1, 2])(logits, y)


def test_balanced_ensemble_bias_is_mean_tau():
    # The ensemble of adjusted logits carries the mean bias: mean_k(f_k + tau_k v) = mean f + mean(tau) v.
    logits, _ = _logits()
    crit = BalPoELoss(COUNTS, [0.0, 1.0, 2.0])
    adj = crit.adjusted_logits(logits).mean(0)
    assert torch.allclose(adj, logits.mean(0) + 1.0 * log_prior(COUNTS), atol=1e-5)
    assert math.isclose(crit.tau.mean().item(), 1.0)
