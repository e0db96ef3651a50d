"""Baseline expert losses (cross-entropy, focal, class-balanced, LDAM-DRW, Balanced Softmax, RIDE,
SADE) against their closed forms and against the official codes' arithmetic, re-expressed here with
plain torch / numpy ops on the same logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from balpoe.errors import BalpoeError
from balpoe.losses import (BalancedSoftmaxLoss, BalPoELoss, ClassBalancedLoss, CrossEntropyLoss, FocalLoss,
                           LDAMLoss, RIDELoss, SADELoss, class_balanced_weights, inverse_prior, ldam_margins,
                           ride_diversity_weights)

COUNTS = [500, 200, 80, 30, 12, 5]
C = len(COUNTS)


def _logits(e=3, b=16, c=C, seed=0, scale=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(e, b, c, generator=g) * scale).to(dtype), torch.randint(0, c, (b,), generator=g)


def _nll(z, y):
    """-log softmax(z)_y per row, written out: logsumexp_j z_j - z_y."""
    m = z.max(-1, keepdim=True).values
    lse = m.squeeze(-1) + torch.log(torch.exp(z - m).sum(-1))
    return lse - z.gather(-1, y[:, None]).squeeze(-1)


def _official_cb_weights(counts, beta):
    """LDAM-DRW cifar_train.py / class-balanced-loss cifar_main.py: effective number, normalised to C."""
    effective_num = 1.0 - np.power(beta, counts)
    w = (1.0 - beta) / np.array(effective_num)
    return torch.tensor(w / np.sum(w) * len(counts))


#: every new loss, built with its defaults for E experts
FACTORIES = {
    "ce": lambda e: CrossEntropyLoss(COUNTS, e),
    "focal": lambda e: FocalLoss(COUNTS, e),
    "focal_ldam_drw_form": lambda e: FocalLoss(COUNTS, e, gamma=1.0, beta=0.9999, form="ldam_drw"),
    "class_balanced": lambda e: ClassBalancedLoss(COUNTS, e),
    "class_balanced_weighted_mean": lambda e: ClassBalancedLoss(COUNTS, e, reduction="weighted_mean"),
    "ldam_drw": lambda e: LDAMLoss(COUNTS, e),
    "ldam_reweighted": lambda e: LDAMLoss(COUNTS, e, drw_epoch=None),
    "balanced_softmax": lambda e: BalancedSoftmaxLoss(COUNTS, e),
    "ride": lambda e: RIDELoss(COUNTS, e, drw_epoch=None),
    "sade": lambda e: SADELoss(COUNTS, e),
}


# ------------------------------------------------------------------ shapes, dtypes, soft targets

@pytest.mark.parametrize("name", FACTORIES)
def test_scalar_with_gradient_for_labels_and_one_hot(name):
    loss_fn = FACTORIES[name](3)
    z, y = _logits()
    z.requires_grad_(True)
    loss = loss_fn(z, y)
    assert loss.shape == () and loss.dtype == torch.float64 and torch.isfinite(loss)
    loss.backward()
    assert z.grad.shape == z.shape and bool(torch.isfinite(z.grad).all()) and bool((z.grad != 0).any())
    # the soft form of a one-hot target is the label form
    assert loss_fn(z, F.one_hot(y, C).double()).item() == pytest.approx(loss.item(), rel=1e-9, abs=1e-12)
    # low-precision logits are computed in float32
    assert loss_fn(z.detach().to(torch.bfloat16), y).dtype == torch.float32


@pytest.mark.parametrize("name", FACTORIES)
def test_mixup_soft_target_is_linear(name):
    """mixup of a batch with a permutation of itself: L(lam e_a + (1 - lam) e_b) = lam L(y_a) + (1 - lam) L(y_b)."""
    loss_fn = FACTORIES[name](3)
    z, y_a = _logits(seed=1)
    y_b = y_a[torch.randperm(len(y_a), generator=torch.Generator().manual_seed(2))]
    lam = 0.37
    soft = lam * F.one_hot(y_a, C).double() + (1 - lam) * F.one_hot(y_b, C).double()
    assert loss_fn(z, soft).item() == pytest.approx(lam * loss_fn(z, y_a).item() + (1 - lam) * loss_fn(z, y_b).item(),
                                                    rel=1e-9)


@pytest.mark.parametrize("name", ["ce", "focal", "focal_ldam_drw_form", "class_balanced", "ldam_reweighted"])
def test_soft_target_linear_in_general_under_mean_reduction(name):
    loss_fn = FACTORIES[name](2)
    if loss_fn.reduction != "mean":
        loss_fn = type(loss_fn)(COUNTS, 2, drw_epoch=None, reduction="mean")
    z, _ = _logits(e=2, seed=3)
    g = torch.Generator().manual_seed(4)
    t1, t2 = (torch.rand(16, C, generator=g, dtype=torch.float64).softmax(-1) for _ in range(2))
    a = 0.8
    assert loss_fn(z, a * t1 + (1 - a) * t2).item() == pytest.approx(a * loss_fn(z, t1).item()
                                                                     + (1 - a) * loss_fn(z, t2).item(), rel=1e-9)


@pytest.mark.parametrize("name", FACTORIES)
def test_wrong_shapes_raise(name):
    loss_fn = FACTORIES[name](3)
    z, y = _logits()
    with pytest.raises(ValueError, match=r"expected expert logits \[E=3"):
        loss_fn(z[:2], y)
    with pytest.raises(ValueError, match=r"expected expert logits \[E=3"):
        loss_fn(z[0], y)
    if name != "balanced_softmax":        # BalPoELoss's own contract: it checks E only
        with pytest.raises(ValueError, match=r"C=6\], got \(3, 16, 5\)"):
            loss_fn(z[..., :5], y)
        with pytest.raises(ValueError, match=r"target must be int64 labels \[B=16\] or soft targets \[B=16, C=6\], "
                                             r"got torch.int32 \(16,\)"):
            loss_fn(z, y.int())


# ------------------------------------------------------------------ cross-entropy and focal

def test_cross_entropy_is_mean_over_experts_of_ce():
    z, y = _logits()
    expected = torch.stack([_nll(z[k], y).mean() for k in range(3)]).mean()
    assert CrossEntropyLoss(COUNTS, 3)(z, y).item() == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 5.0])
def test_focal_closed_form(gamma):
    """Lin et al. Eq. 4: -(1 - p_y)^gamma log p_y, mean over the batch, then over experts."""
    z, y = _logits()
    p_y = torch.exp(-_nll(z.reshape(-1, C), y.repeat(3))).reshape(3, -1)
    expected = (-(1 - p_y) ** gamma * torch.log(p_y)).mean()
    assert FocalLoss(COUNTS, 3, gamma=gamma)(z, y).item() == pytest.approx(expected.item(), rel=1e-10)


def _official_focal(z, y, gamma, weight=None):
    """LDAM-DRW losses.py focal_loss(F.cross_entropy(reduction='none', weight)): p = exp(-x), (1 - p)^gamma x."""
    x = F.cross_entropy(z, y, reduction="none", weight=weight)
    return ((1 - torch.exp(-x)) ** gamma * x).mean()


@pytest.mark.parametrize("gamma", [1.0, 2.0])
def test_focal_against_official_arithmetic(gamma):
    z, y = _logits(e=1)
    # unweighted: both forms are the official loss
    for form in ("paper", "ldam_drw"):
        assert FocalLoss(COUNTS, 1, gamma=gamma, form=form)(z, y).item() == \
            pytest.approx(_official_focal(z[0], y, gamma).item(), rel=1e-10)
    # class-balanced: the ldam_drw form is the official weighted focal, the paper form puts w_y outside
    w = _official_cb_weights(COUNTS, 0.9999)
    official = FocalLoss(COUNTS, 1, gamma=gamma, beta=0.9999, form="ldam_drw")(z, y)
    assert official.item() == pytest.approx(_official_focal(z[0], y, gamma, w).item(), rel=1e-6)
    p_y = torch.exp(-_nll(z[0], y))
    paper = (w[y] * -(1 - p_y) ** gamma * torch.log(p_y)).mean()
    assert FocalLoss(COUNTS, 1, gamma=gamma, beta=0.9999)(z, y).item() == pytest.approx(paper.item(), rel=1e-6)
    assert abs(official.item() - paper.item()) > 1e-3          # the two forms do differ with weights


@pytest.mark.parametrize("form", ["paper", "ldam_drw"])
@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_gradient_finite_when_p_is_one(form, gamma):
    z = torch.tensor([[[30.0, -30.0, -30.0], [-30.0, 30.0, -30.0]]], requires_grad=True)   # p_y = 1 in float32
    loss = FocalLoss([3, 2, 1], 1, gamma=gamma, beta=0.9, form=form)(z, torch.tensor([0, 1]))
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-20) and bool(torch.isfinite(z.grad).all())


# ------------------------------------------------------------------ class-balanced weights and loss

@pytest.mark.parametrize("beta", [0.9, 0.99, 0.999, 0.9999])
def test_class_balanced_weights_closed_form_and_official(beta):
    w = class_balanced_weights(COUNTS, beta)
    n = torch.tensor(COUNTS, dtype=torch.float64)
    raw = (1 - beta) / (1 - beta ** n)
    assert torch.allclose(w, raw / raw.sum() * C, rtol=1e-12)
    assert torch.allclose(w, _official_cb_weights(COUNTS, beta), rtol=1e-10)
    assert w.sum().item() == pytest.approx(C) and bool((w[1:] > w[:-1]).all())   # rarer class, larger weight


def test_class_balanced_weights_limits():
    assert torch.equal(class_balanced_weights(COUNTS, 0.0), torch.ones(C, dtype=torch.float64))
    assert torch.equal(class_balanced_weights([0, 3, 7], 0.0), torch.ones(3, dtype=torch.float64))
    # beta -> 1: inverse frequency, normalised to C
    inv = 1.0 / torch.tensor(COUNTS, dtype=torch.float64)
    assert torch.allclose(class_balanced_weights(COUNTS, 1 - 1e-12), inv / inv.sum() * C, rtol=1e-6)


def test_class_balanced_loss_reductions_against_official():
    z, y = _logits(e=1, seed=5)
    w = _official_cb_weights(COUNTS, 0.9999)
    # class-balanced-loss cifar_main.py: softmax_cross_entropy(weights=w_y), SUM_BY_NONZERO_WEIGHTS = mean of w_y CE
    cui = (w[y] * F.cross_entropy(z[0], y, reduction="none")).mean()
    assert ClassBalancedLoss(COUNTS, 1)(z, y).item() == pytest.approx(cui.item(), rel=1e-6)
    # LDAM-DRW cifar_train.py Reweight rule: nn.CrossEntropyLoss(weight=w): sum w_y CE / sum w_y
    ldam_drw = F.cross_entropy(z[0], y, weight=w)
    assert ClassBalancedLoss(COUNTS, 1, reduction="weighted_mean")(z, y).item() == pytest.approx(ldam_drw.item(), rel=1e-6)


def test_class_balanced_focal_closed_form():
    z, y = _logits(seed=6)
    w = class_balanced_weights(COUNTS, 0.999)
    p_y = torch.exp(-_nll(z.reshape(-1, C), y.repeat(3))).reshape(3, -1)
    expected = (w[y] * -(1 - p_y) ** 0.5 * torch.log(p_y)).mean()
    assert ClassBalancedLoss(COUNTS, 3, beta=0.999, gamma=0.5)(z, y).item() == pytest.approx(expected.item(), rel=1e-6)


# ------------------------------------------------------------------ LDAM-DRW

def test_ldam_margins_closed_form_and_official():
    m = ldam_margins(COUNTS, 0.5)
    n = torch.tensor(COUNTS, dtype=torch.float64)
    assert m.max().item() == pytest.approx(0.5) and int(m.argmax()) == int(n.argmin())
    assert torch.allclose(m[0] / m, (n / n[0]) ** 0.25, rtol=1e-12)             # m_j ∝ n_j^(-1/4)
    official = 1.0 / np.sqrt(np.sqrt(COUNTS))                                    # LDAM-DRW losses.py
    official = official * (0.5 / np.max(official))
    assert torch.allclose(m, torch.tensor(official), rtol=1e-12)


def _ldam_eq13(z, y, a, w=None):
    """Cao et al. Eq. 13 with Delta_j = a_j, element by element: -log(e^(z_y - a_y) / (e^(z_y - a_y) + sum_{j != y} e^(z_j)))."""
    losses, weights = [], []
    for b in range(z.shape[0]):
        yb = int(y[b])
        top = math.exp(float(z[b, yb]) - float(a[yb]))
        rest = sum(math.exp(float(z[b, j])) for j in range(z.shape[1]) if j != yb)
        losses.append(-math.log(top / (top + rest)))
        weights.append(1.0 if w is None else float(w[yb]))
    return sum(wi * li for wi, li in zip(weights, losses)) / sum(weights)


def _official_ldam(cos, y, m_list, s, weight=None):
    """LDAM-DRW losses.py LDAMLoss.forward: margin on the label's cosine, then CE(s * output, weight)."""
    index = F.one_hot(y, cos.shape[1]).bool()
    output = torch.where(index, cos - m_list[y][:, None], cos)
    return F.cross_entropy(s * output, y, weight=weight)


