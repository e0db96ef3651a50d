"""The multi-expert network: a shared trunk and E expert branches built from any timm model
(:func:`balpoe.models.build.build_multi_expert`).

* ``split="head"``: the whole timm backbone (features + pooling) is shared, each expert owns a
  head. Works for every timm model.
* ``split="<stage>"``: the top-level children of the timm model up to and including ``<stage>``
  are shared; each expert owns its own copy of the later stages (and of the pooling), like BalPoE's
  ResNet-32 (shared stem + ``layer1``; per-expert ``layer2``, ``layer3``) and ResNet-50 (shared up
  to ``layer2``).  This needs a model whose top-level children run in forward order, which holds
  for timm's ResNet/ResNeXt family and for ``resnet32_cifar`` / ``small_cnn``.  Each expert's
  branch comes from an independently initialised copy of the model, as in the official code where
  every expert's layers are created separately.

With ``batched=True`` (recipe ``model.batched_experts``) the E branches run as one network of
grouped convolutions (:class:`~balpoe.models.grouped.GroupedBranches`): same maths, same
state-dict keys, one kernel per layer instead of E.

``forward`` returns per-expert logits ``[E, B, C]``; the ensemble logit is their mean.  Its
softmax is the normalised *geometric mean* of the experts' distributions,
softmax(mean_k f_k) ∝ prod_k softmax(f_k)^(1/E) (BalPoE Sec. 3); the re-normalised product of the
distributions, softmax(sum_k f_k), is the same ensemble at temperature 1/E, E times sharper, which
matters for every calibration figure.

The network is built from a recipe's ``model`` section in :mod:`balpoe.models.build`; pretrained
weights are read and matched in :mod:`balpoe.models.weights`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange

from balpoe.errors import BalpoeError
from balpoe.models.grouped import GroupedBranches
from balpoe.models.lws import LWSDeltaHead


class MultiExpertNet(nn.Module):
    """Shared ``trunk`` -> per-expert ``branches[k]`` -> per-expert ``heads[k]``.

    ``branches`` is a list of modules (run in a loop) or one :class:`GroupedBranches` (run at once).
    """

    def __init__(self, trunk: nn.Module, branches: list[nn.Module] | GroupedBranches, heads: list[nn.Module],
                 frozen: list[nn.Module] | None = None):
        super().__init__()
        self.trunk = trunk
        self.branches = branches if isinstance(branches, GroupedBranches) else nn.ModuleList(branches)
        self.heads = nn.ModuleList(heads)
        if (self.branches.num_experts if self.batched else len(self.branches)) != len(heads):
            raise ValueError("one branch per head")
        # backbone modules outside model.trainable: frozen, and kept in eval mode by train()
        self.frozen_modules = list(frozen or [])

    def train(self, mode: bool = True) -> "MultiExpertNet":
        """``nn.Module.train``, except that the frozen backbone modules (``model.trainable``) stay in
        eval mode: their BN layers use and keep their running statistics (official MiSLAS Places-LT:
        ``model.eval()`` on the frozen ResNet-152 while the added block trains)."""
        super().train(mode)
        for m in self.frozen_modules:
            m.train(False)
        return self

    @property
    def batched(self) -> bool:
        """Whether the expert branches run together as grouped convolutions."""
        return isinstance(self.branches, GroupedBranches)

    @property
    def num_experts(self) -> int:
        return len(self.heads)

    def expert_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Pooled features ``[B, D]`` of each expert."""
        shared = self.trunk(x)
        if self.batched:
            return list(self.branches(shared).unbind(0))
        return [branch(shared) for branch in self.branches]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-expert logits ``[E, B, C]``."""
        return torch.stack([head(f) for head, f in zip(self.heads, self.expert_features(x))])

    def flat_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Per-expert logits laid out sample-major, ``[B, E, C]`` (the official code's ``logits``)."""
        return rearrange(self(x), "e b c -> b e c")

    @staticmethod
    def ensemble(expert_logits: torch.Tensor) -> torch.Tensor:
        """BalPoE aggregation: the mean of the expert logits ``[E, ..., C]`` -> ``[..., C]``.  Its
        softmax is the normalised geometric mean of the experts' softmax distributions (not their
        re-normalised product, softmax of the sum, which is E times sharper)."""
        return expert_logits.mean(0)

    def param_groups(self, lr: float, weight_decay: float, delta_lr_factor: float = 1.0) -> list[dict]:
        """Optimizer parameter groups of the trainable parameters (the module that owns the
        parameters says how they are optimised).

        Stage 1: one group, every parameter at ``lr``.  With MiSLAS Eq. 4 heads
        (:class:`~balpoe.models.lws.LWSDeltaHead`, stage 2): the ``dW`` tensors at
        ``lr * delta_lr_factor`` (group ``'delta'``) and the rest (``s``) at ``lr`` (group
        ``'scale'``); frozen parameters are left out and empty groups dropped."""
        trainable = [p for p in self.parameters() if p.requires_grad]
        if not trainable:
            raise BalpoeError("the model has no trainable parameters")
        delta_ids = {id(p) for m in self.modules() if isinstance(m, LWSDeltaHead) for p in m.delta_parameters()}
        if not any(isinstance(m, LWSDeltaHead) for m in self.modules()):
            return [{"params": trainable, "lr": lr, "weight_decay": weight_decay}]
        groups = [{"name": "scale", "params": [p for p in trainable if id(p) not in delta_ids], "lr": lr,
                   "weight_decay": weight_decay},
                  {"name": "delta", "params": [p for p in trainable if id(p) in delta_ids],
                   "lr": lr * delta_lr_factor, "weight_decay": weight_decay}]
        return [g for g in groups if g["params"]]
