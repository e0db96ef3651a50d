"""Label-aware smoothing (MiSLAS Eq. 1, 3, 7)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from balpoe.errors import BalpoeError
from balpoe.losses.las import LabelAwareSmoothingLoss, label_aware_epsilons

LT_COUNTS = [500, 300, 180, 108, 65, 39, 23, 14, 8, 5]  # ~exponential, IF = 100
FORMS = [("concave", None), ("linear", None), ("convex", None),
         ("power", 0.3), ("power", 1.0), ("power", 2.5)]


def reference_loss(logits: torch.Tensor, target: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Eq. 1 written out element by element, in float64."""
    B, K = logits.shape
    total = 0.0
    for b in range(B):
        y = int(target[b])
        z = [float(v) for v in logits[b]]
        m = max(z)
        lse = m + math.log(sum(math.exp(v - m) for v in z))
        for i in range(K):
            q = 1.0 - float(eps[y]) if i == y else float(eps[y]) / (K - 1)
            total -= q * (z[i] - lse)
    return torch.tensor(total / B, dtype=torch.float64)


# ------------------------------------------------------------------ epsilons (Eq. 3, 7)

@pytest.mark.parametrize("form,power", FORMS)
def test_epsilons_end_points_and_monotone(form, power):
    gen = torch.Generator().manual_seed(0)
    counts = torch.randint(1, 1000, (50,), generator=gen)
    eps = label_aware_epsilons(counts, 0.4, 0.1, form, power)
    assert eps.shape == (50,)
    assert eps[counts.argmax()].item() == pytest.approx(0.4, abs=1e-15)
    assert eps[counts.argmin()].item() == pytest.approx(0.1, abs=1e-15)
    assert ((eps >= 0.1 - 1e-15) & (eps <= 0.4 + 1e-15)).all()
    order = torch.argsort(counts)
    assert (torch.diff(eps[order]) >= 0).all()  # non-decreasing in N
    strict = torch.diff(counts[order].double()) > 0
    assert (torch.diff(eps[order])[strict] > 0).all()  # strictly where N strictly grows


@pytest.mark.parametrize("form,power", FORMS)
def test_epsilons_class_order_free(form, power):
    counts = torch.tensor(LT_COUNTS)
    perm = torch.randperm(len(counts), generator=torch.Generator().manual_seed(1))
    a = label_aware_epsilons(counts, 0.3, 0.05, form, power)
    b = label_aware_epsilons(counts[perm], 0.3, 0.05, form, power)
    assert torch.allclose(a[perm], b, atol=0, rtol=0)
    assert torch.equal(label_aware_epsilons(LT_COUNTS, 0.3, 0.05, form, power), a)  # list input


def test_epsilons_closed_forms():
    # N_1 = 500, N_K = 5; N = 252.5 sits half-way (r = 1/2).
    counts = [500, 252.5, 5]
    e1, eK = 0.4, 0.1
    conc = label_aware_epsilons(counts, e1, eK, "concave")
    lin = label_aware_epsilons(counts, e1, eK, "linear")
    conv = label_aware_epsilons(counts, e1, eK, "convex")
    assert conc[1].item() == pytest.approx(eK + (e1 - eK) * math.sin(math.pi / 4), abs=1e-12)
    assert lin[1].item() == pytest.approx(0.25, abs=1e-12)
    # Eq. 3 convex as printed: eps_1 + (eps_1 - eps_K) sin(3pi/2 + pi r / 2)
    assert conv[1].item() == pytest.approx(e1 + (e1 - eK) * math.sin(1.5 * math.pi + math.pi / 4), abs=1e-12)
    p = label_aware_epsilons(counts, e1, eK, "power", 0.5)
    assert p[1].item() == pytest.approx(eK + (e1 - eK) * math.sqrt(0.5), abs=1e-12)
    # power p = 1 is the linear form; concave >= linear >= convex; p < 1 concave-like, p > 1 convex-like
    assert torch.allclose(label_aware_epsilons(LT_COUNTS, e1, eK, "power", 1.0),
                          label_aware_epsilons(LT_COUNTS, e1, eK, "linear"), atol=1e-15)
    c, l, v = (label_aware_epsilons(LT_COUNTS, e1, eK, f) for f in ("concave", "linear", "convex"))
    assert (c >= l - 1e-15).all() and (l >= v - 1e-15).all() and (c[1:-1] > v[1:-1]).all()
    assert (label_aware_epsilons(LT_COUNTS, e1, eK, "power", 0.5)[1:-1] > l[1:-1]).all()
    assert (label_aware_epsilons(LT_COUNTS, e1, eK, "power", 2.0)[1:-1] < l[1:-1]).all()


