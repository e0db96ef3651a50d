"""Classifier heads: plain linear, and BalPoE's cosine head (``NormedLinear`` x s, s = 30)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def float32_head(x: torch.Tensor):
    """Context in which a classifier head runs in its own dtype (float32), also inside bf16
    autocast: cosine logits are ``s = 30`` times a cosine, and bf16's 8-bit mantissa would put
    ~0.06 of noise on them."""
    return torch.autocast(x.device.type, enabled=False)


class LinearHead(nn.Linear):
    """``z = W x + b``; ``weight`` is ``[C, D]``; float32 under autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with float32_head(x):
            return super().forward(x.to(self.weight.dtype))


class CosineHead(nn.Module):
    """Cosine classifier: ``z_c = s * <x / |x|, w_c / |w_c|>`` (BalPoE's normalised head, s = 30).

    ``weight`` is ``[C, D]`` (one row per class, the torch convention); it is initialised
    uniformly in [-1, 1] and each class vector renormalised, as in the official code.  Runs in
    float32 under autocast (:func:`float32_head`).
    """

    def __init__(self, in_features: int, out_features: int, scale: float = 30.0):
        super().__init__()
        self.in_features, self.out_features, self.scale = in_features, out_features, scale
        self.weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-1, 1))
        with torch.no_grad():
            self.weight.copy_(F.normalize(self.weight, dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with float32_head(x):
            x = F.normalize(x.to(self.weight.dtype), dim=-1)
            return self.scale * F.linear(x, F.normalize(self.weight, dim=1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale}"


def build_head(kind: str, in_features: int, num_classes: int, scale: float = 30.0) -> nn.Module:
    """``kind`` is ``'linear'`` or ``'cosine'``."""
    if kind == "linear":
        return LinearHead(in_features, num_classes)
    if kind == "cosine":
        return CosineHead(in_features, num_classes, scale)
    raise ValueError(f"unknown head {kind!r}")
