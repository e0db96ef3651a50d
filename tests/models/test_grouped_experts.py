"""Batched experts (grouped convolutions) against the looped experts: same init, forward, gradients,
BN statistics, SGD step, state-dict keys; errors for what cannot be grouped; end to end in the trainer."""

import pytest
import torch
import torch.nn as nn
from formats import write_cifar

from balpoe import recipe_from_dict, train
from balpoe.runtime.checkpoint import load_checkpoint
from balpoe.errors import BalpoeError
from balpoe.losses import BalPoELoss
from balpoe.models import build_multi_expert
from balpoe.models.grouped import GroupedBranches, GroupedShortcutA
from balpoe.models.resnet_cifar import ShortcutA
from balpoe.training.build import build_optimizer
from balpoe.training.stage2 import prepare_stage2, set_stage2_mode
from balpoe.training.trainer import train_one_epoch

CASES = [("resnet20_cifar", "layer1", 3, 32), ("small_cnn", "layer1", 1, 28), ("resnet18", "layer2", 3, 32)]


def _pair(backbone, split, in_chans, experts=3, classes=7, **kw):
    torch.manual_seed(0)
    looped = build_multi_expert(backbone, classes, experts, split, "cosine", in_chans=in_chans, **kw)
    torch.manual_seed(0)
    batched = build_multi_expert(backbone, classes, experts, split, "cosine", in_chans=in_chans, batched=True, **kw)
    return looped, batched


def _canonical_grads(model, experts):
    """Gradients keyed like the looped model's parameters (grouped tensors split per expert)."""
    out = {}
    for name, p in model.named_parameters():
        if name.startswith("branches.body."):
            for k, part in enumerate(p.grad.chunk(experts)):
                out[f"branches.{k}.{name[len('branches.body.'):]}"] = part
        else:
            out[name] = p.grad
    return out


@pytest.mark.parametrize("backbone,split,in_chans,size", CASES)
def test_batched_experts_match_the_loop(backbone, split, in_chans, size):
    looped, batched = _pair(backbone, split, in_chans)
    assert batched.batched and not looped.batched
    # Same seed -> same initial weights, under the same (per-expert) state-dict keys.
    a, b = looped.state_dict(), batched.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Train-mode forward (batch statistics) and backward.
    x = torch.randn(6, in_chans, size, size)
    la, lb = looped(x), batched(x)
    assert la.shape == lb.shape == (3, 6, 7)
    torch.testing.assert_close(lb, la, atol=2e-5, rtol=1e-5)
    (la.square().sum() + la[1].sum()).backward()
    (lb.square().sum() + lb[1].sum()).backward()
    ga, gb = _canonical_grads(looped, 3), _canonical_grads(batched, 3)
    assert set(ga) == set(gb)
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], atol=1e-3 * ga[k].abs().max().item() + 1e-6, rtol=1e-4, msg=k)
    # Running statistics were updated per expert exactly as by E separate BN layers.
    a, b = looped.state_dict(), batched.state_dict()
    for k in a:
        if "running" in k or "num_batches" in k:
            torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5, msg=k)
    # One SGD step keeps them together.
    for m in (looped, batched):
        with torch.no_grad():
            for p in m.parameters():
                p -= 0.01 * p.grad
    looped.eval(), batched.eval()
    torch.testing.assert_close(batched(x), looped(x), atol=1e-4, rtol=1e-4)


def test_state_dicts_load_across_modes_and_give_the_same_logits():
    looped, batched = _pair("resnet20_cifar", "layer1", 3)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():  # make the two models different, then copy one into the other
        for p in looped.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for m in looped.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    batched.load_state_dict(looped.state_dict())
    looped.eval(), batched.eval()
    torch.testing.assert_close(batched(x), looped(x), atol=2e-5, rtol=1e-5)
    torch.manual_seed(5)
    fresh = build_multi_expert("resnet20_cifar", 7, 3, "layer1", "cosine", in_chans=3)
    fresh.load_state_dict(batched.state_dict())  # strict: every key present, none left over
    fresh.eval()
    assert torch.equal(fresh(x), looped(x))


def test_channels_last_input_gives_the_same_logits():
    _, batched = _pair("resnet20_cifar", "layer1", 3)
    batched.eval()
    x = torch.randn(4, 3, 32, 32)
    cl = batched.to(memory_format=torch.channels_last)
    torch.testing.assert_close(cl(x.contiguous(memory_format=torch.channels_last)), batched(x), atol=1e-5, rtol=1e-5)


def test_grouped_shortcut_pads_inside_each_expert_block():
    sc = ShortcutA(4, 8)
    grouped = GroupedShortcutA(sc, 3)
    xs = [torch.randn(2, 4, 6, 6) for _ in range(3)]
    out = grouped(torch.cat(xs, dim=1))
    assert out.shape == (2, 24, 3, 3)
    for k in range(3):
        assert torch.equal(out[:, 8 * k:8 * (k + 1)], sc(xs[k]))