def test_epsilons_degenerate_cases():
    assert torch.equal(label_aware_epsilons([7, 7, 7], 0.3, 0.1), torch.full((3,), 0.3, dtype=torch.float64))
    assert torch.equal(label_aware_epsilons(LT_COUNTS, 0.2, 0.2, "convex"),
                       torch.full((10,), 0.2, dtype=torch.float64))
    assert torch.equal(label_aware_epsilons(LT_COUNTS, 0.0, 0.0), torch.zeros(10, dtype=torch.float64))


@pytest.mark.parametrize("kwargs,match", [
    (dict(eps_1=0.1, eps_K=0.2), "eps_K <= eps_1"),
    (dict(eps_1=0.4, eps_K=-0.1), "eps_K <= eps_1"),
    (dict(eps_1=1.2, eps_K=0.1), "eps_1 <= 1"),
    (dict(eps_1=0.4, eps_K=0.1, form="cubic"), "form"),
    (dict(eps_1=0.4, eps_K=0.1, form="power"), "power > 0"),
    (dict(eps_1=0.4, eps_K=0.1, form="power", power=0.0), "power > 0"),
    (dict(eps_1=0.4, eps_K=0.1, form="concave", power=2.0), "only used with form='power'"),
    (dict(eps_1=0.4, eps_K=0.1, class_counts=[5]), "at least 2"),
    (dict(eps_1=0.4, eps_K=0.1, class_counts=[5, -1, 3]), "non-negative"),
])
def test_epsilons_validation(kwargs, match):
    kwargs.setdefault("class_counts", LT_COUNTS)
    with pytest.raises(BalpoeError, match=match) as info:
        label_aware_epsilons(**kwargs)
    assert "\n" not in str(info.value)
    with pytest.raises(BalpoeError):
        LabelAwareSmoothingLoss(**kwargs)


# ------------------------------------------------------------------ loss (Eq. 1)

@pytest.mark.parametrize("form,power", FORMS)
def test_loss_matches_reference_loop(form, power):
    gen = torch.Generator().manual_seed(2)
    K, B = len(LT_COUNTS), 16
    logits = 3 * torch.randn(B, K, generator=gen, dtype=torch.float64)
    target = torch.randint(0, K, (B,), generator=gen)
    loss_fn = LabelAwareSmoothingLoss(LT_COUNTS, 0.45, 0.05, form, power)
    eps = label_aware_epsilons(LT_COUNTS, 0.45, 0.05, form, power)
    got = loss_fn(logits, target)
    assert got.shape == ()
    assert got.item() == pytest.approx(reference_loss(logits, target, eps).item(), rel=1e-6)


def test_loss_zero_eps_is_cross_entropy():
    gen = torch.Generator().manual_seed(3)
    logits = 5 * torch.randn(64, 10, generator=gen)
    target = torch.randint(0, 10, (64,), generator=gen)
    loss_fn = LabelAwareSmoothingLoss(LT_COUNTS, 0.0, 0.0)
    assert torch.allclose(loss_fn(logits, target), F.cross_entropy(logits, target), atol=1e-6)


@pytest.mark.parametrize("eps", [0.05, 0.2, 0.5])
@pytest.mark.parametrize("form,seed", [("paper", 4), ("official", 22)])
def test_constant_eps_is_torch_label_smoothing(eps, form, seed):
    # torch spreads ls over all K classes: q_y = 1 - ls + ls/K, q_i = ls/K.  Eq. 1 (paper) puts
    # eps/(K-1) on each other class, so ls/K = eps/(K-1), i.e. ls = eps K/(K-1) (then q_y = 1 - eps as
    # well); the official target spreads eps over all K classes: exactly ls = eps.
    gen = torch.Generator().manual_seed(seed)
    K = len(LT_COUNTS)
    logits = 4 * torch.randn(32, K, generator=gen)
    target = torch.randint(0, K, (32,), generator=gen)
    ls = eps * K / (K - 1) if form == "paper" else eps
    loss_fn = LabelAwareSmoothingLoss(LT_COUNTS, eps, eps, "concave", target=form)
    assert torch.allclose(loss_fn(logits, target), F.cross_entropy(logits, target, label_smoothing=ls), atol=1e-6)


