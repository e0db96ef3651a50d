"""MiSLAS stage 2 building blocks: frozen backbone, shifted BN (Eq. 5-6), param groups."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from balpoe.data.samplers import class_balanced_indices, instance_balanced_indices
from balpoe.errors import BalpoeError
from balpoe.losses.las import LabelAwareSmoothingLoss
from balpoe.models.heads import CosineHead, LinearHead
from balpoe.models.lws import LWSDeltaHead, convert_heads_to_lws
from balpoe.models.multi_expert import MultiExpertNet
from balpoe.training.stage2 import freeze_backbone, prepare_stage2, set_stage2_mode

NUM_CLASSES = 6
COUNTS = [96, 48, 24, 12, 6, 3]  # long-tailed, IF = 32


class TinyMultiExpert(MultiExpertNet):
    """A small MultiExpertNet: shared trunk, per-expert branch copies, a linear and a cosine head -> [E, B, C]."""

    def __init__(self, trunk: nn.Module, branch: nn.Module, dim: int, num_experts: int = 2):
        super().__init__(trunk, [copy.deepcopy(branch) for _ in range(num_experts)],
                         [LinearHead(dim, NUM_CLASSES) if e % 2 == 0 else CosineHead(dim, NUM_CLASSES)
                          for e in range(num_experts)])


def conv_net() -> TinyMultiExpert:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    branch = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                           nn.Dropout(0.5), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(16))
    return TinyMultiExpert(trunk, branch, 16)


def timm_net() -> TinyMultiExpert:
    """timm EfficientNet trunk (BatchNormAct2d layers, dropout before its pooled features),
    Identity branches as when every stage is shared."""
    torch.manual_seed(0)
    trunk = timm.create_model("efficientnet_b0", num_classes=0, drop_rate=0.5)   # in every timm 1.0
    return TinyMultiExpert(trunk, nn.Identity(), trunk.num_features)


def balpoe_net(split: str = "layer1") -> nn.Module:
    """The library's own MultiExpertNet: ResNet-20 (CIFAR), shared stem + layer1, per-expert
    layer2/layer3 copies (``split="head"``: all shared, dropout before the heads), cosine heads."""
    from balpoe.models.build import build_multi_expert
    torch.manual_seed(0)
    return build_multi_expert("resnet20_cifar", NUM_CLASSES, num_experts=2, split=split, head="cosine",
                              kwargs={"drop_rate": 0.5})


NETS = {"conv": conv_net, "timm": timm_net, "balpoe": balpoe_net}
DROPOUT_NETS = {"conv": conv_net, "timm": timm_net, "balpoe_head": lambda: balpoe_net("head")}


def lt_data(n_per_class=COUNTS, size=16, seed=0):
    """Images whose colour statistics depend on the class, so the class-balanced stream has
    different BN statistics from the instance-balanced one (Eq. 5 vs Eq. 6)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])
    shift = torch.linspace(-2, 2, NUM_CLASSES)[labels]
    images = torch.randn(len(labels), 3, size, size, generator=gen) + shift[:, None, None, None]
    images[:, 1] *= 1 + (labels[:, None, None] % 3).float()
    return images, labels


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in model.state_dict().items()
            if n.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def run_stage2(model: nn.Module, shifted_bn: bool, steps: int = 4, batch: int = 32, seed: int = 1):
    images, labels = lt_data()
    gen = torch.Generator().manual_seed(seed)
    loss_fn = LabelAwareSmoothingLoss(COUNTS, 0.4, 0.1)
    opt = torch.optim.SGD(model.param_groups(lr=0.1, weight_decay=5e-4, delta_lr_factor=0.2),
                          momentum=0.9, nesterov=True)
    for _ in range(steps):
        set_stage2_mode(model, shifted_bn)
        idx = class_balanced_indices(labels, batch, gen)
        opt.zero_grad()
        loss = loss_fn(model(images[idx]), labels[idx])
        loss.backward()
        opt.step()
    return loss


# ------------------------------------------------------------------ modes

@pytest.mark.parametrize("net", NETS)
def test_stage2_mode_flags(net):
    model = NETS[net]()
    model.train()
    assert set_stage2_mode(model, shifted_bn=True) is model
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert bns and all(m.training for m in bns)
    assert not any(m.training for m in model.modules() if not isinstance(m, _BatchNorm))
    if net == "timm":
        assert any(type(m).__name__ == "BatchNormAct2d" for m in bns)
    model.train()
    set_stage2_mode(model, shifted_bn=False)
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("net", DROPOUT_NETS)
def test_dropout_off_in_stage2_mode(net):
    model = DROPOUT_NETS[net]()
    x = lt_data()[0][:16]
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(x), model(x))       # dropout is live in train mode
        set_stage2_mode(model, shifted_bn=True)
        assert torch.equal(model(x), model(x))            # ... and off in stage-2 mode (BN uses batch stats)


# ------------------------------------------------------------------ shifted BN with a frozen backbone

@pytest.mark.parametrize("net,mode", [("conv", "mislas"), ("conv", "lws"), ("conv", "crt"),
                                      ("timm", "mislas"), ("balpoe", "mislas"), ("balpoe", "crt")])
