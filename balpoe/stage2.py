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

End to end (the trainer, when ``recipe.stage == 2``; ``balpoe train STAGE2_RECIPE`` on the CLI)::

    model = build_stage2_model(recipe, bundle)              # stage-1 checkpoint -> Eq. 4 heads
    criterion = build_stage2_criterion(recipe, bundle.class_counts)
    groups = stage2_param_groups(model, lr, recipe.stage2.delta_lr_factor, wd)

* The stage-1 checkpoint is ``stage2.init_checkpoint`` (a path relative to the working directory,
  like ``data.root``; ``--set stage2.init_checkpoint=PATH`` overrides it).  The network is rebuilt
  from the *checkpoint's own* ``model`` and ``loss`` sections: a stage-2 recipe leaves them out
  (they are copied into the resolved recipe, and a message says so) or repeats them exactly; a
  stage-2 ``model``/``loss`` section that disagrees with the checkpoint is an error naming the key.
  The stage-2 data must give the checkpoint's class counts (same dataset and LT split).
* Stage 2 must train on the class-balanced stream: a stage-2 recipe has to say
  ``data.sampler: class_balanced`` (validated here, not silently defaulted, so the sampler a run
  used is always the one its ``recipe.yaml`` shows).  Mixup off (``train.mixup_alpha: 0``), a
  cosine schedule over the stage-2 epochs and no warmup are what the shipped ``recipes/mislas``
  stage-2 recipes set (MiSLAS Table 5); they are recipe values, not enforced.
* Differences from the official MiSLAS code, on purpose: it fine-tunes ``W`` itself at
  ``lr * lr_factor`` with weight decay pulling ``W`` to 0, here ``dW`` (init 0) is learnt at that
  rate and weight decay pulls ``dW`` to 0, i.e. towards the stage-1 classifier (Eq. 4 as written).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Sequence

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from balpoe.checkpoint import load_checkpoint
from balpoe.errors import BalpoeError
from balpoe.losses.las import ExpertLabelAwareSmoothingLoss
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


# ------------------------------------------------------------------------------------------------
# End to end: recipe + stage-1 checkpoint -> stage-2 model and loss


def load_init_checkpoint(path: str | None) -> dict:
    """The stage-1 checkpoint named by ``stage2.init_checkpoint``; every failure is a one-line
    :class:`BalpoeError` naming the key and the path."""
    key = "recipe key 'stage2.init_checkpoint'"
    if not path:
        raise BalpoeError(f"{key} is required when stage is 2 (the stage-1 run's last.pt)")
    try:
        ckpt = load_checkpoint(path)
    except BalpoeError as e:
        raise BalpoeError(f"{key}: {e} (train stage 1 first, or pass --set stage2.init_checkpoint=PATH)") from None
    from balpoe.recipe import recipe_from_dict
    try:
        stage = recipe_from_dict(ckpt["recipe"]).stage
    except (BalpoeError, KeyError, TypeError) as e:
        raise BalpoeError(f"{key}: checkpoint '{path}' holds no valid recipe ({e})") from None
    if stage != 1:
        raise BalpoeError(f"{key}: '{path}' is a stage-{stage} checkpoint; point it at a stage-1 run's last.pt")
    return ckpt


def _first_difference(a, b, prefix: str) -> tuple[str, object, object]:
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if x != y:
            return f"{prefix}.{f.name}", x, y
    return prefix, a, b


def adopt_stage1_sections(recipe, stage1, path: str) -> list[str]:
    """Make ``recipe.model`` and ``recipe.loss`` those of the stage-1 recipe (in place): a section
    the stage-2 recipe left at its defaults is copied, an identical one kept, a different one is a
    :class:`BalpoeError` naming the first differing key.  Returns the names of the copied sections."""
    taken = []
    for section in ("model", "loss"):
        mine, theirs = getattr(recipe, section), getattr(stage1, section)
        if mine == theirs:
            continue
        if mine == type(mine)():  # not set in the stage-2 recipe
            setattr(recipe, section, copy.deepcopy(theirs))
            taken.append(section)
            continue
        key, x, y = _first_difference(mine, theirs, section)
        raise BalpoeError(f"recipe key '{key}' is {x!r} in the stage-2 recipe but {y!r} in the stage-1 checkpoint "
                          f"'{path}'; drop the '{section}' section from the stage-2 recipe (stage 2 takes it from "
                          f"the checkpoint)")
    return taken


