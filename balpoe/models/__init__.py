"""Models: the multi-expert network, grouped (batched) experts, heads, the MiSLAS Eq. 4 head, and
the CIFAR / small backbones (registered in timm's model registry).  To add a backbone, register a
timm model (``@timm.models.register_model``) and name it in ``model.backbone``."""

from balpoe.models.heads import CosineHead, LinearHead, build_head
from balpoe.models.lws import LWSDeltaHead, convert_heads_to_lws
from balpoe.models.build import build_multi_expert, split_children
from balpoe.models.multi_expert import MultiExpertNet

__all__ = ["CosineHead", "LWSDeltaHead", "LinearHead", "MultiExpertNet", "build_head", "build_multi_expert",
           "convert_heads_to_lws", "split_children"]
