"""Pretrained backbones: timm's weights (``model.pretrained``) and local files (``model.pretrained_file``)."""

from __future__ import annotations

import urllib.error

import pytest
import timm
import torch
import torchvision
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import save_file

from balpoe import recipe_from_dict
from balpoe.errors import BalpoeError
from balpoe.models.build import build_model
from balpoe.models.build import build_multi_expert
from balpoe.models.weights import match_weights, read_weights


def _state(backbone: str = "resnet20_cifar", num_classes: int = 10, **kw) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    return timm.create_model(backbone, num_classes=num_classes, **kw).state_dict()


def _console_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if "pretrained_file" in line]


def test_full_match_loads_exactly_into_every_expert_and_reports_one_line(tmp_path, capsys):
    src = _state()  # with its 10-class classifier fc.*: unused, not a mismatch
    torch.save({"epoch": 90, "state_dict": src}, tmp_path / "ckpt.pth")
    net = build_multi_expert("resnet20_cifar", 4, num_experts=3, split="layer1",
                             pretrained_file=str(tmp_path / "ckpt.pth"))
    assert len(net.trunk.state_dict()) > 10   # the shared stem + layer1
    for k, v in net.trunk.state_dict().items():
        assert torch.equal(v, src[k]), k
    for e in range(3):
        for k, v in net.branches[e].state_dict().items():
            assert torch.equal(v, src[k]), (e, k)
    (line,) = _console_lines(capsys)
    n = sum(1 for k in src if not k.startswith("fc."))
    assert f"loaded {n} of {n} backbone tensors" in line and "2 classifier tensors unused" in line
    assert "not loaded" not in line


@pytest.mark.parametrize("fmt", ["safetensors", "model_key", "ddp_prefix"])
def test_other_file_layouts(tmp_path, fmt):
    src = _state()
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pt")
    if fmt == "safetensors":
        save_file(src, str(path))
    elif fmt == "model_key":
        torch.save({"model": src, "optimizer": {"lr": torch.tensor(0.1)}}, path)
    else:
        torch.save({f"module.{k}": v for k, v in src.items()}, path)
    assert read_weights(path).keys() == src.keys()
    net = build_multi_expert("resnet20_cifar", 4, num_experts=1, pretrained_file=str(path))
    assert torch.equal(net.trunk.conv1.weight, src["conv1.weight"])


def test_partial_match_is_refused_with_counts_unless_not_strict(tmp_path, capsys):
    src = _state()
    del src["layer3.2.bn2.weight"], src["layer3.2.bn2.bias"]          # 2 missing
    src["extra.weight"] = torch.zeros(3)                                 # 1 unexpected
    src["conv1.weight"] = torch.zeros(16, 1, 3, 3)                       # 1 of another shape
    torch.save(src, tmp_path / "partial.pt")
    with pytest.raises(BalpoeError) as e:
        build_multi_expert("resnet20_cifar", 4, num_experts=2, split="layer2",
                           pretrained_file=str(tmp_path / "partial.pt"))
    msg = str(e.value)
    assert "\n" not in msg and "partial.pt" in msg and "resnet20_cifar" in msg
    assert "2 missing (layer3.2.bn2.weight, layer3.2.bn2.bias)" in msg
    assert "1 unexpected (extra.weight)" in msg
    assert "1 of another shape (conv1.weight: file [16, 1, 3, 3], backbone [16, 3, 3, 3])" in msg
    assert "model.pretrained_strict: false" in msg
    capsys.readouterr()

    net = build_multi_expert("resnet20_cifar", 4, num_experts=2, split="layer2",
                             pretrained_file=str(tmp_path / "partial.pt"), pretrained_strict=False)
    assert torch.equal(net.trunk.layer1[0].conv1.weight, src["layer1.0.conv1.weight"])
    assert not torch.equal(net.trunk.conv1.weight, torch.zeros(16, 3, 3, 3))   # kept its own initialisation
    for e in range(2):
        assert torch.equal(net.branches[e].layer3[2].conv1.weight, src["layer3.2.conv1.weight"])
    (line,) = _console_lines(capsys)
    total = len(timm.create_model("resnet20_cifar", num_classes=0).state_dict())
    assert f"loaded {total - 3} of {total} backbone tensors" in line
    assert "not loaded: 2 missing" in line and "1 unexpected" in line and "1 of another shape" in line