def test_shifted_bn_changes_only_running_stats(net, mode):
    model = NETS[net]()
    prepare_stage2(model, mode)
    params0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen0 = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    buffers0 = {n: b.clone() for n, b in model.named_buffers()}
    stats0 = bn_state(model)
    steps = 3
    run_stage2(model, shifted_bn=True, steps=steps)

    # every BN layer re-estimated its running mean/var on the class-balanced stream
    stats1 = bn_state(model)
    for n in stats0:
        if n.endswith("num_batches_tracked"):
            assert stats1[n].item() == stats0[n].item() + steps, n
        else:
            assert not torch.equal(stats1[n], stats0[n]), n
    # BN affine parameters, all conv / linear weights and the stage-1 head W stay bit-identical
    assert frozen0
    for n, p in model.named_parameters():
        if n in frozen0:
            assert torch.equal(p, frozen0[n]), n
            assert p.grad is None, n
    bn_names = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    assert all(f"{n}.weight" in frozen0 and f"{n}.bias" in frozen0 for n in bn_names)
    for n, b in model.named_buffers():
        if n not in stats0:  # LWS frozen tensors: W, bias, fixed s
            assert torch.equal(b, buffers0[n]), n
    # and the stage-2 classifier did learn
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".heads." in f".{n}" for n in trainable)
    assert all(not torch.equal(dict(model.named_parameters())[n], params0[n]) for n in trainable)


@pytest.mark.parametrize("net", NETS)
def test_without_shifted_bn_stats_unchanged(net):
    model = NETS[net]()
    prepare_stage2(model, "mislas")
    stats0 = bn_state(model)
    s0 = [h.class_scale.detach().clone() for h in model.heads]
    run_stage2(model, shifted_bn=False, steps=3)
    stats1 = bn_state(model)
    for n in stats0:
        assert torch.equal(stats1[n], stats0[n]), n
    assert all(not torch.equal(h.class_scale.detach(), s) for h, s in zip(model.heads, s0))


def test_shifted_bn_moves_stats_to_the_class_balanced_stream():
    # Eq. 5 vs Eq. 6: after stage 1 the first BN's running mean is mu_I; shifted BN moves it to mu_C.
    model = conv_net()
    images, labels = lt_data()
    bn = model.trunk[1]
    captured = []
    hook = bn.register_forward_hook(lambda m, inp, out: captured.append(inp[0].mean((0, 2, 3)).detach()))
    gen = torch.Generator().manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(40):  # "stage 1": instance-balanced stream
            model(images[instance_balanced_indices(len(labels), gen)[:32]])
    mu_I = torch.stack(captured[-20:]).mean(0)
    prepare_stage2(model, "lws")
    captured.clear()
    run_stage2(model, shifted_bn=True, steps=40)
    mu_C = torch.stack(captured[-20:]).mean(0)
    hook.remove()
    gap = (mu_I - mu_C).norm()
    assert gap > 0.2  # the two streams really differ
    assert (bn.running_mean - mu_C).norm() < 0.25 * gap


# ------------------------------------------------------------------ freezing and param groups

def test_freeze_backbone_flags():
    model = conv_net()
    with pytest.raises(BalpoeError, match="convert_heads_to_lws"):
        freeze_backbone(model)
    convert_heads_to_lws(model, "mislas")
    assert freeze_backbone(model) is model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"heads.0.class_scale", "heads.0.delta_weight", "heads.0.delta_bias",
                         "heads.1.class_scale", "heads.1.delta_weight"}


@pytest.mark.parametrize("mode,names", [("mislas", {"scale", "delta"}), ("lws", {"scale"}), ("crt", {"delta"})])
def test_param_groups_of_stage2_heads(mode, names):
    model = conv_net()
    prepare_stage2(model, mode)
    groups = model.param_groups(lr=0.05, weight_decay=2e-4, delta_lr_factor=0.1)
    assert {g["name"] for g in groups} == names
    by_name = {g["name"]: g for g in groups}
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    delta_ids = {id(p) for h in model.heads for p in h.delta_parameters()}
    scale_ids = {id(p) for h in model.heads for p in h.scale_parameters()}
    if "delta" in by_name:
        assert by_name["delta"]["lr"] == pytest.approx(0.005)
        assert {id(p) for p in by_name["delta"]["params"]} == delta_ids
    if "scale" in by_name:
        assert by_name["scale"]["lr"] == 0.05
        assert {id(p) for p in by_name["scale"]["params"]} == scale_ids
    assert all(g["weight_decay"] == 2e-4 for g in groups)
    opt = torch.optim.SGD(groups, lr=0.05, momentum=0.9)
    assert len(opt.param_groups) == len(names)


def test_param_groups_stage1_and_errors():
    model = conv_net()
    (group,) = model.param_groups(lr=0.1, weight_decay=5e-4)  # stage 1: every parameter, one group
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]
    assert group["lr"] == 0.1 and group["weight_decay"] == 5e-4
    with pytest.raises(BalpoeError, match="no trainable"):
        model.requires_grad_(False)
        model.param_groups(lr=0.1, weight_decay=0.0)


def test_prepare_stage2_keeps_outputs_at_init():
    model = conv_net()
    x = lt_data()[0][:8]
    model.eval()
    with torch.no_grad():
        before = model(x)
        prepare_stage2(model, "mislas")
        model.eval()
        assert torch.equal(model(x), before)
    assert all(isinstance(h, LWSDeltaHead) for h in model.heads)