def check_stage2_data(recipe, bundle, ckpt: dict, path: str) -> None:
    """The stage-2 data must be the stage-1 data (classes, channels, LT counts), sampled class-balanced."""
    if recipe.data.sampler != "class_balanced":
        raise BalpoeError(f"recipe key 'data.sampler' is {recipe.data.sampler!r} but stage 2 re-trains the classifier "
                          "on the class-balanced stream (MiSLAS Sec. 3.3); set data.sampler: class_balanced")
    if ckpt["num_classes"] != bundle.num_classes or ckpt["in_chans"] != bundle.in_chans:
        raise BalpoeError(f"recipe key 'data.dataset': the stage-2 data has {bundle.num_classes} classes and "
                          f"{bundle.in_chans} channels, the stage-1 checkpoint '{path}' {ckpt['num_classes']} and "
                          f"{ckpt['in_chans']}")
    counts = [int(c) for c in bundle.class_counts.tolist()]
    if list(ckpt["class_counts"]) != counts:
        raise BalpoeError(f"recipe key 'data': the stage-2 training split's class counts differ from those of the "
                          f"stage-1 checkpoint '{path}' (use the stage-1 data.dataset, imb_factor, imb_profile and "
                          "holdout_fraction)")


def _stage1_architecture(recipe, num_classes: int, in_chans: int) -> nn.Module:
    """The stage-1 network of ``recipe.model`` (weights come from a checkpoint, so no pretrained file)."""
    from balpoe.trainer import build_model
    arch = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, pretrained_file=None))
    return build_model(arch, num_classes, in_chans)


