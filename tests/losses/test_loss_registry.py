"""The loss registry: every registered loss builds from a recipe's ``loss`` section and trains on
labels and on soft (mixup) targets; ``loss.*`` keys that do not apply to ``loss.name`` are refused;
each loss's ``lambda_m``; the recipe rules of ldam / ride / sade; RIDE's reduced-width experts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from balpoe.errors import BalpoeError
from balpoe.evaluate.build import ensemble_prior
from balpoe.losses import (BalancedSoftmaxLoss, BalPoELoss, ClassBalancedLoss, CrossEntropyLoss, FocalLoss, LDAMLoss,
                           RIDELoss, SADELoss)
from balpoe.losses.build import LOSSES, build_criterion, check_loss, model_prior_exponent
from balpoe.models.build import build_model
from balpoe.recipe import LossConfig, Recipe, load_recipe, recipe_from_dict

COUNTS = torch.tensor([500, 200, 80, 30, 12, 5])
BASELINES = ["ce", "focal", "class_balanced", "ldam", "balanced_softmax", "ride", "sade"]


def _recipe(loss: dict, model: dict | None = None, **top) -> Recipe:
    return recipe_from_dict({"loss": loss, "model": {"num_experts": 3, **(model or {})}, **top})


def test_every_baseline_is_registered():
    assert set(BASELINES) | {"logit_adjusted"} == set(LOSSES)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_each_loss_builds_and_gives_a_finite_scalar_on_labels_and_soft_targets(name):
    r = _recipe({"name": name})
    check_loss(r)
    criterion = build_criterion(r.loss, 3, COUNTS)
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(3, 8, 6, generator=g) * 3).requires_grad_()
    y = torch.randint(0, 6, (8,), generator=g)
    soft = torch.softmax(torch.randn(8, 6, generator=g), -1)
    for target in (y, soft):
        loss = criterion(z, target)
        assert loss.dim() == 0 and torch.isfinite(loss)
        (grad,) = torch.autograd.grad(loss, z)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # a one-hot soft target is the label (every loss here is linear in the target)
    onehot = torch.nn.functional.one_hot(y, 6).double()
    assert criterion(z.double(), onehot).item() == pytest.approx(criterion(z.double(), y).item(), rel=1e-9)


@pytest.mark.parametrize("loss,cls,attrs", [
    ({"name": "ce"}, CrossEntropyLoss, {"gamma": 0.0}),
    ({"name": "focal"}, FocalLoss, {"gamma": 2.0, "form": "paper", "beta": 0.0}),
    ({"name": "focal", "gamma": 1, "focal_form": "ldam_drw"}, FocalLoss, {"gamma": 1.0, "form": "ldam_drw"}),
    ({"name": "class_balanced"}, ClassBalancedLoss,
     {"beta": 0.9999, "gamma": 0.0, "drw_epoch": None, "reduction": "mean"}),
    ({"name": "class_balanced", "base": "focal", "beta": 0.999, "drw_epoch": 160, "reduction": "weighted_mean"},
     ClassBalancedLoss, {"beta": 0.999, "gamma": 1.0, "drw_epoch": 160, "reduction": "weighted_mean"}),
    ({"name": "class_balanced", "base": "focal", "gamma": 0.5}, ClassBalancedLoss, {"gamma": 0.5}),
    ({"name": "ldam"}, LDAMLoss, {"max_m": 0.5, "s": 30.0, "beta": 0.9999, "drw_epoch": 160,
                                  "reduction": "weighted_mean"}),
    ({"name": "ldam", "max_m": 0.3, "drw_epoch": 8, "beta": 0}, LDAMLoss, {"max_m": 0.3, "drw_epoch": 8, "beta": 0}),
    ({"name": "balanced_softmax"}, BalancedSoftmaxLoss, {}),
    ({"name": "ride"}, RIDELoss, {"diversity_factor": -0.2, "diversity_temperature": 1.0, "reweight_factor": 0.05}),
    ({"name": "ride", "diversity_factor": -0.45, "drw_epoch": 9}, RIDELoss, {"diversity_factor": -0.45}),
    ({"name": "sade"}, SADELoss, {"tau": 2.0}),
    ({"name": "sade", "sade_tau": 1}, SADELoss, {"tau": 1.0}),
])
def test_the_loss_keys_reach_the_loss_and_null_is_the_official_default(loss, cls, attrs):
    criterion = build_criterion(_recipe(loss).loss, 3, COUNTS)
    assert type(criterion) is cls
    for key, value in attrs.items():
        assert getattr(criterion, key) == value, key
    if cls is RIDELoss:
        assert criterion.base.drw_epoch == loss.get("drw_epoch", 160) and criterion.base.s == 30.0


def test_balanced_softmax_is_the_logit_adjusted_loss_with_tau_one():
    z, y = torch.randn(3, 8, 6, dtype=torch.float64), torch.randint(0, 6, (8,))
    bs = build_criterion(_recipe({"name": "balanced_softmax"}).loss, 3, COUNTS)
    assert bs(z, y).item() == pytest.approx(BalPoELoss(COUNTS, [1.0] * 3)(z, y).item(), rel=1e-12)


@pytest.mark.parametrize("loss,message", [
    ({"name": "ce", "gamma": 2}, "recipe key 'loss.gamma' does not apply to loss.name 'ce'"),
    ({"name": "focal", "beta": 0.99}, "recipe key 'loss.beta' does not apply to loss.name 'focal'"),
    ({"name": "ldam", "sade_tau": 1}, "recipe key 'loss.sade_tau' does not apply to loss.name 'ldam'"),
    ({"name": "sade", "tau": [0, 1, 2]}, "recipe key 'loss.tau' does not apply to loss.name 'sade'"),
    ({"name": "ride", "tau_max": 3}, "recipe key 'loss.tau_max' does not apply to loss.name 'ride'"),
    ({"name": "balanced_softmax", "drw_epoch": 5}, "recipe key 'loss.drw_epoch' does not apply to loss.name "
                                                    "'balanced_softmax'"),
    ({"name": "logit_adjusted", "max_m": 0.5}, "recipe key 'loss.max_m' does not apply to loss.name 'logit_adjusted'"),
    ({"name": "class_balanced", "gamma": 2}, "recipe key 'loss.gamma' does not apply to loss.base 'ce' "
                                             "(set loss.base: focal)"),
    ({"name": "class_balanced", "focal_form": "paper"}, "recipe key 'loss.focal_form' does not apply to loss.base 'ce'"),
    ({"name": "class_balanced", "beta": 1}, "recipe key 'loss.beta' must be < 1, got 1"),
])
def test_keys_that_do_not_apply_are_refused_in_one_line(loss, message):
    r = _recipe(loss)
    for call in (lambda: check_loss(r), lambda: build_criterion(r.loss, 3, COUNTS)):
        with pytest.raises(BalpoeError) as e:
            call()
        assert message in str(e.value) and "\n" not in str(e.value)


def test_keys_left_at_their_default_are_accepted_for_every_loss():
    # the tau keys written at their defaults, the method keys null
    for name in LOSSES:
        check_loss(_recipe({"name": name, "tau_min": 0.0, "tau_max": 2.0, "tau_spacing": "limits", "gamma": None}))


@pytest.mark.parametrize("name", ["ldam", "ride"])
def test_ldam_and_ride_need_cosine_heads_of_scale_s(name):
    check_loss(_recipe({"name": name, "s": 16}, {"scale": 16}))
    with pytest.raises(BalpoeError, match=rf"^recipe key 'model.head' must be cosine for loss.name '{name}' \(its "
                                          r"margins act on scaled cosine logits\), got 'linear'$"):
        check_loss(_recipe({"name": name}, {"head": "linear"}))
    with pytest.raises(BalpoeError, match=rf"^recipe key 'loss.s' \(30\) must equal model.scale \(16\) for loss.name "
                                          rf"'{name}': "):
        check_loss(_recipe({"name": name}, {"scale": 16}))


def test_sade_needs_three_experts():
    with pytest.raises(BalpoeError, match=r"^recipe key 'model.num_experts' must be 3 for loss.name 'sade' \(forward, "
                                          r"uniform and backward experts\), got 2$"):
        check_loss(_recipe({"name": "sade"}, {"num_experts": 2}))


def test_stage2_recipes_are_not_checked_against_the_stage1_loss_keys():
    check_loss(_recipe({"name": "ce", "tau": [0, 1, 2]}, stage=2, stage2={"init_checkpoint": "x.pt"}))


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("sampler", ["instance", "class_balanced"])
def test_baselines_lambda_m_is_the_prior_their_logits_keep(name, sampler):
    # CE and focal logits estimate p(y|x) under the prior of the stream they saw: pi_train, or the
    # uniform prior of a class-balanced sampler; the re-balancing losses' logits are balanced
    want = 1.0 if name in ("ce", "focal") and sampler == "instance" else 0.0
    r = _recipe({"name": name}, data={"sampler": sampler})
    assert ensemble_prior(r)[1] == want
    assert model_prior_exponent([0.0, 1.0, 2.0], sampler, None, name) == want


def test_logit_adjusted_lambda_m_comes_from_its_taus():
    assert ensemble_prior(_recipe({"tau": [0, 1, 2]}))[1] == 0.0
    assert ensemble_prior(_recipe({"tau": [0, 0, 0]}))[1] == 1.0                       # plain CE experts
    assert ensemble_prior(_recipe({"tau": [0, 0, 0]}, data={"sampler": "class_balanced"}))[1] == 0.0
    assert ensemble_prior(_recipe({"tau": [2, 2, 2]}))[1] == -1.0
    assert model_prior_exponent([0.5], "instance") == 0.5                                   # the default name
    # stage 2 keeps its offsets whatever the stage-1 loss was
    s2 = _recipe({"tau": [0, 1, 2]}, stage=2, stage2={"init_checkpoint": "x.pt", "expert_adjust": "none"})
    assert ensemble_prior(s2)[1] == 1.0


def test_unset_loss_keys_stay_out_of_the_resolved_recipe():
    r = _recipe({"name": "ldam", "drw_epoch": 8})
    loss = r.to_dict()["loss"]
    assert loss == {"name": "ldam", "tau": None, "tau_min": 0.0, "tau_max": 2.0, "tau_spacing": "limits",
                    "drw_epoch": 8}
    assert recipe_from_dict(r.to_dict()) == r
    assert "reduce_dimension" not in r.to_dict()["model"]
    assert set(vars(LossConfig())) - set(Recipe().to_dict()["loss"]) == {
        "gamma", "focal_form", "base", "beta", "reduction", "drw_epoch", "max_m", "s", "diversity_factor",
        "diversity_temperature", "reweight_factor", "sade_tau"}


def test_reduce_dimension_gives_ride_expert_widths():
    """RIDE's ResNet-32 with reduce_dimension: shared stem + layer1 at 16 channels, each expert's
    layer2 / layer3 at 24 / 48 (official ``ResNet_s``), 48-dimensional heads."""
    r = _recipe({"name": "ride"}, {"backbone": "resnet32_cifar", "split": "layer1", "reduce_dimension": True})
    assert r.to_dict()["model"]["reduce_dimension"] is True
    model = build_model(r.model, 100, 3)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["trunk.conv1.weight"] == (16, 3, 3, 3) and shapes["trunk.layer1.4.conv2.weight"] == (16, 16, 3, 3)
    for k in range(3):
        assert shapes[f"branches.{k}.layer2.0.conv1.weight"] == (24, 16, 3, 3)
        assert shapes[f"branches.{k}.layer2.4.conv2.weight"] == (24, 24, 3, 3)
        assert shapes[f"branches.{k}.layer3.0.conv1.weight"] == (48, 24, 3, 3)
        assert shapes[f"branches.{k}.layer3.4.conv2.weight"] == (48, 48, 3, 3)
        assert model.heads[k].in_features == 48
    assert model(torch.zeros(2, 3, 32, 32)).shape == (3, 2, 100)
    full = build_model(_recipe({}, {"backbone": "resnet32_cifar", "split": "layer1"}).model, 100, 3)
    assert dict(full.named_parameters())["branches.0.layer3.4.conv2.weight"].shape == (64, 64, 3, 3)


@pytest.mark.parametrize("model,message", [
    ({"backbone": "small_cnn", "split": "layer1"}, "recipe key 'model.reduce_dimension' applies to the CIFAR ResNets "
                                                   "(resnet32_cifar, ...), not model.backbone 'small_cnn'"),
    ({"backbone": "resnet32_cifar", "split": "head"}, "recipe key 'model.reduce_dimension' needs model.split layer1 "
                                                      "(each expert owns the reduced layer2 and layer3), got 'head'"),
    ({"backbone": "resnet32_cifar", "split": "layer1", "kwargs": {"widths": [16, 32, 64]}},
     "recipe keys 'model.reduce_dimension' and 'model.kwargs' widths both set the widths: set one"),
])
def test_reduce_dimension_refuses_what_it_cannot_reduce(model, message):
    with pytest.raises(BalpoeError) as e:
        build_model(_recipe({}, {**model, "reduce_dimension": True}).model, 10, 3)
    assert str(e.value) == message


METHOD_RECIPES = sorted(p for d in ("ce", "focal", "class_balanced", "ldam_drw", "balanced_softmax", "ride", "sade")
                        for p in (Path(__file__).resolve().parents[2] / "recipes" / d).glob("*.yaml"))


def test_every_method_ships_the_demo_and_six_cifar_recipes():
    names = {(p.parent.name, p.name) for p in METHOD_RECIPES}
    assert len(METHOD_RECIPES) == 7 * 7
    for d in ("ce", "focal", "class_balanced", "ldam_drw", "balanced_softmax", "ride", "sade"):
        assert (d, "fashion_mnist_lt_ir100_cpu_demo.yaml") in names
        assert all((d, f"cifar{n}_lt_ir{ir}.yaml") in names for n in (10, 100) for ir in (10, 50, 100))


@pytest.mark.parametrize("path", METHOD_RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_method_recipes_build_and_train_a_step_at_tiny_size(path):
    """Each method recipe passes the loss rules, builds its network and its loss, and gives a finite
    loss on a two-image batch (32 x 32; the class counts of an imbalance-ratio-100 profile)."""
    r = load_recipe(path)
    check_loss(r)
    num_classes, in_chans = (100, 3) if r.data.dataset == "cifar100" else (10, 3 if r.data.dataset == "cifar10" else 1)
    counts = torch.tensor([max(1, round(500 * 0.01 ** (i / (num_classes - 1)))) for i in range(num_classes)])
    model = build_model(r.model, num_classes, in_chans, pretrained=False)
    criterion = build_criterion(r.loss, r.model.num_experts, counts)
    logits = model(torch.randn(2, in_chans, 32, 32))
    assert logits.shape == (r.model.num_experts, 2, num_classes)
    assert torch.isfinite(criterion(logits, torch.tensor([0, num_classes - 1])))
    # lambda_m of the adaptation modes: ce / focal keep the training prior, the others are balanced
    assert ensemble_prior(r)[1] == (1.0 if r.loss.name in ("ce", "focal") and r.data.sampler == "instance" else 0.0)
