"""Classifier heads: plain linear, and BalPoE's cosine head (``NormedLinear`` x s, s = 30).

Linear heads are initialised as ``nn.Linear`` (``init='default'``: kaiming-uniform with
``a = sqrt(5)``, weight std ``1 / sqrt(3 D)``) or as the official MiSLAS / LDAM-DRW CIFAR classifier
(``init='kaiming'``: ``_weights_init`` of ``resnet_cifar.py`` calls ``nn.init.kaiming_normal_`` on
the weight, std ``sqrt(2 / D)``, and leaves the bias at torch's default), :data:`HEAD_INITS`.
For ``D = 64`` features: std 0.072 vs 0.177.
"""

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


#: ``model.head_init`` values: how a linear head's weight starts.
HEAD_INITS = ("default", "kaiming")


def init_linear_head(head: nn.Linear, init: str = "default") -> nn.Linear:
    """(Re-)initialise ``head``'s weight in place: ``'default'`` leaves torch's ``nn.Linear``
    initialisation as it is; ``'kaiming'`` draws ``nn.init.kaiming_normal_(weight)`` (fan_in,
    leaky_relu gain with ``a = 0``: std ``sqrt(2 / in_features)``), the bias unchanged, as the
    official MiSLAS CIFAR ``Classifier`` (``self.apply(_weights_init)``)."""
    if init not in HEAD_INITS:
        raise ValueError(f"unknown head init {init!r} (known: {', '.join(HEAD_INITS)})")
    if init == "kaiming":
        nn.init.kaiming_normal_(head.weight)
    return head


def build_head(kind: str, in_features: int, num_classes: int, scale: float = 30.0, init: str = "default") -> nn.Module:
    """``kind`` is ``'linear'`` or ``'cosine'``; ``init`` (:data:`HEAD_INITS`) applies to linear
    heads (:func:`init_linear_head`); a cosine head has its own initialisation (``init`` must be
    ``'default'``)."""
    if kind == "linear":
        return init_linear_head(LinearHead(in_features, num_classes), init)
    if init != "default":
        raise ValueError(f"head init {init!r} is for linear heads, not {kind!r}")
    if kind == "cosine":
        return CosineHead(in_features, num_classes, scale)
    raise ValueError(f"unknown head {kind!r}")
