"""Stage-2 classifier of MiSLAS (Zhong et al. CVPR 2021, Sec. 3.2, Eq. 4):

    z = diag(s) (a W + dW)^T x

``W`` is the frozen stage-1 classifier, ``s`` a learnable per-class scale (LWS, Kang et al. 2020)
and ``dW`` a learnable shift of the class vectors, trained with its own learning-rate factor.
The three decoupling classifiers are settings of the same module:

=========  =====  ====================  ===============================================
mode       ``a``  ``s``                 ``dW``
=========  =====  ====================  ===============================================
mislas     1      learnable, init 1     learnable, init 0
lws        1      learnable, init 1     fixed 0
crt        0      fixed 1               learnable, a fresh classifier (re-initialised)
=========  =====  ====================  ===============================================

Torch convention: ``W`` and ``dW`` are ``[C, D]`` (one row per class).

* Linear head (``z = W x + b``): the bias is treated as an extra column of ``W`` (``x`` augmented
  with a constant 1), so ``z_c = s_c * ((a w_c + dw_c) . x + a b_c + db_c)``; ``db`` is part of
  ``dW`` (init 0 in mislas, absent in lws, fresh like ``nn.Linear``'s bias in crt).
* Cosine head (``z_c = t * <x/|x|, w_c/|w_c|>``, ``t`` = its fixed scale, 30 in BalPoE): the
  algebra is applied to the *normalised* class vectors and the result is normalised again,
  ``z_c = s_c * t * <x/|x|, normalize(a * w_c/|w_c| + dw_c)>``,
  so ``dW`` only turns the direction of each class vector (the part LWS cannot change) while
  ``s`` alone sets its length (the part LWS learns).  It is computed as
  ``normalize(a * w_c + |w_c| * dw_c)`` (the same direction), which at ``dW = 0`` is literally the
  stage-1 head's ``normalize(w_c)``, so the output matches the stage-1 head bit for bit.  In crt
  mode ``z_c = t * <x/|x|, dw_c/|dw_c|>`` is exactly a fresh :class:`CosineHead`.

Weight decay (``weight_decay_target``, mislas mode): with ``"stage1"`` (default, Eq. 4 as
written) the learnt tensor is ``dW`` (init 0), so SGD's weight decay pulls the classifier towards
the stage-1 ``W``.  With ``"zero"`` (the official MiSLAS code, ``train_stage2.py``, which fine-tunes
the classifier's own ``W`` and ``b`` at ``lr * lr_factor`` with weight decay) the learnt tensor is
the fine-tuned classifier itself: ``a = 0`` and ``delta_weight`` / ``delta_bias`` start as copies of
the stage-1 ``W`` / ``b`` (the outputs at init are unchanged), so weight decay pulls ``W + dW``
towards 0, as there.

Frozen tensors (``W``, bias, and ``s``/``dW`` where fixed) are buffers: they move with the module
and are in its ``state_dict``, but ``parameters()`` holds exactly the learnable stage-2 tensors.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from balpoe.errors import BalpoeError
from balpoe.models.heads import CosineHead, float32_head

MODES = ("mislas", "lws", "crt")
#: where weight decay pulls the mislas classifier: the stage-1 W (Eq. 4's dW -> 0) or 0 (official code)
WEIGHT_DECAY_TARGETS = ("stage1", "zero")


class LWSDeltaHead(nn.Module):
    """MiSLAS Eq. 4 around a stage-1 head (``nn.Linear``/``LinearHead`` or ``CosineHead``);
    ``mode`` is ``'mislas'``, ``'lws'`` or ``'crt'`` (see the module docstring).  Learnable:
    ``class_scale`` (``s``, ``[C]``), ``delta_weight`` (``dW``, ``[C, D]``) and, for a linear head
    with a bias, ``delta_bias`` (``[C]``); which of them are parameters depends on the mode."""

    def __init__(self, head: nn.Module, mode: str = "mislas", weight_decay_target: str = "stage1"):
        super().__init__()
        if mode not in MODES:
            raise BalpoeError(f"stage-2 classifier mode must be one of {MODES}, got {mode!r}")
        if weight_decay_target not in WEIGHT_DECAY_TARGETS:
            raise BalpoeError(f"stage-2 weight decay target must be one of {WEIGHT_DECAY_TARGETS}, got "
                              f"{weight_decay_target!r}")
        if isinstance(head, LWSDeltaHead):
            raise BalpoeError("head is already an LWSDeltaHead; convert a stage-1 head only once")
        if isinstance(head, CosineHead):
            self.kind, self.cosine_scale = "cosine", float(head.scale)
        elif isinstance(head, nn.Linear):
            self.kind, self.cosine_scale = "linear", None
        else:
            raise BalpoeError(f"LWSDeltaHead wraps a linear or cosine head, got {type(head).__name__}")
        self.mode = mode
        finetune = mode == "mislas" and weight_decay_target == "zero"  # learn W itself (official MiSLAS code)
        self.a = 0.0 if mode == "crt" or finetune else 1.0
        w = head.weight.detach()
        self.out_features, self.in_features = w.shape
        C, like = self.out_features, dict(device=w.device, dtype=w.dtype)
        self.register_buffer("weight", w.clone())
        b = getattr(head, "bias", None)
        self.register_buffer("bias", None if b is None else b.detach().clone())
        has_bias = self.bias is not None

        # s: learnable per-class scale (fixed 1 in crt).
        ones = torch.ones(C, **like)
        if mode == "crt":
            self.register_buffer("class_scale", ones)
        else:
            self.class_scale = nn.Parameter(ones)

        # dW (and db): learnable shift, init 0 (mislas); absent/0 (lws); fresh classifier (crt).
        self.delta_bias: nn.Parameter | None
        if mode == "lws":
            self.delta_weight = None
            self.delta_bias = None
        elif mode == "mislas" and finetune:
            self.delta_weight = nn.Parameter(w.clone())
            self.delta_bias = nn.Parameter(self.bias.clone()) if has_bias else None
        elif mode == "mislas":
            self.delta_weight = nn.Parameter(torch.zeros_like(w))
            self.delta_bias = nn.Parameter(torch.zeros(C, **like)) if has_bias else None
        else:
            fresh_w, fresh_b = _fresh_classifier(self.kind, self.in_features, C, has_bias, self.cosine_scale)
            self.delta_weight = nn.Parameter(fresh_w.to(**like))
            self.delta_bias = nn.Parameter(fresh_b.to(**like)) if fresh_b is not None else None

    def class_vectors(self) -> torch.Tensor:
        """``a W + dW`` (``[C, D]``) for a linear head; the unit class vectors
        ``normalize(a w_c/|w_c| + dw_c)`` for a cosine head (both before ``diag(s)``)."""
        if self.kind == "linear":
            if self.delta_weight is None:
                return self.weight
            return self.delta_weight if self.a == 0 else self.weight + self.delta_weight
        if self.delta_weight is None:
            v = self.weight
        elif self.a == 0:
            v = self.delta_weight
        else:
            v = self.weight + self.weight.norm(dim=1, keepdim=True) * self.delta_weight
        return F.normalize(v, dim=1)

    def class_bias(self) -> torch.Tensor | None:
        """``a b + db`` (``None`` for a head without bias)."""
        if self.bias is None:
            return None
        if self.delta_bias is None:
            return self.bias
        return self.delta_bias if self.a == 0 else self.bias + self.delta_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with float32_head(x):  # float32 under autocast, as the stage-1 heads
            x = x.to(self.weight.dtype)
            if self.kind == "linear":
                z = F.linear(x, self.class_vectors(), self.class_bias())
            else:
                z = self.cosine_scale * F.linear(F.normalize(x, dim=-1), self.class_vectors())
            return z * self.class_scale

    def delta_parameters(self) -> list[nn.Parameter]:
        """The learnable ``dW`` tensors (``delta_weight``, ``delta_bias``); empty in lws mode."""
        return [p for p in (self.delta_weight, self.delta_bias) if isinstance(p, nn.Parameter)]

    def scale_parameters(self) -> list[nn.Parameter]:
        """The learnable ``s`` (``class_scale``); empty in crt mode."""
        return [self.class_scale] if isinstance(self.class_scale, nn.Parameter) else []

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind!r}, "
                f"mode={self.mode!r}, a={self.a:g}")


def _fresh_classifier(kind: str, in_features: int, num_classes: int, bias: bool,
                      cosine_scale: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weights of a newly initialised head of the same type (torch's global RNG)."""
    if kind == "cosine":
        return CosineHead(in_features, num_classes, cosine_scale).weight.detach(), None
    fresh = nn.Linear(in_features, num_classes, bias=bias)
    return fresh.weight.detach(), (fresh.bias.detach() if bias else None)


def convert_heads_to_lws(model: nn.Module, mode: str = "mislas", weight_decay_target: str = "stage1") -> nn.Module:
    """Replace every head in ``model.heads`` (a ``ModuleList``) by an :class:`LWSDeltaHead`
    wrapping it (in place; returns ``model``).  At init (mislas/lws) the outputs are unchanged."""
    heads = getattr(model, "heads", None)
    if not isinstance(heads, nn.ModuleList):
        raise BalpoeError(f"{type(model).__name__} has no 'heads' ModuleList to convert for stage 2")
    new = [LWSDeltaHead(head, mode, weight_decay_target) for head in heads]  # validate every head before replacing any
    for i, head in enumerate(new):
        heads[i] = head
    return model
