"""MiSLAS stage 2 (Zhong et al. CVPR 2021, Sec. 3.2-3.3): freeze the backbone, learn the Eq. 4
classifier (:class:`~balpoe.models.lws.LWSDeltaHead`) on the class-balanced stream, and shift
the BatchNorm statistics to that stream (Eq. 5-6).

Per stage 2 (the trainer's order)::

    prepare_stage2(model, mode="mislas")           # once: Eq. 4 heads, frozen backbone
    opt = SGD(stage2_param_groups(model, lr, delta_lr_factor, wd), momentum=0.9)
    for epoch ...:
        set_stage2_mode(model, shifted_bn=True)    # instead of model.train()
        ...
        model.eval()                               # for evaluation, as usual

Shifted BN (Eq. 5-6): BN layers run in train mode, so each forward normalises with the batch
statistics of the class-balanced batch and updates ``running_mean``/``running_var`` (default
momentum, as in the paper), while their affine ``weight``/``bias`` (alpha, beta) stay frozen.
"""

from __future__ import annotations

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from balpoe.errors import BalpoeError
from balpoe.models.lws import LWSDeltaHead, convert_heads_to_lws


def _lws_heads(model: nn.Module) -> list[LWSDeltaHead]:
    return [m for m in model.modules() if isinstance(m, LWSDeltaHead)]


def _bn_layers(model: nn.Module) -> list[_BatchNorm]:
    """All BatchNorm layers (BatchNorm1d/2d/3d, SyncBatchNorm, timm's BatchNormAct2d, ...)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def freeze_backbone(model: nn.Module) -> nn.Module:
    """``requires_grad = False`` on every parameter except the learnable Eq. 4 tensors (``s``,
    ``dW``) of the model's :class:`LWSDeltaHead` s; BN affine parameters included.  Returns ``model``."""
    heads = _lws_heads(model)
    if not heads:
        raise BalpoeError("stage 2 needs LWSDeltaHead classifiers; call convert_heads_to_lws(model, mode) first")
    model.requires_grad_(False)
    for head in heads:
        for p in head.parameters():
            p.requires_grad_(True)
    return model


def reset_bn_running_stats(model: nn.Module) -> nn.Module:
    """Optional variant (off by default): forget the stage-1 BN statistics and re-estimate them
    from scratch as a cumulative average over all stage-2 batches (``momentum = None``).
    The paper instead keeps updating the stage-1 statistics with the default momentum."""
    for bn in _bn_layers(model):
        if bn.track_running_stats:
            bn.reset_running_stats()
            bn.momentum = None
    return model


def set_stage2_mode(model: nn.Module, shifted_bn: bool = True) -> nn.Module:
    """Call instead of ``model.train()`` in stage 2: everything (dropout, drop-path, ...) in eval
    mode; with ``shifted_bn`` the BN layers in train mode so their running mean/var are
    re-estimated on the class-balanced stream (Eq. 6; forward uses batch statistics), their
    frozen affine parameters unchanged.  With ``shifted_bn=False`` BN stays in eval mode
    (stage-1 statistics used and kept).  Returns ``model``."""
    model.eval()
    if shifted_bn:
        for bn in _bn_layers(model):
            # Only the BN layer's own flag: ``bn.train()`` would recurse into children, and fused
            # layers such as timm's BatchNormAct2d hold their activation / dropout as submodules.
            bn.training = True
    return model


def prepare_stage2(model: nn.Module, mode: str = "mislas", reset_bn_stats: bool = False) -> nn.Module:
    """Once at the start of stage 2: :func:`convert_heads_to_lws` (``mode`` = mislas/lws/crt),
    :func:`freeze_backbone`, and optionally :func:`reset_bn_running_stats`.  Returns ``model``."""
    convert_heads_to_lws(model, mode)
    freeze_backbone(model)
    if reset_bn_stats:
        reset_bn_running_stats(model)
    return model


def stage2_param_groups(model: nn.Module, lr: float, delta_lr_factor: float = 1.0,
                        weight_decay: float = 0.0) -> list[dict]:
    """Optimizer param groups for stage 2: every trainable ``dW`` tensor of the LWS heads at
    ``lr * delta_lr_factor`` (MiSLAS trains dW with its own learning rate), every other trainable
    parameter (``s``) at ``lr``; both with ``weight_decay``.  Frozen parameters are left out and
    empty groups dropped.  Groups carry a ``name`` (``'scale'`` / ``'delta'``)."""
    if lr < 0 or delta_lr_factor < 0 or weight_decay < 0:
        raise BalpoeError(f"stage-2 lr, delta_lr_factor and weight_decay must be >= 0, "
                          f"got {lr}, {delta_lr_factor}, {weight_decay}")
    delta_ids = {id(p) for head in _lws_heads(model) for p in head.delta_parameters()}
    delta, rest = [], []
    for p in model.parameters():
        if p.requires_grad:
            (delta if id(p) in delta_ids else rest).append(p)
    groups = [{"name": "scale", "params": rest, "lr": lr, "weight_decay": weight_decay},
              {"name": "delta", "params": delta, "lr": lr * delta_lr_factor, "weight_decay": weight_decay}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise BalpoeError("stage 2 has no trainable parameters; call prepare_stage2(model, mode) first")
    return groups
