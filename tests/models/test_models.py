"""Multi-expert networks from timm models: shapes, split correctness, registry, heads."""

import dataclasses
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from balpoe.errors import BalpoeError
from balpoe.models import CosineHead, MultiExpertNet, build_multi_expert
from balpoe.models.build import build_model
from balpoe.models.heads import HEAD_INITS, LinearHead, build_head
from balpoe.models import build as model_build
from balpoe.models.build import probe_sizes
from balpoe.models.weights import load_state
from balpoe.recipe import recipe_from_dict


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


@pytest.mark.parametrize("fan_in", [64, 256])
def test_linear_head_init_std_matches_closed_form(fan_in):
    # nn.Linear default: kaiming_uniform_(a=sqrt(5)) -> U(-1/sqrt(D), 1/sqrt(D)), std 1/sqrt(3 D)
    # (0.072 for D = 64); official MiSLAS / LDAM-DRW: kaiming_normal_ -> N(0, 2/D), std sqrt(2/D) (0.177)
    torch.manual_seed(0)
    default = build_head("linear", fan_in, 2000)
    kaiming = build_head("linear", fan_in, 2000, init="kaiming")
    assert isinstance(kaiming, LinearHead) and HEAD_INITS == ("default", "kaiming")
    n = 2000 * fan_in  # relative standard error of a sample std ~ 1/sqrt(2n) < 0.2%
    assert default.weight.std().item() == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.01)
    assert default.weight.abs().max().item() <= 1 / math.sqrt(fan_in)
    assert kaiming.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.01)
    assert abs(kaiming.weight.mean().item()) < 4 * math.sqrt(2 / fan_in) / math.sqrt(n)
    # Gaussian, not uniform: kurtosis 3 (a uniform's is 1.8)
    w = kaiming.weight.double().flatten()
    assert (((w - w.mean()) ** 4).mean() / w.var() ** 2).item() == pytest.approx(3.0, abs=0.1)
    # the bias keeps torch's default U(-1/sqrt(D), 1/sqrt(D)), as the official code
    assert kaiming.bias.abs().max().item() <= 1 / math.sqrt(fan_in)
    assert kaiming.bias.std().item() == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.1)
    if fan_in == 64:
        assert round(default.weight.std().item(), 3) == 0.072 and round(kaiming.weight.std().item(), 2) == 0.18


def test_head_init_from_the_recipe():
    torch.manual_seed(1)
    r = recipe_from_dict({"model": {"backbone": "small_cnn", "num_experts": 3, "head": "linear",
                                    "head_init": "kaiming", "kwargs": {"widths": [8, 16, 64]}}, "loss": {"tau": [0, 1, 2]}})
    net = build_model(r.model, 500, 3, pretrained=False)
    for head in net.heads:  # every expert's linear head
        assert head.weight.shape == (500, 64)
        assert head.weight.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.03)
    # default: torch's nn.Linear init; recipes (and checkpoints) without the key get it
    assert recipe_from_dict({}).model.head_init == "default"
    plain = build_model(dataclasses.replace(r.model, head_init="default"), 500, 3, pretrained=False)
    assert plain.heads[0].weight.std().item() == pytest.approx(1 / math.sqrt(3 * 64), rel=0.03)
    # the same seed gives the same network as before the key existed (default draws nothing extra)
    torch.manual_seed(2)
    a = build_model(dataclasses.replace(r.model, head_init="default"), 10, 3, pretrained=False)
    torch.manual_seed(2)
    b = build_multi_expert("small_cnn", 10, 3, "head", "linear", 30.0, 3, kwargs={"widths": [8, 16, 64]})
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # cosine heads keep their own initialisation
    with pytest.raises(BalpoeError, match="recipe key 'model.head_init' is 'kaiming' but model.head is 'cosine'"):
        build_model(dataclasses.replace(r.model, head="cosine"), 10, 3, pretrained=False)
    with pytest.raises(ValueError):
        build_head("cosine", 8, 4, init="kaiming")
    with pytest.raises(ValueError):
        build_head("linear", 8, 4, init="xavier")


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


# ------------------------------------------------------------------------------------------------
# model.kwargs: only the backbones' real keyword arguments

@pytest.mark.parametrize("backbone,in_chans,split", [("small_cnn", 1, "layer1"), ("resnet32_cifar", 3, "layer1"),
                                                     ("resnet20_cifar", 3, "head")])