def test_loss_expert_logits_mean_over_experts():
    gen = torch.Generator().manual_seed(5)
    K = len(LT_COUNTS)
    logits = torch.randn(3, 8, K, generator=gen)
    target = torch.randint(0, K, (8,), generator=gen)
    loss_fn = LabelAwareSmoothingLoss(LT_COUNTS, 0.4, 0.1)
    per_expert = torch.stack([loss_fn(logits[e], target) for e in range(3)])
    assert torch.allclose(loss_fn(logits, target), per_expert.mean(), atol=1e-6)


def test_loss_soft_targets_linear_in_target():
    gen = torch.Generator().manual_seed(6)
    K = len(LT_COUNTS)
    logits = torch.randn(2, 12, K, generator=gen)
    ya, yb = torch.randint(0, K, (12,), generator=gen), torch.randint(0, K, (12,), generator=gen)
    loss_fn = LabelAwareSmoothingLoss(LT_COUNTS, 0.4, 0.1)
    one_hot = F.one_hot(ya, K).float()
    assert torch.allclose(loss_fn(logits, one_hot), loss_fn(logits, ya), atol=1e-6)
    lam = 0.3
    mixed = lam * one_hot + (1 - lam) * F.one_hot(yb, K).float()
    expect = lam * loss_fn(logits, ya) + (1 - lam) * loss_fn(logits, yb)
    assert torch.allclose(loss_fn(logits, mixed), expect, atol=1e-6)


def test_loss_optimum_is_eq2():
    # Eq. 2: the minimiser puts log((K-1)(1-eps_y)/eps_y) + c on the label and c elsewhere.
    K = len(LT_COUNTS)
    loss_fn = LabelAwareSmoothingLoss(LT_COUNTS, 0.4, 0.1)
    target = torch.arange(K)
    eps = loss_fn.epsilons.double()
    logits = torch.full((K, K), 1.7, dtype=torch.float64)
    logits[target, target] += torch.log((K - 1) * (1 - eps) / eps)
    logits.requires_grad_(True)
    loss_fn(logits, target).backward()
    assert logits.grad.abs().max().item() < 1e-6


def test_loss_gradient_flows_and_device_buffer():
    loss_fn = LabelAwareSmoothingLoss(LT_COUNTS, 0.4, 0.1)
    assert "epsilons" in dict(loss_fn.named_buffers())
    logits = torch.randn(4, len(LT_COUNTS), requires_grad=True)
    loss_fn(logits, torch.tensor([0, 3, 9, 9])).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # per-row gradient of -sum q log softmax is softmax - q: rows sum to zero
    assert torch.allclose(logits.grad.sum(1), torch.zeros(4), atol=1e-6)


# ------------------------------------------------------------------ official target (MiSLAS methods.py)

