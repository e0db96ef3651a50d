"""Multi-expert networks from timm models: shapes, split correctness, registry, heads."""

import pytest
import timm
import torch
import torch.nn.functional as F

from balpoe.errors import BalpoeError
from balpoe.models import CosineHead, MultiExpertNet, build_multi_expert


def _resnet32_param_count(num_classes: int) -> int:
    conv = lambda cin, cout: cin * cout * 9  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731
    n = conv(3, 16) + bn(16)
    cin = 16
    for w in (16, 32, 64):
        for _ in range(5):
            n += conv(cin, w) + conv(w, w) + 2 * bn(w)
            cin = w
    return n + 64 * num_classes + num_classes


def test_resnet32_is_registered_in_timm_with_ldam_architecture():
    assert "resnet32_cifar" in timm.list_models("resnet32*")
    m = timm.create_model("resnet32_cifar", num_classes=100)
    assert sum(p.numel() for p in m.parameters()) == _resnet32_param_count(100) == 470_004
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    # Option-A shortcut: stride-2 subsampling with zero-padded channels, no parameters.
    block = m.layer2[0]
    x = torch.randn(1, 16, 8, 8)
    sc = block.shortcut(x)
    assert sc.shape == (1, 32, 4, 4)
    assert torch.equal(sc[:, 8:24], x[:, :, ::2, ::2]) and sc[:, :8].abs().sum() == 0 and sc[:, 24:].abs().sum() == 0


@pytest.mark.parametrize("backbone,split,shared,owned,in_chans,size", [
    ("resnet32_cifar", "layer1", ["conv1", "bn1", "act1", "layer1"], ["layer2", "layer3", "global_pool", "fc"], 3, 32),
    ("resnet18", "layer2", ["conv1", "bn1", "act1", "maxpool", "layer1", "layer2"],
     ["layer3", "layer4", "global_pool", "fc"], 1, 64),
    ("resnext26ts", "stages", None, None, 3, 64),
])
def test_stage_split_matches_the_unsplit_model(backbone, split, shared, owned, in_chans, size):
    torch.manual_seed(0)
    if shared is None:  # a timm family whose children are not in forward order here: error, not silence
        with pytest.raises(BalpoeError, match="model.split"):
            build_multi_expert(backbone, 10, 2, split="nope", in_chans=in_chans)
        return
    net = build_multi_expert(backbone, 10, num_experts=3, split=split, head="linear", in_chans=in_chans)
    assert [n for n, _ in net.trunk.named_children()] == shared
    assert [n for n, _ in net.branches[0].named_children()] == owned
    x = torch.randn(2, in_chans, size, size)
    assert net(x).shape == (3, 2, 10)
    net.eval()
    # Each expert = trunk + its branch is exactly the timm model carrying those weights.
    for k in range(3):
        ref = timm.create_model(backbone, num_classes=0, in_chans=in_chans).eval()
        state = {**net.trunk.state_dict(), **net.branches[k].state_dict()}
        ref.load_state_dict(state)
        with torch.no_grad():
            assert torch.allclose(net.expert_features(x)[k], ref(x), atol=1e-5)
            assert torch.allclose(net(x)[k], net.heads[k](ref(x)), atol=1e-5)
    # Experts own independently initialised copies; the trunk is one shared module.
    p0 = dict(net.branches[0].named_parameters())
    p1 = dict(net.branches[1].named_parameters())
    name = next(iter(p0))
    assert p0[name].data_ptr() != p1[name].data_ptr() and not torch.equal(p0[name], p1[name])


@pytest.mark.parametrize("backbone,kwargs", [("convnext_atto", {}), ("mobilenetv3_small_050", {}),
                                             ("efficientnet_b0", {})])
def test_head_split_works_for_other_timm_families(backbone, kwargs):
    net = build_multi_expert(backbone, 7, num_experts=2, split="head", head="cosine", kwargs=kwargs)
    x = torch.randn(2, 3, 32, 32)
    out = net(x)
    assert out.shape == (2, 2, 7)
    assert out.abs().max() <= 30.0 + 1e-4  # cosine head: |s cos| <= s
    net.eval()
    with torch.no_grad():
        feats = net.trunk(x)
        assert torch.allclose(net(x)[1], net.heads[1](feats), atol=1e-5)
    assert torch.allclose(MultiExpertNet.ensemble(out), out.mean(0))


def test_shared_trunk_receives_gradients_from_every_expert():
    net = build_multi_expert("resnet20_cifar", 5, num_experts=2, split="layer1")
    x = torch.randn(4, 3, 32, 32)
    p = net.trunk.conv1.weight
    g = []
    for k in range(2):
        net.zero_grad()
        net(x)[k].sum().backward()
        g.append(p.grad.clone())
    net.zero_grad()
    net(x).sum().backward()
    assert torch.allclose(p.grad, g[0] + g[1], atol=1e-4)


def test_cosine_head_closed_form():
    head = CosineHead(8, 4, scale=30.0)
    x = torch.randn(5, 8)
    expected = 30.0 * (F.normalize(x, dim=1) @ F.normalize(head.weight, dim=1).T)
    assert torch.allclose(head(x), expected, atol=1e-5)
    assert torch.allclose(head.weight.norm(dim=1), torch.ones(4), atol=1e-6)  # renormalised at init


def test_unknown_backbone_and_bad_split_are_one_line_errors(tmp_path):
    with pytest.raises(BalpoeError, match="model.backbone 'not_a_model'"):
        build_multi_expert("not_a_model", 10)
    with pytest.raises(BalpoeError, match="model.split 'layer9'.*layer1"):
        build_multi_expert("resnet32_cifar", 10, split="layer9")
    with pytest.raises(BalpoeError, match="pretrained_file .*missing.pt' not found"):
        build_multi_expert("resnet32_cifar", 10, pretrained_file=str(tmp_path / "missing.pt"))


def test_pretrained_file_is_loaded_into_the_backbone(tmp_path):
    src = timm.create_model("resnet20_cifar", num_classes=0)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    net = build_multi_expert("resnet20_cifar", 10, num_experts=2, split="layer1", pretrained_file=str(tmp_path / "w.pt"))
    assert torch.equal(net.trunk.conv1.weight, src.conv1.weight)
    for k in range(2):  # every expert branch starts from the file too
        assert torch.equal(net.branches[k].layer3[0].conv1.weight, src.layer3[0].conv1.weight)


def test_stage_split_keeps_timm_dropout():
    net = build_multi_expert("resnet18", 4, num_experts=2, split="layer3", kwargs={"drop_rate": 0.5})
    names = [n for n, _ in net.branches[0].named_children()]
    assert names == ["layer4", "global_pool", "head_drop", "fc"]
    x = torch.randn(3, 3, 32, 32)
    net.train()
    feats = net.expert_features(x)[0]
    assert (feats == 0).float().mean() > 0.2  # dropout active in training
    net.eval()
    with torch.no_grad():
        assert torch.equal(net.expert_features(x)[0], net.expert_features(x)[0])


def test_flat_logits_is_the_sample_major_layout():
    net = build_multi_expert("small_cnn", 5, num_experts=3, split="layer1", in_chans=1).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(net.flat_logits(x), net(x).transpose(0, 1))
