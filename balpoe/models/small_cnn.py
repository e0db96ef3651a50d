"""A small CNN for quick CPU runs on 28x28 / 32x32 images (Fashion-MNIST-LT demo).

``conv1, bn1, act1`` stem, two stride-2 stages of one conv each (``layer1``, ``layer2``), global
average pooling and ``fc``; the top-level children run in forward order, so
:class:`~balpoe.models.multi_expert.MultiExpertNet` can split it after ``layer1``.
Registered in timm as ``small_cnn``; keyword arguments (recipe ``model.kwargs``): ``widths``,
``global_pool``, ``drop_rate`` (dropout before the classifier, as timm's models); anything else is
refused.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d
from timm.models import register_model


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 1, widths=(32, 64, 128), global_pool: str = "avg",
                 drop_rate: float = 0.0):
        super().__init__()
        self.num_classes, self.drop_rate = num_classes, drop_rate
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = nn.ReLU(inplace=True)
        self.layer1 = _conv_bn(widths[0], widths[1], 2)
        self.layer2 = _conv_bn(widths[1], widths[2], 2)
        self.num_features = widths[2]
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.layer1(self.act1(self.bn1(self.conv1(x)))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def small_cnn(pretrained: bool = False, **kwargs) -> SmallCNN:
    if pretrained:
        raise ValueError("small_cnn has no pretrained weights")
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(k, None)
    return SmallCNN(**kwargs)
