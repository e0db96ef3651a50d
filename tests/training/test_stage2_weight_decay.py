"""``stage2.weight_decay_target``: the official MiSLAS stage-2 classifier update against ours.

Official (dvlab-research/MiSLAS ``train_stage2.py`` lines 236-244 and 452-462): SGD over
``[{"params": classifier.parameters()}, {"params": lws_model.parameters()}]`` with momentum and
``weight_decay=config.weight_decay``, the classifier group at ``lr * lr_factor``; the output is
``classifier(feat) * learned_norm`` (``methods.py`` ``LearnableWeightScaling``: ``learned_norm``
``[1, C]`` initialised to 1).  So weight decay pulls the fine-tuned ``W``, ``b`` (and ``s``) to 0.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from balpoe.models.lws import LWSDeltaHead
from balpoe.models.build import build_multi_expert
from balpoe.recipe import load_recipe
from balpoe.training.stage2 import prepare_stage2

LR, FACTOR, WD, STEPS = 0.1, 0.2, 0.05, 4


def _setup(target):
    torch.manual_seed(0)
    net = build_multi_expert("small_cnn", 5, num_experts=1, head="linear", in_chans=1).double()
    stage1_head = copy.deepcopy(net.heads[0])
    prepare_stage2(net, "mislas", target)
    net.eval()
    x = torch.randn(16, 1, 12, 12, dtype=torch.float64)
    y = torch.randint(5, (16,))
    return net, stage1_head, x, y


def _official(stage1_head, feats, y):
    classifier = copy.deepcopy(stage1_head)
    learned_norm = nn.Parameter(torch.ones(1, 5, dtype=torch.float64))
    opt = torch.optim.SGD([{"params": classifier.parameters(), "lr": LR * FACTOR},
                           {"params": [learned_norm], "lr": LR}], LR, momentum=0.9, weight_decay=WD)
    for _ in range(STEPS):
        loss = F.cross_entropy(classifier(feats) * learned_norm, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return classifier, learned_norm


def _ours(net, x, y):
    opt = torch.optim.SGD(net.param_groups(LR, WD, FACTOR), LR, momentum=0.9)
    for _ in range(STEPS):
        loss = F.cross_entropy(net(x)[0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.heads[0]


def test_zero_target_is_the_official_update():
    net, stage1_head, x, y = _setup("zero")
    head = net.heads[0]
    assert isinstance(head, LWSDeltaHead) and head.a == 0.0
    with torch.no_grad():
        feats = net.expert_features(x)[0]
        assert torch.allclose(net(x)[0], stage1_head(feats))  # unchanged outputs at init
    classifier, learned_norm = _official(stage1_head, feats, y)
    ours = _ours(net, x, y)
    assert torch.allclose(ours.class_vectors(), classifier.weight, atol=1e-12)
    assert torch.allclose(ours.class_bias(), classifier.bias, atol=1e-12)
    assert torch.allclose(ours.class_scale, learned_norm.flatten(), atol=1e-12)


def test_stage1_target_decays_towards_the_stage1_classifier():
    net, stage1_head, x, y = _setup("stage1")
    with torch.no_grad():
        feats = net.expert_features(x)[0]
    classifier, _ = _official(stage1_head, feats, y)
    ours = _ours(net, x, y)
    assert ours.a == 1.0
    # the two forms differ by the decay of the stage-1 W, lr * factor * wd * W per step (plus momentum)
    gap = (ours.class_vectors() - classifier.weight).abs().max().item()
    assert gap > 1e-4
    assert torch.equal(ours.weight, stage1_head.weight)  # W itself is frozen; dW carries the update


@pytest.mark.parametrize("name", ["cifar10_lt_ir100", "cifar100_lt_ir10", "imagenet_lt_r50",
                                  "fashion_mnist_lt_ir100_cpu_demo"])
def test_mislas_recipes_use_the_official_decay(name):
    assert load_recipe(f"recipes/mislas/{name}_stage2.yaml").stage2.weight_decay_target == "zero"
