"""Models: the multi-expert network, heads and the CIFAR / small backbones (registered in timm)."""

from balpoe.models.heads import CosineHead, LinearHead, build_head
from balpoe.models.lws import LWSDeltaHead, convert_heads_to_lws
from balpoe.models.multi_expert import MultiExpertNet, build_multi_expert, split_children

__all__ = ["CosineHead", "LWSDeltaHead", "LinearHead", "MultiExpertNet", "build_head", "build_multi_expert",
           "convert_heads_to_lws", "split_children"]
