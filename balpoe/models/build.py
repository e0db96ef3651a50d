"""Recipe ``model`` section -> :class:`~balpoe.models.multi_expert.MultiExpertNet`."""

from __future__ import annotations

from balpoe.models.lws import convert_heads_to_lws
from balpoe.models.multi_expert import MultiExpertNet, build_multi_expert


def build_model(cfg, num_classes: int, in_chans: int, *, stage2_classifier: str | None = None,
                pretrained: bool = True) -> MultiExpertNet:
    """The multi-expert network of the recipe's ``model`` section ``cfg``.

    ``stage2_classifier`` (``mislas`` / ``lws`` / ``crt``) replaces the heads by MiSLAS Eq. 4
    heads, the architecture of a stage-2 checkpoint.  ``pretrained=False`` skips
    ``model.pretrained_file`` (weights that come from a checkpoint anyway)."""
    model = build_multi_expert(cfg.backbone, num_classes, cfg.num_experts, cfg.split, cfg.head, cfg.scale, in_chans,
                               cfg.pretrained_file if pretrained else None, cfg.kwargs, batched=cfg.batched_experts)
    if stage2_classifier is not None:
        convert_heads_to_lws(model, stage2_classifier)
    return model