def build_stage2_model(recipe, bundle=None, ckpt: dict | None = None) -> nn.Module:
    """The stage-2 network, ready to train (or to receive a stage-2 state dict).

    * Training (``bundle`` given, ``ckpt`` None): load ``recipe.stage2.init_checkpoint`` (a stage-1
      checkpoint), take its ``model``/``loss`` sections into ``recipe`` (:func:`adopt_stage1_sections`;
      in place, so the saved stage-2 recipe is self-contained), check the data
      (:func:`check_stage2_data`), rebuild the stage-1 network from the checkpoint's recipe, load its
      weights, then :func:`prepare_stage2` with ``recipe.stage2.classifier`` (Eq. 4 heads around the
      stage-1 heads, backbone frozen).
    * Evaluation (``ckpt`` = a *stage-2* checkpoint, ``bundle`` unused): rebuild the same
      architecture from the checkpoint alone (its resolved recipe, ``num_classes``, ``in_chans``);
      the caller then loads ``ckpt["model"]``.  The stage-1 file is not needed.
    """
    if ckpt is not None:
        model = _stage1_architecture(recipe, ckpt["num_classes"], ckpt["in_chans"])
        return prepare_stage2(model, mode=recipe.stage2.classifier)
    if bundle is None:
        raise BalpoeError("build_stage2_model needs the data bundle (training) or a stage-2 checkpoint (evaluation)")
    path = recipe.stage2.init_checkpoint
    init = load_init_checkpoint(path)
    from balpoe import distributed as dist
    from balpoe.recipe import recipe_from_dict
    stage1 = recipe_from_dict(init["recipe"])
    taken = adopt_stage1_sections(recipe, stage1, path)
    check_stage2_data(recipe, bundle, init, path)
    if taken and dist.rank() == 0:
        from balpoe.console import console
        console.print(f"stage 2: {' and '.join(taken)} section{'s' if len(taken) > 1 else ''} taken from the "
                      f"stage-1 checkpoint '{path}' (backbone {recipe.model.backbone}, "
                      f"{recipe.model.num_experts} expert(s), {recipe.model.head} head)")
    model = _stage1_architecture(recipe, init["num_classes"], init["in_chans"])
    try:
        model.load_state_dict(init["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise BalpoeError(f"recipe key 'stage2.init_checkpoint': the weights in '{path}' do not fit its own "
                          f"model section ({first})") from None
    return prepare_stage2(model, mode=recipe.stage2.classifier)


def stage2_expert_offsets(taus: Sequence[float], mode: str = "relative") -> list[float]:
    """Per-expert logit offsets ``delta_k`` of the stage-2 loss ``LAS(f_k + delta_k log pi, y)``.

    Why.  Fitting ``softmax(f + delta log pi)`` to a stream whose class prior is ``rho`` makes
    ``f = log p(x|y) + log rho - delta log pi``: the raw logits keep the prior ``rho * pi^-delta``.
    Stage 1 samples instance-balanced (``rho = pi``) with ``delta = tau_k``, so BalPoE expert k
    ends with the prior ``pi^(1 - tau_k)`` (tau 0: head expert, 1: balanced, 2: tail expert) and
    the ensemble (mean logits) with ``pi^(1 - mean tau)``.  Stage 2 samples class-balanced
    (``rho = 1``): the sampler already removes one power of ``pi``.

    * ``relative`` (default): ``delta_k = tau_k - mean(tau)``.  Expert k ends with the prior
      ``pi^(mean tau - tau_k)``: the ensemble is balanced after stage 2 (the point of MiSLAS' class-
      balanced re-training) and every expert keeps its offset from it, so with a balanced BalPoE
      (mean tau = 1) each expert keeps exactly its stage-1 target ``pi^(1 - tau_k)``.  For E = 1
      the offset is 0 whatever tau is: MiSLAS' stage 2 is exactly LAS.
    * ``absolute``: ``delta_k = tau_k``, the stage-1 loss' adjustment.  Under class-balanced
      sampling expert k then ends with ``pi^-tau_k``: every expert moves one power of ``pi`` towards
      the tail and a balanced BalPoE ensemble ends at ``pi^-1`` (over-corrected).  Kept for the
      comparison in ``benchmarks/mislas_fmnist.py``.  E = 1 with tau 0 is LAS as well.
    * ``none``: ``delta_k = 0``; every expert is re-balanced (``pi^0``), the experts' diversity in
      bias is lost.
    """
    taus = [float(t) for t in taus]
    if not taus:
        raise BalpoeError("stage 2 needs at least one expert tau")
    if mode == "relative":
        mean = sum(taus) / len(taus)
        return [t - mean for t in taus]
    if mode == "absolute":
        return list(taus)
    if mode == "none":
        return [0.0] * len(taus)
    raise BalpoeError(f"recipe key 'stage2.expert_adjust' must be one of relative, absolute, none; got {mode!r}")


def build_stage2_criterion(recipe, class_counts: torch.Tensor | Sequence[int]) -> nn.Module:
    """The stage-2 loss: label-aware smoothing (MiSLAS Eq. 1, 3) of each expert's logits plus its
    offset from :func:`stage2_expert_offsets` (``recipe.stage2.expert_adjust``), mean over experts.
    ``eps_1 = eps_k = 0`` is cross-entropy; E = 1 is exactly :class:`LabelAwareSmoothingLoss`.
    The expert taus come from ``recipe.loss`` -- after :func:`build_stage2_model`, the stage-1
    checkpoint's."""
    from balpoe.trainer import expert_taus
    s = recipe.stage2
    offsets = stage2_expert_offsets(expert_taus(recipe), s.expert_adjust)
    if len(offsets) != recipe.model.num_experts:
        raise BalpoeError(f"recipe key 'loss.tau' gives {len(offsets)} experts but model.num_experts is "
                          f"{recipe.model.num_experts}")
    try:
        return ExpertLabelAwareSmoothingLoss(class_counts, offsets, s.eps_1, s.eps_k, s.las_form, s.las_power)
    except BalpoeError as e:
        raise BalpoeError(f"recipe section 'stage2' (eps_1, eps_k, las_form, las_power): {e}") from None
