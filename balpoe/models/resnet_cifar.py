"""ResNet-32 for CIFAR, the LDAM-DRW variant used by BalPoE and MiSLAS.

3x3 stem (16 channels), three stages of 5 basic blocks (16/32/64 channels, strides 1/2/2),
option-A shortcuts (stride-2 subsampling plus zero-padding of the new channels), global average
pooling, Kaiming-normal initialisation of convolutions and linear layers.  Registered in timm's
model registry as ``resnet32_cifar`` (and ``resnet20_cifar``/``resnet44_cifar``/``resnet56_cifar``),
so ``timm.create_model("resnet32_cifar", num_classes=100)`` builds it.  Its top-level children run
in forward order (``conv1, bn1, act1, layer1, layer2, layer3, global_pool, fc``), which lets
:class:`~balpoe.models.multi_expert.MultiExpertNet` split it after any stage.  Keyword arguments
(recipe ``model.kwargs``): ``widths``, ``global_pool``, ``drop_rate``; anything else is refused.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d
from timm.models import register_model


class ShortcutA(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the channel dimension to ``planes``."""

    def __init__(self, in_planes: int, planes: int):
        super().__init__()
        self.pad = (planes - in_planes) // 2, planes - in_planes - (planes - in_planes) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad[0], self.pad[1]))


class BasicBlockA(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = ShortcutA(in_planes, planes) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


#: Stage widths of the CIFAR ResNets (stem + layer1, layer2, layer3).
WIDTHS = (16, 32, 64)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs with option-A shortcuts (He et al. 2016, Sec. 4.2)."""

    def __init__(self, depth: int = 32, num_classes: int = 100, in_chans: int = 3, widths=WIDTHS,
                 global_pool: str = "avg", drop_rate: float = 0.0):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.num_classes, self.drop_rate = num_classes, drop_rate
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = nn.ReLU(inplace=True)
        in_planes = widths[0]
        for i, (w, s) in enumerate(zip(widths, (1, 2, 2))):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlockA(in_planes, w, s if j == 0 else 1))
                in_planes = w
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_features = in_planes
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def reduced_widths(widths=WIDTHS) -> tuple[int, int, int]:
    """RIDE's ``reduce_dimension`` (Wang et al. ICLR 2021; official ``ResNet_s`` of
    ``model/ldam_drw_resnets/ride_resnet_cifar.py``, also SADE's CIFAR model): the stem and
    ``layer1`` as they are, ``layer2`` / ``layer3`` (owned by each expert) at 3/4 width, 24 / 48
    instead of 32 / 64 channels."""
    return widths[0], widths[1] * 3 // 4, widths[2] * 3 // 4


def _create(depth: int, pretrained: bool, **kwargs) -> CifarResNet:
    if pretrained:
        raise ValueError("no pretrained weights exist for the CIFAR ResNets; use model.pretrained_file")
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(k, None)
    return CifarResNet(depth=depth, **kwargs)


@register_model
def resnet20_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create(20, pretrained, **kwargs)


@register_model
def resnet32_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-32 (LDAM-DRW / BalPoE / MiSLAS CIFAR backbone): 0.46 M parameters with 100 classes."""
    return _create(32, pretrained, **kwargs)


@register_model
def resnet44_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create(44, pretrained, **kwargs)


@register_model
def resnet56_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create(56, pretrained, **kwargs)