def official_closed_form(logits: torch.Tensor, target: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The official ``LabelAwareSmoothing.forward`` (dvlab-research/MiSLAS methods.py), in float64:
    ``(1 - eps_y) * NLL + eps_y * mean_k(-log p_k)``, mean over the batch."""
    logp = F.log_softmax(logits.double(), dim=-1)
    e = eps.double()[target]
    nll = -logp.gather(1, target[:, None]).squeeze(1)
    return ((1 - e) * nll + e * (-logp.mean(1))).mean()


@pytest.mark.parametrize("form,power", FORMS)
def test_official_target_matches_closed_form(form, power):
    gen = torch.Generator().manual_seed(21)
    K = len(LT_COUNTS)
    logits = 3 * torch.randn(64, K, generator=gen, dtype=torch.float64)
    target = torch.randint(0, K, (64,), generator=gen)
    loss_fn = LabelAwareSmoothingLoss(LT_COUNTS, 0.4, 0.1, form, power, target="official")
    eps = label_aware_epsilons(LT_COUNTS, 0.4, 0.1, form, power)
    got = loss_fn(logits, target)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(official_closed_form(logits, target, eps).item(), rel=1e-7)
    # the same loss as -sum_i q_i log p_i with q = (1 - eps_y) e_y + eps_y / K
    q = (1 - eps[target])[:, None] * F.one_hot(target, K).double() + (eps[target] / K)[:, None]
    assert torch.allclose(q.sum(1), torch.ones(64, dtype=torch.float64))
    explicit = -(q * F.log_softmax(logits, -1)).sum(1).mean()
    assert got.item() == pytest.approx(explicit.item(), rel=1e-7)  # eps is stored in float32


def test_paper_with_eps_is_official_with_eps_times_k_over_k_minus_1():
    gen = torch.Generator().manual_seed(23)
    K = len(LT_COUNTS)
    logits = 3 * torch.randn(40, K, generator=gen, dtype=torch.float64)
    target = torch.randint(0, K, (40,), generator=gen)
    paper = LabelAwareSmoothingLoss(LT_COUNTS, 0.3, 0.05)
    official = LabelAwareSmoothingLoss(LT_COUNTS, 0.3 * K / (K - 1), 0.05 * K / (K - 1), target="official")
    assert official.epsilons.double() == pytest.approx((paper.epsilons.double() * K / (K - 1)).tolist(), rel=1e-6)
    assert paper(logits, target).item() == pytest.approx(official(logits, target).item(), rel=1e-6)
    # with the same eps the official target smooths less: a different loss
    same = LabelAwareSmoothingLoss(LT_COUNTS, 0.3, 0.05, target="official")
    assert abs(same(logits, target).item() - paper(logits, target).item()) > 1e-3


def test_official_soft_targets_are_the_linear_extension():
    gen = torch.Generator().manual_seed(24)
    K = len(LT_COUNTS)
    logits = torch.randn(12, K, generator=gen, dtype=torch.float64)
    ya, yb = torch.randint(0, K, (12,), generator=gen), torch.randint(0, K, (12,), generator=gen)
    loss_fn = LabelAwareSmoothingLoss(LT_COUNTS, 0.4, 0.1, target="official")
    eps = loss_fn.epsilons
    one_hot = F.one_hot(ya, K).double()
    assert loss_fn(logits, one_hot).item() == pytest.approx(loss_fn(logits, ya).item(), rel=1e-12)
    # mixup: the official mixup_criterion, lam * loss(y_a) + (1 - lam) * loss(y_b)
    lam = 0.3
    mixed = lam * one_hot + (1 - lam) * F.one_hot(yb, K).double()
    expect = lam * official_closed_form(logits, ya, eps) + (1 - lam) * official_closed_form(logits, yb, eps)
    assert loss_fn(logits, mixed).item() == pytest.approx(expect.item(), rel=1e-6)
    # any soft target t: per row sum_y t_y loss(y)
    t = torch.softmax(torch.randn(12, K, generator=gen, dtype=torch.float64), -1)
    per_label = torch.stack([torch.stack([official_closed_form(logits[b:b + 1], torch.tensor([y]), eps)
                                          for y in range(K)]) for b in range(12)])  # [B, K]
    assert loss_fn(logits, t).item() == pytest.approx((t * per_label).sum(1).mean().item(), rel=1e-6)


def test_official_optimum_and_experts():
    # the minimiser of the official loss puts log((1 - eps_y + eps_y/K) / (eps_y/K)) + c on the label
    K = len(LT_COUNTS)
    loss_fn = LabelAwareSmoothingLoss(LT_COUNTS, 0.4, 0.1, target="official")
    eps = loss_fn.epsilons.double()
    target = torch.arange(K)
    logits = torch.full((K, K), -0.4, dtype=torch.float64)
    logits[target, target] += torch.log((1 - eps + eps / K) / (eps / K))
    logits.requires_grad_(True)
    loss_fn(logits, target).backward()
    assert logits.grad.abs().max().item() < 1e-6
    z = torch.randn(3, 8, K, generator=torch.Generator().manual_seed(25))
    y = torch.arange(8) % K
    assert torch.allclose(loss_fn(z, y), torch.stack([loss_fn(z[e], y) for e in range(3)]).mean(), atol=1e-6)
    assert "target='official'" in repr(loss_fn) and "target='paper'" in repr(LabelAwareSmoothingLoss(LT_COUNTS, 0, 0))


def test_target_validation():
    with pytest.raises(BalpoeError, match="target must be one of"):
        LabelAwareSmoothingLoss(LT_COUNTS, 0.4, 0.1, target="uniform")