def test_nothing_matching_and_unreadable_files_are_errors(tmp_path):
    torch.save({"a.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(BalpoeError, match="no tensor matching backbone"):
        build_multi_expert("resnet20_cifar", 4, num_experts=1, pretrained_file=str(tmp_path / "other.pt"),
                           pretrained_strict=False)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(BalpoeError, match="could not be read as a torch state_dict"):
        build_multi_expert("resnet20_cifar", 4, num_experts=1, pretrained_file=str(tmp_path / "junk.pt"))
    torch.save({"epoch": 3}, tmp_path / "nostate.pt")
    with pytest.raises(BalpoeError, match="holds no state_dict"):
        build_multi_expert("resnet20_cifar", 4, num_experts=1, pretrained_file=str(tmp_path / "nostate.pt"))


def test_imagenet_resnet_file_into_split_experts(tmp_path):
    """The Places-LT recipe's start: an ImageNet classifier's weights (1000-class fc included), the
    experts split after layer2 / layer3 (tiny input; resnet18 stands in for resnet152)."""
    src = _state("resnet18", 1000)
    torch.save(src, tmp_path / "resnet18_imagenet.pth")
    x = torch.randn(2, 3, 32, 32)
    ref = timm.create_model("resnet18", num_classes=0).eval()
    ref.load_state_dict({k: v for k, v in src.items() if not k.startswith("fc.")})
    for split in ("layer2", "layer3"):
        net = build_multi_expert("resnet18", 365, num_experts=2, split=split, head="linear",
                                 pretrained_file=str(tmp_path / "resnet18_imagenet.pth")).eval()
        with torch.no_grad():
            feats = net.expert_features(x)
            assert torch.allclose(feats[0], ref(x), atol=1e-5) and torch.allclose(feats[1], ref(x), atol=1e-5)
            assert net(x).shape == (2, 2, 365)


def test_torchvision_resnet152_weights_match_timm_resnet152():
    """torchvision's ImageNet ResNet-152 file (the decoupling / MiSLAS Places-LT start) names its
    tensors as timm's resnet152 does: all match, only the classifier is unused (meta device)."""
    with torch.device("meta"):
        tv = torchvision.models.resnet152().state_dict()
        own = timm.create_model("resnet152", num_classes=0).state_dict()
    m = match_weights(own, tv)
    assert m.complete and m.unused == ["fc.weight", "fc.bias"] and m.parameters > 58_000_000


@pytest.mark.parametrize("error", [LocalEntryNotFoundError("cannot reach huggingface.co"),
                                   urllib.error.URLError("Name or service not known")])
def test_timm_pretrained_offline_is_one_line_naming_the_local_alternative(monkeypatch, error):
    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            raise error
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    cfg = recipe_from_dict({"model": {"backbone": "resnet18", "pretrained": True, "num_experts": 2}}).model
    with pytest.raises(BalpoeError) as e:
        build_model(cfg, 10, 3)
    msg = str(e.value)
    assert "\n" not in msg and "model.pretrained" in msg and "model.pretrained_file" in msg
    assert type(error).__name__ in msg
    assert build_model(cfg, 10, 3, pretrained=False).num_experts == 2   # a checkpoint's model needs no download


def test_timm_pretrained_weights_are_requested_for_every_copy(monkeypatch):
    calls = []
    real = timm.create_model

    def fake(name, pretrained=False, **kw):
        calls.append(pretrained)
        model = real(name, pretrained=False, **kw)
        if pretrained:
            torch.nn.init.constant_(model.conv1.weight, 0.5)
        return model

    monkeypatch.setattr(timm, "create_model", fake)
    cfg = recipe_from_dict({"model": {"backbone": "resnet20_cifar", "pretrained": True, "num_experts": 3,
                                      "split": "layer1"}}).model
    net = build_model(cfg, 10, 3)
    assert calls == [True, True, True] and (net.trunk.conv1.weight == 0.5).all()
