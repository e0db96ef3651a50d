"""Official ResNet constructions: ``model.zero_init_last`` and the frozen trunk of ``model.trainable``.

References: emasa/BalPoE-CalibratedLT ``model/fb_resnets/Expert_ResNet.py`` (``zero_init_residual=False``
default, lines 112 and 169-174) and dvlab-research/MiSLAS ``models/resnet_places.py`` (``Bottleneck``,
lines 78-117; ``resnet152_fe``: layer4 with two pretrained blocks) with ``train_stage1.py`` (lines 123-126:
the frozen ResNet-152 trunk, a fresh ``Bottleneck(2048, 512)`` and a ``Linear(2048, C)`` classifier;
lines 222-226: only the block and the classifier are optimised; lines 288-290: the trunk in eval mode).
"""

import pytest
import torch
import torch.nn as nn

from balpoe.errors import BalpoeError
from balpoe.models.build import build_model
from balpoe.models.build import build_multi_expert
from balpoe.recipe import load_recipe, recipe_from_dict


def _bn3(model):
    return [m.bn3.weight for m in model.modules() if hasattr(m, "bn3")]


def test_zero_init_last_false_starts_every_bn3_weight_at_one():
    net = build_multi_expert("resnet50", 10, num_experts=2, split="layer2", head="linear", zero_init_last=False)
    weights = _bn3(net)
    assert len(weights) == (3 + 4) + 2 * (6 + 3)  # shared layer1-2 and two copies of layer3-4
    assert all(torch.equal(w, torch.ones_like(w)) for w in weights)
    default = build_multi_expert("resnet50", 10, num_experts=1, head="linear")
    assert all(torch.equal(w, torch.zeros_like(w)) for w in _bn3(default))  # timm's zero_init_last=True


def test_zero_init_last_reaches_timm_through_the_recipe():
    r = recipe_from_dict({"model": {"backbone": "resnext50_32x4d", "num_experts": 1, "head": "linear",
                                    "zero_init_last": False}})
    assert all(torch.equal(w, torch.ones_like(w)) for w in _bn3(build_model(r.model, 5, 3)))
    bad = recipe_from_dict({"model": {"backbone": "small_cnn", "num_experts": 1, "zero_init_last": False}})
    with pytest.raises(BalpoeError, match="model.zero_init_last is not accepted by timm model 'small_cnn'"):
        build_model(bad.model, 5, 1)
    with pytest.raises(BalpoeError, match="use model.zero_init_last"):
        recipe_from_dict({"model": {"kwargs": {"zero_init_last": False}}})


@pytest.mark.parametrize("recipe", ["balpoe/imagenet_lt_r50.yaml", "balpoe/imagenet_lt_r50_long.yaml",
                                    "balpoe/imagenet_lt_rx50.yaml", "balpoe/imagenet_lt_rx50_long.yaml",
                                    "balpoe/inat2018_r50.yaml", "balpoe/inat2018_r50_long.yaml",
                                    "balpoe/places_lt_r152.yaml", "mislas/imagenet_lt_r50_stage1.yaml"])
def test_imagenet_scale_recipes_use_the_official_init(recipe):
    assert load_recipe(f"recipes/{recipe}").model.zero_init_last is False


def _official_bottleneck_params(inplanes=2048, planes=4, expansion=4):
    # resnet_places.py Bottleneck(2048, 512): conv1x1 inplanes->w, bn1, conv3x3 w->w, bn2, conv1x1 w->4w, bn3
    w = planes
    return inplanes * w + 2 * w + w * w * 9 + 2 * w + w * w * expansion + 2 * w * expansion


def test_frozen_trunk_trains_only_the_named_block_and_the_heads():
    # resnet50's layer4.2 is the official Places block's shape, Bottleneck(2048, 512)
    net = build_multi_expert("resnet50", 7, num_experts=1, head="linear", zero_init_last=False,
                             trainable=["layer4.2"], reinit=["layer4.2"])
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    block = _official_bottleneck_params(2048, 512)
    assert block == 4_462_592
    assert trainable == block + 2048 * 7 + 7  # + the Linear(2048, 7) classifier
    names = {n for n, p in net.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("trunk.layer4.2.", "heads.")) for n in names)
    # the optimizer sees only those
    (group,) = net.param_groups(0.1, 5e-4)
    assert sum(p.numel() for p in group["params"]) == trainable
    # train(): the frozen trunk stays in eval mode (BN statistics kept), the block trains
    net.train()
    trunk = net.trunk
    assert not trunk.layer1.training and not trunk.bn1.training and not trunk.layer4[1].bn3.training
    assert trunk.layer4[2].training and trunk.layer4[2].bn3.training and net.heads[0].training
    before = trunk.layer3[0].bn1.running_mean.clone()
    net(torch.randn(2, 3, 64, 64))
    assert torch.equal(trunk.layer3[0].bn1.running_mean, before)
    net.eval()
    assert not trunk.layer4[2].training


def test_reinit_gives_torch_default_init_after_the_weights_load(tmp_path):
    import timm
    src = timm.create_model("resnet18", num_classes=0)
    for p in src.parameters():
        nn.init.constant_(p, 0.5)
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    net = build_multi_expert("resnet18", 3, num_experts=2, split="layer3", head="linear", pretrained_file=str(path),
                             trainable=["layer4.1"], reinit=["layer4.1"])
    for branch in net.branches:
        fresh = branch.layer4[1]
        assert torch.equal(fresh.bn1.weight, torch.ones(512)) and torch.equal(fresh.bn1.bias, torch.zeros(512))
        assert not torch.all(fresh.conv1.weight == 0.5)
        assert torch.all(branch.layer4[0].conv1.weight == 0.5) and not branch.layer4[0].conv1.weight.requires_grad
    a, b = (br.layer4[1].conv1.weight for br in net.branches)
    assert not torch.equal(a, b)  # each expert's block is built on its own
    assert torch.all(net.trunk.layer1[0].conv1.weight == 0.5)


def test_bad_trainable_names_are_one_line_errors():
    with pytest.raises(BalpoeError, match=r"recipe key 'model.trainable' names 'layer9', not a module of backbone"):
        build_multi_expert("resnet18", 3, num_experts=1, trainable=["layer9"])
    with pytest.raises(BalpoeError, match="model.trainable with model.batched_experts"):
        build_multi_expert("resnet18", 3, num_experts=2, split="layer3", trainable=["layer4"], batched=True)


def test_places_recipe_trains_the_cited_regime():
    r = load_recipe("recipes/balpoe/places_lt_r152.yaml")
    assert r.model.trainable == ["layer4.2"] and r.model.reinit == ["layer4.2"]
    assert r.model.backbone == "resnet152" and r.model.pretrained_file
