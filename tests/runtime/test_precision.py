"""Mixed precision: where bf16 autocast is used, and float32 classifier heads inside it."""

import math

import pytest
import torch
import torch.nn.functional as F

from balpoe.models import CosineHead, LinearHead, LWSDeltaHead, build_multi_expert
from balpoe.data.device_loader import DeviceLoader
from balpoe.losses import BalPoELoss
from balpoe.runtime.precision import amp_dtype, autocast, native_bf16, use_amp
from balpoe.training.trainer import train_one_epoch


def test_amp_is_used_only_where_bf16_is_native(monkeypatch):
    cpu = torch.device("cpu")
    assert use_amp(cpu, False) is False
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert native_bf16(cpu) and use_amp(cpu, True) is True
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    with pytest.warns(UserWarning, match="train.amp: the cpu device has no native bf16 arithmetic; running in float32"):
        assert use_amp(cpu, True) is False
    assert native_bf16(torch.device("meta")) is False


@pytest.mark.parametrize("head", [CosineHead(16, 5, 30.0), LinearHead(16, 5),
                                  LWSDeltaHead(CosineHead(16, 5, 30.0), "mislas")])
def test_heads_compute_in_float32_inside_autocast(head):
    x = torch.randn(8, 16).bfloat16()  # what a bf16 backbone hands the head
    with autocast(torch.device("cpu"), True):
        z = head(x)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, head(x.float()), rtol=0, atol=0)
    if isinstance(head, CosineHead):  # the closed form, in float32
        ref = 30.0 * F.normalize(x.float(), dim=1) @ F.normalize(head.weight, dim=1).T
        torch.testing.assert_close(z, ref, rtol=1e-6, atol=1e-5)


def test_bf16_forward_gives_float32_logits_close_to_float32():
    torch.manual_seed(0)
    model = build_multi_expert("small_cnn", 10, 3, "layer1", "cosine", in_chans=1).eval()
    x = torch.randn(16, 1, 28, 28)
    with autocast(torch.device("cpu"), True):
        low = model(x)
    full = model(x)
    assert low.dtype == torch.float32 and low.shape == full.shape == (3, 16, 10)
    # bf16 backbone (8-bit mantissa), float32 heads: logits within a few hundredths at scale 30
    assert (low - full).abs().max() < 0.1
    assert (low.argmax(-1) == full.argmax(-1)).float().mean() >= 0.95


def test_training_with_amp_on_cpu_keeps_float32_weights(tmp_path, monkeypatch):
    """train.amp on a CPU with native bf16 (forced here): bf16 autocast in the step, float32 weights,
    a finite loss close to the float32 run's, float32 logits in the evaluation."""
    import json

    from formats import write_cifar

    from balpoe import recipe_from_dict, train
    from balpoe.runtime.checkpoint import load_checkpoint

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    root = write_cifar(tmp_path / "cifar", 10, 30, 5, seed=0)

    def recipe(amp):
        return recipe_from_dict({
            "name": "amp", "seed": 2,
            "data": {"dataset": "cifar10", "root": str(root), "imb_factor": 10, "many_threshold": 20,
                     "few_threshold": 8},
            "model": {"backbone": "small_cnn", "num_experts": 2, "split": "layer1"},
            "loss": {"tau": [0.5, 1.5]},
            "optim": {"lr": 0.01, "batch_size": 32, "epochs": 1, "warmup_epochs": 0},
            "train": {"amp": amp, "checkpoint_every": 1},
        })

    reports = {amp: train(recipe(amp), tmp_path / f"amp_{amp}", show_progress=False, report=False) for amp in (False, True)}
    losses = {amp: json.loads((tmp_path / f"amp_{amp}" / "metrics.jsonl").read_text())["loss"] for amp in reports}
    assert losses[True] == pytest.approx(losses[False], rel=0.05) and losses[True] != losses[False]
    state = load_checkpoint(tmp_path / "amp_True" / "last.pt")["model"]
    assert all(t.dtype in (torch.float32, torch.int64) for t in state.values())
    assert 0 <= reports[True]["acc"] <= 100 and reports[True]["n"] == 50


def test_gpus_that_only_emulate_bf16_get_fp16_with_loss_scaling(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    calls = []

    def bf16_supported(including_emulation=True):
        calls.append(including_emulation)
        return including_emulation          # a V100 / T4: emulated only
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16_supported)
    with pytest.warns(UserWarning, match="no native bf16; using fp16 autocast with loss scaling"):
        assert amp_dtype(cuda, True) == torch.float16
    assert calls == [False]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # A100, H100
    assert amp_dtype(cuda, True) == torch.bfloat16
    assert amp_dtype(cuda, False) is None


def test_fp16_autocast_with_a_grad_scaler_trains(tmp_path):
    """The fp16 path (GradScaler) on CPU: finite losses, weights change, float32 weights."""
    torch.manual_seed(0)
    model = build_multi_expert("small_cnn", 4, 2, "layer1", "cosine", in_chans=1, kwargs={"widths": [4, 8, 8]})
    images = torch.randint(0, 255, (40, 1, 12, 12), dtype=torch.uint8)
    labels = torch.arange(40) % 4
    loader = DeviceLoader(images, labels, 8, [0.5], [0.25], train=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    stats = train_one_epoch(model, loader, BalPoELoss(torch.bincount(labels), [0.5, 1.5]), opt, epoch=0, seed=0,
                            num_classes=4, amp=torch.float16, scaler=scaler)
    assert math.isfinite(stats["loss"]) and stats["images"] == 40
    assert scaler.get_scale() > 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.dtype == torch.float32 for p in model.parameters())
