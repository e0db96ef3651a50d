"""MiSLAS stage 2 (Zhong et al. CVPR 2021, Sec. 3.2-3.3): freeze the backbone, learn the Eq. 4
classifier (:class:`~balpoe.models.lws.LWSDeltaHead`) on the class-balanced stream, and shift
the BatchNorm statistics to that stream (Eq. 5-6).

Per stage 2 (the trainer's order)::

    prepare_stage2(model, mode="mislas")           # once: Eq. 4 heads, frozen backbone
    opt = SGD(model.param_groups(lr, wd, delta_lr_factor), momentum=0.9)
    for epoch ...:
        set_stage2_mode(model, shifted_bn=True)    # instead of model.train()
        ...
        model.eval()                               # for evaluation, as usual

Shifted BN (Eq. 5-6): BN layers run in train mode, so each forward normalises with the batch
statistics of the class-balanced batch and updates ``running_mean``/``running_var`` (default
momentum, as in the paper), while their affine ``weight``/``bias`` (alpha, beta) stay frozen.

From a recipe (``stage: 2``; :func:`balpoe.training.build.build_plan`):

* The stage-1 checkpoint is ``stage2.init_checkpoint``.  The network is rebuilt from the
  *checkpoint's own* ``model`` and ``loss`` sections: a stage-2 recipe leaves them out (they are
  copied into the resolved recipe, :func:`adopt_stage1_sections`) or repeats them exactly; a
  stage-2 ``model``/``loss`` section that disagrees with the checkpoint is an error naming the key.
  The stage-2 data must give the checkpoint's class counts (:func:`check_stage2_data`).
* Stage 2 must train on a class-balanced stream: a stage-2 recipe has to say
  ``data.sampler: class_aware`` (the official MiSLAS sampler) or ``class_balanced`` (validated, not
  silently defaulted, so the sampler a run used is always the one its ``recipe.yaml`` shows).  Mixup off, a cosine schedule over the stage-2 epochs
  and no warmup are what the shipped ``recipes/mislas`` stage-2 recipes set (MiSLAS Table 5).
* Weight decay (``stage2.weight_decay_target``): the official MiSLAS code fine-tunes ``W`` itself at
  ``lr * lr_factor`` with weight decay pulling ``W`` to 0 (``zero``, what the shipped MiSLAS recipes
  set); with ``stage1`` (the default, Eq. 4 as written) ``dW`` (init 0) is learnt at that rate and
  weight decay pulls ``dW`` to 0, i.e. towards the stage-1 classifier.
"""

from __future__ import annotations

import copy
import dataclasses

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


def prepare_stage2(model: nn.Module, mode: str = "mislas", weight_decay_target: str = "stage1") -> nn.Module:
    """Once at the start of stage 2: :func:`~balpoe.models.lws.convert_heads_to_lws` (``mode`` =
    mislas / lws / crt; ``weight_decay_target`` = stage1 / zero) and :func:`freeze_backbone`.
    Returns ``model``."""
    convert_heads_to_lws(model, mode, weight_decay_target)
    return freeze_backbone(model)


def _first_difference(a, b, prefix: str) -> tuple[str, object, object]:
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if x != y:
            return f"{prefix}.{f.name}", x, y
    return prefix, a, b


def adopt_stage1_sections(recipe, stage1, path: str):
    """``(new recipe, taken)``: ``recipe`` with the ``model`` and ``loss`` sections of the stage-1
    recipe.  A section the stage-2 recipe left at its defaults is copied, an identical one kept, a
    different one is a :class:`BalpoeError` naming the first differing key.  ``taken`` names the
    copied sections.  ``recipe`` itself is not changed."""
    taken, changes = [], {}
    for section in ("model", "loss"):
        mine, theirs = getattr(recipe, section), getattr(stage1, section)
        if mine == theirs:
            continue
        if mine == type(mine)():
            changes[section] = copy.deepcopy(theirs)
            taken.append(section)
            continue
        key, x, y = _first_difference(mine, theirs, section)
        raise BalpoeError(f"recipe key '{key}' is {x!r} in the stage-2 recipe but {y!r} in the stage-1 checkpoint "
                          f"'{path}'; drop the '{section}' section from the stage-2 recipe (stage 2 takes it from "
                          f"the checkpoint)")
    return dataclasses.replace(recipe, **changes), taken


def check_stage2_data(sampler: str, num_classes: int, in_chans: int, class_counts, ckpt: dict, path: str) -> None:
    """The stage-2 data must be the stage-1 data (classes, channels, LT counts), sampled class-balanced."""
    if sampler not in ("class_balanced", "class_aware"):
        raise BalpoeError(f"recipe key 'data.sampler' is {sampler!r} but stage 2 re-trains the classifier "
                          "on the class-balanced stream (MiSLAS Sec. 3.3); set data.sampler: class_aware or class_balanced")
    if ckpt["num_classes"] != num_classes or ckpt["in_chans"] != in_chans:
        raise BalpoeError(f"recipe key 'data.dataset': the stage-2 data has {num_classes} classes and "
                          f"{in_chans} channels, the stage-1 checkpoint '{path}' {ckpt['num_classes']} and "
                          f"{ckpt['in_chans']}")
    counts = [int(c) for c in class_counts]
    if list(ckpt["class_counts"]) != counts:
        raise BalpoeError(f"recipe key 'data': the stage-2 training split's class counts differ from those of the "
                          f"stage-1 checkpoint '{path}' (use the stage-1 data.dataset, imb_factor, imb_profile and "
                          "holdout_fraction)")
