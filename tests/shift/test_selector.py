"""TauSelector on a synthetic *calibrated* model.

Features x | y ~ N(mu_y, I) with |mu_y| equal for every class, so log p(x|y) = x . mu_y + c(x) and
the balanced Bayes posterior is exactly softmax(x . mu): those logits play the role of the
balanced ensemble logits f̄ (mean tau = 1).  Training prior: CIFAR-100-LT IR100.
"""

import math

import numpy as np
import pytest
import torch

from balpoe.data.lt import lt_class_counts
from balpoe.errors import BalpoeError
from balpoe.evaluate.build import check_source
from balpoe.losses.priors import empirical_prior, log_prior
from balpoe.shift.estimators import best_lambda, em_prior, fit_beta_lambda, mle_lambda, prior_family, shrink_class_offsets
from balpoe.serve.predict import predict
from balpoe.shift.build import ShiftOptions, evaluate_shift
from balpoe.shift.selector import ADAPT_MODES, ESTIMATORS, SelectorResult, TauSelector, get_adapt_mode
from balpoe.shift.distributions import TEST_DISTRIBUTIONS, dirichlet_prior, distribution_counts, distribution_prior

K = 100
COUNTS = torch.tensor(lt_class_counts(500, K, 100))
V = log_prior(COUNTS, torch.float64)
# optimal tau' of the SADE CIFAR-100 priors for IR100 (computed for the continuous family pi^lambda)
CLOSED_FORM_TAU = dict(zip(TEST_DISTRIBUTIONS, [0.151, 0.301, 0.5, 0.651, 0.849, 1.0, 1.151, 1.349, 1.5, 1.699, 1.849]))