def test_ldam_closed_form_and_official_on_cosine_logits():
    g = torch.Generator().manual_seed(7)
    cos = torch.rand(2, 16, C, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, C, (16,), generator=g)
    s = 30.0
    loss_fn = LDAMLoss(COUNTS, 2, beta=0.0)                        # plain LDAM (no re-weighting)
    m = ldam_margins(COUNTS)
    ours = loss_fn(s * cos, y).item()
    assert ours == pytest.approx(np.mean([_ldam_eq13(s * cos[k], y, s * m) for k in range(2)]), rel=1e-6)
    assert ours == pytest.approx(np.mean([_official_ldam(cos[k], y, m, s).item() for k in range(2)]), rel=1e-6)


def test_drw_weights_per_epoch_follow_the_official_rule():
    """LDAM-DRW cifar_train.py: idx = epoch // 160, betas = [0, 0.9999] (0-based epochs of 200);
    RIDE model/loss.py: re-weighted when the 1-based epoch > 160."""
    loss_fn = LDAMLoss(COUNTS, 1)
    g = torch.Generator().manual_seed(8)
    cos = torch.rand(1, 32, C, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, C, (32,), generator=g)
    m = ldam_margins(COUNTS)
    assert torch.equal(loss_fn.class_weights, torch.ones(C))           # before any set_epoch: epoch 0
    for epoch in (0, 1, 158, 159, 160, 161, 199):
        loss_fn.set_epoch(epoch)
        beta = [0, 0.9999][epoch // 160]
        with np.errstate(divide="ignore"):
            expected_w = _official_cb_weights(COUNTS, beta)
        assert torch.allclose(loss_fn.class_weights.double(), expected_w, rtol=1e-6), epoch
        assert loss_fn.reweighting == (epoch + 1 > 160)                   # RIDE's 1-based rule
        expected = _official_ldam(cos[0], y, m, 30.0, weight=expected_w)
        assert loss_fn(30 * cos, y).item() == pytest.approx(expected.item(), rel=1e-6), epoch
    loss_fn.set_epoch(3)                                                  # resumed run going back: weights 1 again
    assert torch.equal(loss_fn.class_weights, torch.ones(C))


def test_ldam_soft_targets_stable_for_confident_logits():
    z = torch.full((1, 4, C), -30.0, dtype=torch.float32)
    y = torch.tensor([0, 5, 2, 5])
    z[0, torch.arange(4), y] = 30.0                                       # p_y = 1 in float32
    loss_fn = LDAMLoss(COUNTS, 1, beta=0.0)
    soft = F.one_hot(y, C).float().requires_grad_(False)
    zl = z.clone().requires_grad_(True)
    zs = z.clone().requires_grad_(True)
    a, b = loss_fn(zl, y), loss_fn(zs, soft)
    assert a.item() == pytest.approx(b.item(), rel=1e-5, abs=1e-7)
    a.backward()
    b.backward()
    assert bool(torch.isfinite(zs.grad).all()) and torch.allclose(zl.grad, zs.grad, atol=1e-6)


# ------------------------------------------------------------------ Balanced Softmax

def test_balanced_softmax_is_logit_adjustment_with_tau_one():
    z, y = _logits(seed=9)
    bs = BalancedSoftmaxLoss(COUNTS, 3)
    assert isinstance(bs, BalPoELoss) and bs.tau.tolist() == [1.0, 1.0, 1.0]
    assert torch.equal(bs(z, y), BalPoELoss(COUNTS, [1.0, 1.0, 1.0])(z, y))
    # Ren et al.: -log(n_y e^(z_y) / sum_j n_j e^(z_j)) = CE(z + log n, y)
    n = torch.tensor(COUNTS, dtype=torch.float64)
    expected = torch.stack([_nll(z[k] + torch.log(n), y).mean() for k in range(3)]).mean()
    assert bs(z, y).item() == pytest.approx(expected.item(), rel=1e-6)


# ------------------------------------------------------------------ RIDE

def test_ride_diversity_weights_closed_form():
    pi = torch.tensor(COUNTS, dtype=torch.float64) / sum(COUNTS)
    for r in (0.0, 0.015, 0.05, 0.5):
        raw = C * pi * r + 1 - r
        assert torch.allclose(ride_diversity_weights(COUNTS, r), raw / raw.max(), rtol=1e-12)
    assert torch.equal(ride_diversity_weights(COUNTS, 0.0), torch.ones(C, dtype=torch.float64))


def _official_ride(expert_logits, y, counts, epoch_1based, reweight_epoch=160, factor=-0.2, T=1.0, rf=0.05,
                   max_m=0.5, s=30.0):
    """RIDE model/loss.py RIDELoss.forward, re-expressed (output_logits = mean of the expert logits)."""
    counts = np.array(counts, dtype=np.float64)
    m_list = 1.0 / np.sqrt(np.sqrt(counts))
    m_list = torch.tensor(m_list * (max_m / np.max(m_list)))
    on = epoch_1based > reweight_epoch
    w_base = _official_cb_weights(counts, 0.9999) if on else None
    pi = counts / counts.sum()
    w_div = C * pi * rf + 1 - rf
    w_div = torch.tensor(w_div / np.max(w_div))
    output_logits = expert_logits.mean(0)
    loss = 0
    for logits_item in expert_logits:
        index = F.one_hot(y, C).bool()
        final_output = torch.where(index, logits_item - m_list[y][:, None] * s, logits_item)
        loss = loss + F.cross_entropy(final_output, y, weight=w_base)
        if on:
            temperature = T * w_div.view(1, -1)
            temperature_mean = temperature.mean().item()
        else:
            temperature, temperature_mean = T, T
        output_dist = F.log_softmax(logits_item / temperature, dim=1)
        with torch.no_grad():
            mean_output_dist = F.softmax(output_logits / temperature, dim=1)
        loss = loss + factor * temperature_mean ** 2 * F.kl_div(output_dist, mean_output_dist, reduction="batchmean")
    return loss


@pytest.mark.parametrize("epoch", [0, 159, 160, 199])
@pytest.mark.parametrize("factor", [-0.2, -0.45])
def test_ride_against_official_arithmetic_loss_and_gradient(epoch, factor):
    z, y = _logits(seed=10, scale=8.0)
    loss_fn = RIDELoss(COUNTS, 3, diversity_factor=factor)
    loss_fn.set_epoch(epoch)
    za, zb = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    ours = loss_fn(za, y)
    official = _official_ride(zb, y, COUNTS, epoch + 1, factor=factor)
    assert ours.item() == pytest.approx(official.item(), rel=1e-6)
    ours.backward()
    official.backward()
    assert torch.allclose(za.grad, zb.grad, rtol=1e-6, atol=1e-9)


def test_ride_diversity_closed_form_and_single_expert():
    z, y = _logits(seed=11)
    loss_fn = RIDELoss(COUNTS, 3, drw_epoch=None)
    T = loss_fn.temperatures().double()
    p = torch.softmax(z.mean(0) / T, -1)
    kl = sum((p * (torch.log(p) - torch.log_softmax(z[k] / T, -1))).sum(-1).mean() for k in range(3))
    assert loss_fn.diversity(z).item() == pytest.approx((T.mean() ** 2 * kl).item(), rel=1e-10)
    assert loss_fn.diversity(z).item() > 0
    base = loss_fn.base.expert_losses(z, y).sum()
    assert loss_fn(z, y).item() == pytest.approx((base - 0.2 * loss_fn.diversity(z)).item(), rel=1e-12)
    # one expert is its own ensemble: no diversity, RIDE is LDAM-DRW
    one = RIDELoss(COUNTS, 1, drw_epoch=None)
    assert one.diversity(z[:1]).item() == pytest.approx(0.0, abs=1e-12)
    assert one(z[:1], y).item() == pytest.approx(LDAMLoss(COUNTS, 1, drw_epoch=None)(z[:1], y).item(), rel=1e-12)


# ------------------------------------------------------------------ SADE

def _official_inverse_prior(prior):
    """SADE model/loss.py DiverseExpertLoss.inverse_prior."""
    value, idx0 = torch.sort(prior)
    _, idx1 = torch.sort(idx0)
    idx2 = prior.shape[0] - 1 - idx1
    return value.index_select(0, idx2)


def test_inverse_prior_against_official():
    pi = torch.tensor(COUNTS, dtype=torch.float64) / sum(COUNTS)
    assert torch.equal(inverse_prior(pi), pi.flip(0))                 # sorted by count: read backwards
    g = torch.Generator().manual_seed(12)
    for _ in range(5):
        prior = torch.rand(17, generator=g, dtype=torch.float64)     # distinct values, any order
        assert torch.equal(inverse_prior(prior), _official_inverse_prior(prior))
        assert torch.equal(inverse_prior(inverse_prior(prior)), prior)
    assert inverse_prior(torch.tensor([2.0, 1.0, 2.0, 5.0])).tolist() == [2.0, 5.0, 2.0, 1.0]
    # tied classes can get different values: they are ranked in class order, whatever the sort does
    assert inverse_prior(torch.tensor([1.0, 1.0, 3.0])).tolist() == [3.0, 1.0, 1.0]


@pytest.mark.parametrize("tau", [2.0, 1.0])
def test_sade_against_official_arithmetic(tau):
    z, y = _logits(seed=13)
    g = torch.Generator().manual_seed(14)
    counts = torch.randint(1, 400, (C,), generator=g)[torch.randperm(C, generator=g)]     # not sorted
    prior = (counts / counts.sum()).double()
    lp = torch.log(prior + 1e-9)
    official = (F.cross_entropy(z[0], y) + F.cross_entropy(z[1] + lp, y)
                + F.cross_entropy(z[2] + lp - tau * torch.log(_official_inverse_prior(prior) + 1e-9), y))
    assert SADELoss(counts, 3, tau=tau)(z, y).item() == pytest.approx(official.item(), rel=1e-6)


def test_sade_experts_are_logit_adjusted_on_an_exponential_profile():
    counts = [2.0 ** (10 - i) for i in range(C)]                      # exactly exponential
    z, y = _logits(seed=15)
    sade = SADELoss(counts, 3, tau=2.0)
    per_expert = [BalPoELoss(counts, [t])(z[k:k + 1], y) for k, t in enumerate([0.0, 1.0, 3.0])]
    assert sade(z, y).item() == pytest.approx(sum(p.item() for p in per_expert), rel=1e-6)


# ------------------------------------------------------------------ bad arguments

@pytest.mark.parametrize("build,message", [
    (lambda: CrossEntropyLoss(COUNTS, 0), "num_experts must be a positive integer, got 0"),
    (lambda: CrossEntropyLoss([[1, 2]], 1), "class_counts must be a non-empty 1-D vector, got shape (1, 2)"),
    (lambda: CrossEntropyLoss([3, -1], 1), "class_counts must be finite, non-negative and not all zero"),
    (lambda: FocalLoss(COUNTS, 1, gamma=-1), "focal gamma must be a finite number >= 0, got -1"),
    (lambda: FocalLoss(COUNTS, 1, form="sigmoid"), "focal form must be one of ('paper', 'ldam_drw'), got 'sigmoid'"),
    (lambda: ClassBalancedLoss(COUNTS, 1, beta=1.0), "class-balanced beta must be a number in [0, 1), got 1.0"),
    (lambda: ClassBalancedLoss(COUNTS, 1, beta=-0.1), "class-balanced beta must be a number in [0, 1), got -0.1"),
    (lambda: ClassBalancedLoss([5, 0, 2], 1), "class-balanced weights (beta=0.9999) need every class count > 0, "
                                              "class 1 has 0"),
    (lambda: ClassBalancedLoss(COUNTS, 1, reduction="sum"),
     "loss reduction must be one of ('mean', 'weighted_mean'), got 'sum'"),
    (lambda: LDAMLoss(COUNTS, 1, drw_epoch=-1), "drw_epoch must be a non-negative integer or None, got -1"),
    (lambda: LDAMLoss(COUNTS, 1, drw_epoch=1.5), "drw_epoch must be a non-negative integer or None, got 1.5"),
    (lambda: LDAMLoss([5, 0, 2], 1, beta=0.0), "LDAM margins need every class count > 0, class 1 has 0"),
    (lambda: LDAMLoss(COUNTS, 1, max_m=0), "LDAM max_m must be a finite number > 0, got 0"),
    (lambda: LDAMLoss(COUNTS, 1, s=0), "LDAM scale s must be a finite number > 0, got 0"),
    (lambda: BalancedSoftmaxLoss(COUNTS, 0), "num_experts must be a positive integer, got 0"),
    (lambda: RIDELoss(COUNTS, 3, reweight_factor=2.0),
     "RIDE reweight_factor 2.0 is too large: it makes a class temperature <= 0"),
    (lambda: RIDELoss(COUNTS, 3, diversity_temperature=0.0),
     "RIDE diversity_temperature must be a finite number > 0, got 0.0"),
    (lambda: RIDELoss(COUNTS, 3, diversity_factor=float("nan")), "RIDE diversity_factor must be a finite number, got nan"),
    (lambda: SADELoss(COUNTS, 2), "SADE trains exactly 3 experts (forward, uniform, backward), got num_experts=2"),
    (lambda: SADELoss(COUNTS, 3, tau=float("inf")), "SADE tau must be a finite number, got inf"),
    (lambda: LDAMLoss(COUNTS, 1).set_epoch(-1), "epoch must be a non-negative integer, got -1"),
])
def test_bad_arguments_raise_one_line(build, message):
    with pytest.raises(BalpoeError) as e:
        build()
    assert str(e.value) == message
