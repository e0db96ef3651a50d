"""Recipe ``model`` section -> :class:`~balpoe.models.multi_expert.MultiExpertNet`."""

from __future__ import annotations

from balpoe.errors import BalpoeError
from balpoe.models.heads import LinearHead, init_linear_head
from balpoe.models.lws import convert_heads_to_lws
from balpoe.models.multi_expert import MultiExpertNet, build_multi_expert


def build_model(cfg, num_classes: int, in_chans: int, *, stage2_classifier: str | None = None,
                pretrained: bool = True, stage2_weight_decay_target: str = "stage1") -> MultiExpertNet:
    """The multi-expert network of the recipe's ``model`` section ``cfg``.

    ``model.head_init`` initialises the linear heads (:func:`~balpoe.models.heads.init_linear_head`:
    ``default`` keeps torch's, ``kaiming`` is the official MiSLAS CIFAR classifier's); a cosine head
    keeps its own initialisation, so ``kaiming`` with ``head: cosine`` is refused.
    ``stage2_classifier`` (``mislas`` / ``lws`` / ``crt``) replaces the heads by MiSLAS Eq. 4
    heads, the architecture of a stage-2 checkpoint (``stage2_weight_decay_target``: what its
    learnt tensors mean, :class:`~balpoe.models.lws.LWSDeltaHead`).  ``pretrained=False`` skips
    ``model.pretrained`` and ``model.pretrained_file`` (weights that come from a checkpoint anyway)."""
    head_init = cfg.head_init
    if head_init != "default" and cfg.head != "linear":
        raise BalpoeError(f"recipe key 'model.head_init' is {head_init!r} but model.head is {cfg.head!r}: the "
                          "init applies to linear heads (a cosine head has its own); use head_init: default")
    model = build_multi_expert(cfg.backbone, num_classes, cfg.num_experts, cfg.split, cfg.head, cfg.scale, in_chans,
                               cfg.pretrained_file if pretrained else None, cfg.kwargs, batched=cfg.batched_experts,
                               pretrained=cfg.pretrained and pretrained, pretrained_strict=cfg.pretrained_strict,
                               zero_init_last=cfg.zero_init_last, trainable=cfg.trainable, reinit=cfg.reinit)
    for head in model.heads:
        if isinstance(head, LinearHead):
            init_linear_head(head, head_init)
    if stage2_classifier is not None:
        convert_heads_to_lws(model, stage2_classifier, stage2_weight_decay_target)
    return model