class GaussianModel:
    def __init__(self, dim: int = 32, radius: float = 2.6, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        mu = torch.randn(K, dim, generator=g, dtype=torch.float64)
        self.mu = mu / mu.norm(dim=1, keepdim=True) * radius  # ~49% balanced accuracy

    def sample(self, per_class, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        y = torch.repeat_interleave(torch.arange(K), torch.as_tensor(per_class))
        x = self.mu[y] + torch.randn(len(y), self.mu.shape[1], generator=g, dtype=torch.float64)
        return (x @ self.mu.T).float(), y

    def sample_prior(self, prior: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(10_000 + seed)
        y = torch.multinomial(prior, n, replacement=True, generator=g)
        return self.sample(torch.bincount(y, minlength=K), seed)


@pytest.fixture(scope="module")
def model() -> GaussianModel:
    return GaussianModel()


@pytest.fixture(scope="module")
def selector(model) -> TauSelector:
    """TS + p0 fitted on a balanced labelled source set of 50 images per class."""
    return TauSelector(COUNTS).fit_source(*model.sample([50] * K, seed=1))


def acc(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).double().mean().item() * 100


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p.double() - q.double()).abs().sum())


# ----------------------------------------------------------------------------- known prior


def test_known_prior_is_exactly_logits_plus_log_q(model):
    logits, _ = model.sample([3] * K, seed=2)
    q = dirichlet_prior(torch.ones(K), 20.0, seed=0)
    q[:5] = 0.0  # floored at 1e-8
    q = q / q.sum()
    res = TauSelector(COUNTS).known(logits, q)
    assert isinstance(res, SelectorResult) and res.mode == "known"
    assert res.logits.dtype == logits.dtype
    assert torch.equal(res.logits, logits + torch.log((q / q.sum()).clamp_min(1e-8)).to(logits.dtype))
    assert torch.equal(res.prior, q / q.sum())


@pytest.mark.parametrize("lam", [0.849, 0.5, 0.0, -0.5, -1.7])
def test_known_tau_of_family_members_is_exact(lam):
    res = TauSelector(COUNTS).known(torch.zeros(1, K), prior_family(V, lam))
    assert res.tau == pytest.approx(1 - lam, abs=1e-9)
    assert res.info["kl_to_family"] == pytest.approx(0.0, abs=1e-12)


def test_known_tau_of_cifar_test_priors_matches_the_closed_form():
    sel = TauSelector(COUNTS)
    for name, tau in CLOSED_FORM_TAU.items():
        # integer truncation of the tail counts moves F50/B50 a little off the continuous family
        tol = 0.025 if name in ("forward50", "backward50") else 0.01
        assert sel.best_tau(distribution_prior(name, COUNTS)) == pytest.approx(tau, abs=tol), name


def test_best_lambda_minimises_kl():
    q = dirichlet_prior(prior_family(V, 0.3), 300.0, seed=1)
    lam = best_lambda(q, V)

    def kl(x):
        return float((q * (q.log() - prior_family(V, x).log())).sum())

    assert kl(lam) <= min(kl(lam - 1e-3), kl(lam + 1e-3))
    assert best_lambda(q, torch.zeros(K)) == 0.0  # balanced training set: nothing to fit


@pytest.mark.parametrize("kwargs,message", [
    ({"calibration": "platt"}, "calibration must be one of bcts, ts, none; got 'platt'"),
    ({"source": "val"}, "calibration source must be one of auto, holdout, train; got 'val'"),
    ({"estimator": "2d"}, "estimator must be one of 1d, em, auto; got '2d'"),
    ({"estimator": ["1d"]}, "estimator must be one of 1d, em, auto; got ['1d']"),
])
def test_option_names_are_one_check_for_every_entry_point(kwargs, message, tmp_path):
    """The calibration, calibration-source and estimator names: the same one-line message from
    evaluate_shift, predict, check_source and TauSelector, before any file is read."""
    missing = tmp_path / "missing.pt"
    calls = [lambda: evaluate_shift(missing, ShiftOptions(**kwargs))]
    if "source" in kwargs:
        calls.append(lambda: check_source(None, kwargs["source"]))
    else:
        calls.append(lambda: predict(missing, [tmp_path], **kwargs))
    if "calibration" in kwargs or "estimator" in kwargs:
        calls.append(lambda: TauSelector(COUNTS, **kwargs))
    for call in calls:
        with pytest.raises(BalpoeError) as e:
            call()
        assert str(e.value) == message


def test_bad_inputs_raise_one_line_errors(model):
    sel = TauSelector(COUNTS)
    logits, labels = model.sample([1] * K, seed=3)
    for bad in (torch.ones(K - 1), -torch.ones(K), torch.full((K,), float("nan")), torch.zeros(K)):
        with pytest.raises(BalpoeError):
            sel.known(logits, bad)
    with pytest.raises(BalpoeError, match="fit_source"):
        sel.unlabelled(logits)
    with pytest.raises(BalpoeError, match="adaptation mode must be one of"):
        get_adapt_mode("guess")
    with pytest.raises(BalpoeError):
        sel.labelled(logits, logits[:, :10], labels)
    with pytest.raises(BalpoeError):
        sel.fit_source(logits, labels[:-1])
    with pytest.raises(BalpoeError):
        TauSelector(COUNTS, calibration="platt")
    with pytest.raises(BalpoeError):
        TauSelector([-1, 2, 3])
    assert ADAPT_MODES["none"].run(sel, logits, labels)[0].logits is logits


# ----------------------------------------------------------------------------- estimators


def test_mle_lambda_matches_brute_force(model):
    logits, _ = model.sample(distribution_counts("backward5", 30, K), seed=4)
    log_ratio = torch.log_softmax(logits.double(), 1) + math.log(K)  # p0 uniform
    def brute_force(grid):  # explicit formula, all grid points at once: [G, N, K]
        gv = grid[:, None] * V[None, :]
        ll = torch.logsumexp(log_ratio[None] + gv[:, None, :], 2).sum(1) - len(logits) * torch.logsumexp(gv, 1)
        return float(grid[ll.argmax()])

    coarse = brute_force(torch.linspace(-2, 2, 81, dtype=torch.float64))  # step 0.05
    fine = brute_force(torch.linspace(coarse - 0.05, coarse + 0.05, 101, dtype=torch.float64))  # step 0.001
    assert mle_lambda(log_ratio, V) == pytest.approx(fine, abs=1e-3)
    assert fine == pytest.approx(-math.log(5) / math.log(100), abs=0.15)  # backward-5: lambda = -0.35


def test_em_without_pseudo_counts_is_saerens(model):
    logits, _ = model.sample(distribution_counts("forward5", 30, K), seed=5)
    post = torch.softmax(logits.double(), 1)
    p0 = torch.full((K,), 1.0 / K, dtype=torch.float64)  # the model's (balanced) source prior
    q = p0.clone()  # plain Saerens et al. (2002) loop in probability space
    for _ in range(30):
        w = post * (q / p0)
        q = (w / w.sum(1, keepdim=True)).mean(0)
    ours, iters = em_prior(torch.log(post) - torch.log(p0), p0, torch.zeros(K), tol=0.0, max_iter=30)
    assert iters == 30 and torch.allclose(ours, q, atol=1e-12)


def test_shrink_class_offsets():
    g = torch.Generator().manual_seed(0)
    var = torch.full((K,), 0.01, dtype=torch.float64)
    noise = torch.randn(K, generator=g, dtype=torch.float64) * 0.1
    shrunk, signal = shrink_class_offsets(noise, var, V)  # pure noise: (almost) flattened
    assert signal < 0.005 and float(shrunk.std()) < 0.3 * float(noise.std())
    real = torch.randn(K, generator=g, dtype=torch.float64) * 0.5 + 0.3 * V
    shrunk, signal = shrink_class_offsets(real + noise, var, V)
    assert signal > 0.1 and float((shrunk - real).std()) < float(noise.std())


# ----------------------------------------------------------------------------- unlabelled target


def test_unlabelled_recovers_a_forward10_like_prior(model, selector):
    q = prior_family(V, 0.5)  # forward-10-like: tau' = 0.5
    logits, labels = model.sample_prior(q, 100 * K, seed=6)
    res = selector.unlabelled(logits)
    assert res.mode == "unlabelled" and res.info["estimator"] == "em"
    assert res.tau == pytest.approx(0.5, abs=0.05)
    assert tv(res.prior, empirical_prior(labels, K)) < 0.06  # TV(uniform, q) = 0.27
    oracle = acc(logits.double() + torch.log(empirical_prior(labels, K)), labels)
    assert acc(res.logits, labels) > acc(logits, labels) + 0.8 * (oracle - acc(logits, labels))


def test_unlabelled_small_target_uses_the_1d_fit(model, selector):
    q = prior_family(V, 0.5)
    logits, labels = model.sample_prior(q, 10 * K, seed=7)  # N/K = 10 < 20
    res = selector.unlabelled(logits)
    assert res.info["estimator"] == "1d"
    assert res.tau == pytest.approx(0.5, abs=0.1)
    assert torch.allclose(res.prior, prior_family(V, 1 - res.tau))
    assert acc(res.logits, labels) > acc(logits, labels) + 1.0


def test_each_estimator_runs_em_from_its_own_number_of_images_per_class(model):
    logits, _ = model.sample_prior(prior_family(V, 0.5), 20 * K, seed=9)        # N/K = 20: auto's boundary
    chosen = {name: TauSelector(COUNTS, calibration="none", estimator=name).unlabelled(logits).info["estimator"]
              for name in ESTIMATORS}
    assert chosen == {"1d": "1d", "em": "em", "auto": "em"}
    assert TauSelector(COUNTS, calibration="none").unlabelled(logits[:-1]).info["estimator"] == "1d"   # default auto
    with pytest.raises(BalpoeError, match=r"^estimator must be one of 1d, em, auto; got 'mle'$"):
        TauSelector(COUNTS, estimator="mle")


def test_unlabelled_recovers_a_dirichlet_prior(model, selector):
    q = dirichlet_prior(prior_family(V, 0.5), 10.0 * K, seed=2)  # off the pi^lambda family
    logits, labels = model.sample_prior(q, 100 * K, seed=8)
    res = selector.unlabelled(logits)
    q_emp = empirical_prior(labels, K)
    assert res.info["estimator"] == "em"
    assert tv(res.prior, q_emp) < 0.08
    assert tv(res.prior, q_emp) < 0.6 * tv(res.info["prior_1d"], q_emp)  # EM beats the 1-D family
    assert acc(res.logits, labels) > acc(logits, labels) + 2.0


@pytest.mark.parametrize("source_seed,per_class", [(11, 100), (12, 25), (13, 10)])
def test_unlabelled_costs_at_most_half_a_point_on_a_uniform_target(model, source_seed, per_class):
    # deliberately small source set (20 per class): p0 carries ~10% noise per class
    sel = TauSelector(COUNTS).fit_source(*model.sample([20] * K, seed=source_seed))
    logits, labels = model.sample([per_class] * K, seed=100 + source_seed)
    res = sel.unlabelled(logits)
    assert acc(res.logits, labels) >= acc(logits, labels) - 0.5
    assert res.tau == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize("calibration", ["ts", "bcts"])
def test_unlabelled_with_a_long_tailed_source(model, calibration):
    """Source = a holdout of the long-tailed training set (source_prior='train': scored with
    f̄/T + b + log pi), over-confident logits (true T = 2)."""
    logits, labels = model.sample(torch.round(COUNTS.double() / 2).long(), seed=9)  # 250 .. 2 per class
    sel = TauSelector(COUNTS, calibration=calibration).fit_source(logits * 2.0, labels, source_prior="train")
    assert sel.temperature == pytest.approx(2.0, rel=0.05)
    assert tv(sel.p0, torch.full((K,), 1.0 / K)) < 0.05  # the balanced head's implied prior
    tgt, y = model.sample(distribution_counts("backward25", 100, K), seed=10)
    res = sel.unlabelled(tgt * 2.0)
    assert res.temperature == sel.temperature
    assert res.tau == pytest.approx(CLOSED_FORM_TAU["backward25"], abs=0.1)
    oracle = acc(tgt.double() + torch.log(empirical_prior(y, K)), y)
    assert acc(res.logits, y) > acc(tgt, y) + 0.8 * (oracle - acc(tgt, y))


# ----------------------------------------------------------------------------- labelled target


@pytest.mark.parametrize("true_t,true_tau", [(2.0, 0.5), (0.7, 1.5)])
def test_labelled_recovers_temperature_and_tau(model, true_t, true_tau):
    q = prior_family(V, 1 - true_tau)
    logits, labels = model.sample_prior(q, 20 * K, seed=11)
    distorted = logits * true_t  # calibrated logits are distorted / T
    test_logits, test_labels = model.sample_prior(q, 20 * K, seed=12)
    res = TauSelector(COUNTS).labelled(test_logits * true_t, distorted, labels)
    assert res.mode == "labelled"
    assert res.temperature == pytest.approx(true_t, rel=0.05)
    assert res.tau == pytest.approx(true_tau, abs=0.05)
    assert torch.allclose(res.logits, test_logits * true_t / res.temperature + (1 - res.tau) * V.float(), atol=1e-4)
    assert acc(res.logits, test_labels) > acc(test_logits, test_labels)


def test_labelled_fit_is_the_global_optimum(model):
    logits, labels = model.sample_prior(prior_family(V, -0.4), 3 * K, seed=13)
    beta, lam, _ = fit_beta_lambda(logits, labels, V, l2=0.0)
    z = logits.double()

    def nll(b, la):
        s = b * z + la * V
        return float(torch.logsumexp(s, 1).sum() - s[torch.arange(len(labels)), labels].sum())

    best = nll(beta, lam)
    for db in (-0.05, 0.0, 0.05):
        for dl in (-0.05, 0.0, 0.05):
            assert best <= nll(beta + db, lam + dl) + 1e-9
    # a tiny separable set stays finite thanks to the default ridge
    beta, lam, _ = fit_beta_lambda(z[:2] * 0 + torch.eye(K)[:2].double() * 5, torch.tensor([0, 1]), V)
    assert np.isfinite(beta) and np.isfinite(lam)