def test_what_cannot_be_batched_is_a_one_line_error():
    with pytest.raises(BalpoeError, match="model.split to name a backbone stage"):
        build_multi_expert("small_cnn", 10, 2, "head", in_chans=1, batched=True)
    with pytest.raises(BalpoeError, match=r"DropPath at 'layer3\.0\.drop_path' has no grouped form"):
        build_multi_expert("resnet18", 10, 2, "layer2", batched=True, kwargs={"drop_path_rate": 0.1})
    with pytest.raises(BalpoeError, match="LayerNorm at '1' has no grouped form"):
        GroupedBranches([nn.Sequential(nn.Conv2d(3, 4, 1), nn.LayerNorm(4)) for _ in range(2)])
    with pytest.raises(BalpoeError, match="branches have different parameters"):
        GroupedBranches([nn.Sequential(nn.Conv2d(3, 4, 1)), nn.Sequential(nn.Conv2d(3, 5, 1))])


def test_stage2_runs_on_batched_experts():
    """Shifted BN and the LWS+dW heads work unchanged on the grouped branches."""
    _, batched = _pair("resnet20_cifar", "layer1", 3)
    prepare_stage2(batched, "mislas")
    assert not any(p.requires_grad for p in batched.branches.parameters())
    set_stage2_mode(batched, shifted_bn=True)
    before = batched.state_dict()["branches.2.layer3.0.bn1.running_mean"].clone()
    batched(torch.randn(5, 3, 32, 32)).sum().backward()
    after = batched.state_dict()["branches.2.layer3.0.bn1.running_mean"]
    assert not torch.equal(before, after)  # expert 2's BN statistics moved to the new stream
    assert all(p.grad is not None for h in batched.heads for p in h.parameters() if p.requires_grad)


def _recipe(root, batched, epochs=2):
    return recipe_from_dict({
        "name": "tiny", "seed": 4,
        "data": {"dataset": "cifar10", "root": str(root), "imb_factor": 10, "many_threshold": 30, "few_threshold": 10},
        "model": {"backbone": "resnet20_cifar", "num_experts": 3, "split": "layer1", "head": "cosine",
                  "batched_experts": batched},
        "loss": {"tau": [0, 1, 2]},
        "optim": {"lr": 0.05, "batch_size": 32, "epochs": epochs, "warmup_epochs": 0, "milestones": [1]},
        "train": {"mixup_alpha": 0.4, "checkpoint_every": 1, "eval_batch_size": 64},
    })


def test_training_steps_with_batched_experts_equal_the_looped_steps_in_float64():
    """Six SGD steps of the library's epoch (mixup, soft-target BalPoE loss, timm SGD with the
    recipe's momentum, Nesterov and weight decay) at the recipe's lr 0.05: batched and looped experts
    end with the same parameters and BN statistics.  Compared in float64, where the two summation
    orders (grouped vs per-expert convolutions) agree to ~1e-15 after every step; in float32 a ReLU
    input within rounding of zero can flip between them and the trajectories part chaotically."""
    looped, batched = (m.double() for m in _pair("resnet20_cifar", "layer1", 3, classes=10))
    recipe = _recipe("unused", True)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(12, 3, 32, 32, generator=gen, dtype=torch.float64),
                torch.randint(0, 10, (12,), generator=gen)) for _ in range(5)]
    batches.append((torch.randn(5, 3, 32, 32, generator=gen, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 9])))
    counts = torch.tensor([50, 30, 20, 12, 8, 5, 3, 2, 2, 1])
    stats = []
    for model in (looped, batched):
        opt = build_optimizer(recipe.optim, model.param_groups(recipe.optim.lr, recipe.optim.weight_decay))
        stats.append(train_one_epoch(model, batches, BalPoELoss(counts, [0.0, 1.0, 2.0]), opt, epoch=0, seed=4,
                                     num_classes=10, mixup_alpha=0.4))
    assert stats[0]["loss"] == pytest.approx(stats[1]["loss"], rel=1e-6)   # the epoch loss is summed in float32
    a, b = looped.state_dict(), batched.state_dict()
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-9, atol=1e-10, msg=k)
    torch.manual_seed(0)
    start = build_multi_expert("resnet20_cifar", 10, 3, "layer1", "cosine").double().state_dict()
    assert max((a[k] - start[k]).abs().max().item() for k in a if a[k].is_floating_point()) > 1e-2   # they moved


def test_the_trainer_builds_batched_experts_from_the_recipe(tmp_path):
    root = write_cifar(tmp_path / "cifar", 10, 40, 8, seed=0)
    train(_recipe(root, False, epochs=1), tmp_path / "looped", show_progress=False, report=False)
    train(_recipe(root, True, epochs=1), tmp_path / "batched", show_progress=False, report=False)
    a = load_checkpoint(tmp_path / "looped" / "last.pt")
    b = load_checkpoint(tmp_path / "batched" / "last.pt")
    assert (a["recipe"]["model"]["batched_experts"], b["recipe"]["model"]["batched_experts"]) == (False, True)
    assert list(a["model"]) == list(b["model"])   # the same per-expert state-dict keys
    assert all(a["model"][k].shape == b["model"][k].shape for k in a["model"])
    # Resuming needs the same setting (the optimizer state is per parameter tensor).
    with pytest.raises(BalpoeError, match="'model.batched_experts' is False but .* was trained with True"):
        train(_recipe(root, False, epochs=2), tmp_path / "batched", resume=True, show_progress=False)
