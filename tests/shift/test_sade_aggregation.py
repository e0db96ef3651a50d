"""SADE's test-time self-supervised aggregation (balpoe.shift.aggregation) on toy frozen experts.

The views are horizontal flips (``padding=0``): expert 0 pools each channel over the image, so its
logits are exactly flip-invariant; the other experts read pixels at fixed positions, so a flip
changes their predictions.  The cosine similarity of the two views' aggregated predictions is
then 1 exactly when all weight is on expert 0, and below 1 otherwise.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from balpoe.errors import BalpoeError
from balpoe.models.multi_expert import MultiExpertNet
from balpoe.shift.aggregation import (OFFICIAL_SGD, AggregationWeights, aggregate_logits, below_min_weight,
                                      learn_aggregation_weights, view_agreement)

C, H, K = 3, 6, 5
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
FLIP = {"padding": 0, "flip": True, "mean": MEAN, "std": STD}


def toy_model(num_experts: int = 3, seed: int = 0) -> MultiExpertNet:
    g = torch.Generator().manual_seed(seed)
    trunk = nn.BatchNorm2d(C)  # eval mode: a per-channel affine map, flip-equivariant
    trunk.running_mean.copy_(torch.randn(C, generator=g) * 0.1)
    trunk.running_var.copy_(torch.rand(C, generator=g) + 0.5)
    branches = [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())] + [nn.Flatten() for _ in range(num_experts - 1)]
    heads = [nn.Linear(C, K)] + [nn.Linear(C * H * H, K) for _ in range(num_experts - 1)]
    with torch.no_grad():
        for head, scale in zip(heads, [3.0] + [0.2] * (num_experts - 1)):  # logits of similar sizes, about 2
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * scale)
            head.bias.zero_()
    return MultiExpertNet(trunk, branches, heads)


def toy_images(n: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, C, H, H), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_weights_converge_to_the_view_invariant_expert():
    model = toy_model(3)
    result = learn_aggregation_weights(model, toy_images(), batch_size=16, lr=0.5, epochs=8, min_weight=None,
                                       **FLIP)
    assert result.epochs == 8 and not result.stopped_early
    assert float(result.weights[0]) > 0.98
    # the objective rises toward its maximum, 1 (all weight on the invariant expert)
    assert result.objective[-1] > result.objective[0] and result.objective[-1] > 0.98
    assert all(o <= 1 + 1e-6 for o in result.objective)


def test_weights_stay_on_the_simplex():
    result = learn_aggregation_weights(toy_model(3), toy_images(), batch_size=16, epochs=2, **FLIP)
    w = result.weights
    assert w.shape == (3,) and w.dtype == torch.float32
    assert bool((w >= 0).all()) and math.isclose(float(w.sum()), 1.0, abs_tol=1e-6)


def test_stops_after_an_epoch_in_which_a_weight_rounds_below_min_weight():
    result = learn_aggregation_weights(toy_model(2), toy_images(), batch_size=16, lr=0.5, epochs=40, **FLIP)
    assert result.stopped_early and result.epochs < 40
    assert round(float(result.weights[1]), 2) < 0.05
    assert result.as_dict() == {"weights": [float(w) for w in result.weights], "objective": result.objective,
                                "epochs": result.epochs, "stopped_early": True}


@pytest.mark.parametrize("weights, min_weight, stop", [
    ([0.047, 0.5, 0.453], 0.05, False),  # rounds to 0.05
    ([0.044, 0.5, 0.456], 0.05, True),
    ([0.0, 0.5, 0.5], None, False),
    ([0.0, 0.5, 0.5], 0, False),
])
def test_official_stopping_rule_rounds_to_two_decimals(weights, min_weight, stop):
    assert below_min_weight(torch.tensor(weights), min_weight) is stop


def test_objective_is_the_cosine_similarity_of_the_aggregated_predictions():
    g = torch.Generator().manual_seed(3)
    f0, f1 = torch.randn(3, 7, K, generator=g) * 2, torch.randn(3, 7, K, generator=g) * 2
    w = torch.tensor([0.2, 0.5, 0.3])

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    p0 = softmax(np.einsum("k,kbc->bc", w.double().numpy(), f0.double().numpy()))
    p1 = softmax(np.einsum("k,kbc->bc", w.double().numpy(), f1.double().numpy()))
    cos = (p0 * p1).sum(1) / (np.linalg.norm(p0, axis=1) * np.linalg.norm(p1, axis=1))
    assert float(view_agreement(f0, f1, w)) == pytest.approx(cos.mean(), abs=1e-6)
    assert float(view_agreement(f0, f0, w)) == pytest.approx(1.0, abs=1e-6)


def test_given_views_one_step_of_nesterov_sgd_on_the_negative_objective():
    """With given views, epoch 1's objective is measured at uniform weights and the logits theta take
    one official SGD step: theta - lr (1 + momentum) (grad(-objective) + weight_decay theta)."""
    model = toy_model(3)
    g = torch.Generator().manual_seed(4)
    x0, x1 = torch.randn(10, C, H, H, generator=g), torch.randn(10, C, H, H, generator=g)
    result = learn_aggregation_weights(model, [(x0, x1)], epochs=1, min_weight=None)
    with torch.no_grad():
        f0, f1 = model.eval()(x0), model(x1)
    theta = torch.full((3,), 1 / 3, requires_grad=True)
    objective = view_agreement(f0, f1, torch.softmax(theta, 0))
    (grad,) = torch.autograd.grad(-objective, theta)
    lr, momentum, wd = 0.1, 0.9, 5e-4
    expected = torch.softmax(theta.detach() - lr * (1 + momentum) * (grad + wd * theta.detach()), 0)
    assert result.objective == [pytest.approx(float(objective.detach()), abs=1e-6)]
    torch.testing.assert_close(result.weights, expected, atol=1e-6, rtol=0)


def test_aggregate_logits_is_the_weighted_sum_of_expert_logits():
    f = torch.randn(3, 4, K, generator=torch.Generator().manual_seed(5))
    w = torch.tensor([0.1, 0.6, 0.3])
    torch.testing.assert_close(aggregate_logits(f, w), 0.1 * f[0] + 0.6 * f[1] + 0.3 * f[2])
    torch.testing.assert_close(AggregationWeights(torch.full((3,), 1 / 3)).apply(f), MultiExpertNet.ensemble(f))


def test_model_parameters_buffers_and_mode_are_unchanged():
    model = toy_model(3)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    learn_aggregation_weights(model, toy_images(), batch_size=16, lr=2.0, epochs=2, **FLIP)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running statistics included
    assert model.training and model.trunk.training
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_same_seed_same_result_other_seed_other_views():
    runs = [learn_aggregation_weights(toy_model(3), toy_images(), batch_size=16, epochs=2, seed=s, **FLIP)
            for s in (7, 7, 8)]
    assert runs[0].objective == runs[1].objective and torch.equal(runs[0].weights, runs[1].weights)
    assert runs[0].objective != runs[2].objective


def test_uint8_batches_augmented_and_a_one_shot_iterator_refused():
    images = toy_images()
    batches = [images[:20], images[20:]]
    result = learn_aggregation_weights(toy_model(3), batches, epochs=2, **FLIP)
    assert result.epochs == 2
    with pytest.raises(BalpoeError, match=r"^SADE aggregation: no images in epoch 2 \(pass a re-iterable"):
        learn_aggregation_weights(toy_model(3), iter(batches), epochs=2, **FLIP)


def test_official_constants():
    assert OFFICIAL_SGD == {"cifar100": (0.1, 5e-4), "imagenet_lt": (0.025, 5e-4), "places_lt": (0.01, 4e-4),
                            "inat": (0.2, 2e-4)}


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": 0}, "SADE aggregation epochs must be an integer >= 1, got 0"),
    ({"batch_size": True}, "SADE aggregation batch size must be an integer >= 1, got True"),
    ({"lr": 0.0}, "SADE aggregation lr must be > 0, got 0.0"),
    ({"lr": float("nan")}, "SADE aggregation lr must be a finite number >= 0, got nan"),
    ({"momentum": 1.0}, "SADE aggregation momentum must be a finite number in [0, 1), got 1.0"),
    ({"momentum": 0.0}, "SADE aggregation: Nesterov momentum needs momentum > 0"),
    ({"weight_decay": -1e-4}, "SADE aggregation weight decay must be a finite number >= 0, got -0.0001"),
    ({"min_weight": 2}, "SADE aggregation min_weight must be a finite number in [0, 1], got 2"),
    ({"seed": -1}, "SADE aggregation seed must be an integer in [0, 2**32), got -1"),
    ({"mean": None}, "SADE aggregation needs mean and std to normalise uint8 images"),
    ({"std": (0.2, 0.2)}, "SADE aggregation mean and std must be 3 values (std > 0), got "),
    ({"images": toy_images().float()}, "SADE aggregation images must be a non-empty uint8 tensor [N, C, H, W], "
                                       "got torch.float32 [48, 3, 6, 6]"),
    ({"images": 3}, "SADE aggregation images must be a uint8 tensor [N, C, H, W] or an iterable of image batches, "
                    "got int"),
    ({"images": [torch.zeros(2, C, H, H)]}, "SADE aggregation batch 0: expected a uint8 image batch [B, C, H, W] or "
                                            "a pair of normalised float views [B, C, H, W]"),
    ({"model": toy_model(1)}, "SADE aggregation needs a model with at least 2 experts, got 1"),
    ({"model": nn.Flatten()}, "SADE aggregation needs per-expert logits [E, B, C] from the model, got shape "
                              "[32, 108] for a batch of 32"),
])
def test_bad_arguments_are_one_line_errors(kwargs, message):
    args = {"model": toy_model(3), "images": toy_images(), "batch_size": 16, **FLIP, **kwargs}
    with pytest.raises(BalpoeError) as err:
        learn_aggregation_weights(args.pop("model"), args.pop("images"), **args)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("weights, message", [
    (torch.tensor([0.5, 0.5]), "aggregation weights must be a vector of 3 (one per expert), got shape [2]"),
    (torch.tensor([0.5, 0.7, -0.2]), "aggregation weights must be non-negative and sum to 1, got "),
    (torch.tensor([1.0, 1.0, 1.0]), "aggregation weights must be non-negative and sum to 1, got [1.0, 1.0, 1.0]"),
])
def test_aggregate_logits_refuses_weights_off_the_simplex(weights, message):
    with pytest.raises(BalpoeError) as err:
        aggregate_logits(torch.zeros(3, 4, K), weights)
    assert str(err.value).startswith(message)