def test_model_kwargs_typos_are_one_line_errors(backbone, in_chans, split):
    for typo in ("widht", "drop_rat", "drop_path_rate", "img_size", "x" * 5000):
        with pytest.raises(BalpoeError) as e:
            build_multi_expert(backbone, 5, 2, split=split, in_chans=in_chans, kwargs={typo: 0.1})
        msg = str(e.value)
        assert msg.startswith(f"model.kwargs not accepted by timm model '{backbone}': ")
        assert "unexpected keyword argument" in msg and typo[:50] in msg and len(msg) <= 300 and "\n" not in msg
    for bad, what in (({"widths": 5}, "not subscriptable"), ({"global_pool": "nope"}, "AssertionError")):
        with pytest.raises(BalpoeError, match=f"model.kwargs not accepted by timm model '{backbone}': .*{what}"):
            build_multi_expert(backbone, 5, 2, split=split, in_chans=in_chans, kwargs=bad)
    # Their real keyword arguments work, timm's bookkeeping ones (pretrained_cfg, ...) are popped by the factory.
    net = build_multi_expert(backbone, 5, 2, split=split, in_chans=in_chans,
                             kwargs={"widths": (8, 16, 32), "global_pool": "avg", "drop_rate": 0.5})
    x = torch.randn(4, in_chans, 32, 32)
    assert net(x).shape == (2, 4, 5) and net.heads[0].weight.shape[1] == 32
    net.train()
    assert (net.expert_features(x)[0] == 0).float().mean() > 0.2  # drop_rate is applied
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), net(x))


# ------------------------------------------------------------------------------------------------
# model.split is checked with a dummy batch


class _Reordered(torch.nn.Module):
    """A backbone whose top-level children are not declared in forward order (``proj`` runs last)."""

    def __init__(self, num_classes: int = 0, in_chans: int = 3, **kwargs):
        super().__init__()
        self.stem = torch.nn.Conv2d(in_chans, 8, 3, padding=1)
        self.proj = torch.nn.Linear(16, 16)
        self.body = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.num_features = 16

    def forward(self, x):
        return self.proj(self.pool(self.body(self.stem(x))).flatten(1))


@timm.models.register_model
def reordered_test_net(pretrained: bool = False, **kwargs) -> _Reordered:
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(k, None)
    return _Reordered(**kwargs)


def test_split_whose_children_do_not_run_in_forward_order_is_refused():
    # ViT: the class token and position embedding live outside the children -> per-token features.
    with pytest.raises(BalpoeError) as e:
        build_multi_expert("vit_tiny_patch16_224", 10, 2, split="blocks")
    assert str(e.value) == (
        "model.split 'blocks' for backbone 'vit_tiny_patch16_224': the shared stages and one expert branch map a "
        "[2, 3, 224, 224] batch to [2, 196, 192], not pooled features [2, 192] (the later top-level children do not "
        "run in forward order); use model.split: head or another stage")
    build_multi_expert("vit_tiny_patch16_224", 10, 2, split="head")  # the head split works for every timm model
    # A forward that raises is the same kind of one-line error.
    with pytest.raises(BalpoeError) as e:
        build_multi_expert("reordered_test_net", 10, 2, split="stem")
    msg = str(e.value)
    assert msg.startswith("model.split 'stem' for backbone 'reordered_test_net': a [2, 3, 32, 32] batch through the "
                          "shared stages and one expert branch fails (RuntimeError: ")
    assert msg.endswith("; use model.split: head or another stage") and "\n" not in msg and len(msg) <= 400


def test_split_check_sizes():
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0)
    assert probe_sizes(vit, {}) == [(224, 224)]                   # fixed input size
    assert probe_sizes(vit, {"img_size": 64}) == [(64, 64)]
    assert probe_sizes(timm.create_model("resnet18", num_classes=0), {}) == [(32, 32), (224, 224)]
    assert probe_sizes(timm.create_model("small_cnn", num_classes=0), {}) == [(32, 32)]
    # An img_size kwarg is the size the check uses.
    with pytest.raises(BalpoeError, match=r"map a \[2, 3, 32, 32\] batch to \[2, 4, 192\]"):
        build_multi_expert("vit_tiny_patch16_224", 10, 2, split="blocks", kwargs={"img_size": 32})


def test_split_check_leaves_no_trace(monkeypatch):
    def build():
        torch.manual_seed(0)
        net = build_multi_expert("small_cnn", 5, num_experts=3, split="layer1", in_chans=1)
        return net, torch.rand(3)

    checked, after = build()
    assert all(m.training for m in checked.modules())
    bn = checked.trunk.bn1
    assert int(bn.num_batches_tracked) == 0 and torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    monkeypatch.setattr(model_build, "check_split_forward", lambda *a, **k: None)
    unchecked, after_unchecked = build()
    assert torch.equal(after, after_unchecked)                    # the global RNG is where it was
    for (k, a), (_, b) in zip(checked.state_dict().items(), unchecked.state_dict().items()):
        assert torch.equal(a, b), k


def test_weights_that_do_not_fit_are_one_line_naming_what_did_not_fit():
    model = torch.nn.Linear(3, 2)
    state = {k: v + 1 for k, v in model.state_dict().items()}
    load_state(model, state, "unused")
    assert torch.equal(model.weight, state["weight"])
    with pytest.raises(BalpoeError) as info:
        load_state(model, {"weight": state["weight"]}, "the weights in 'w.pt' do not fit the model")
    assert str(info.value) == "the weights in 'w.pt' do not fit the model (Error(s) in loading state_dict for Linear:)"
