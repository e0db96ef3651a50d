"""Batched experts: E identical expert branches evaluated as one network of grouped convolutions.

A speed lever for launch-bound GPU steps: one kernel per layer for all experts instead of a Python
loop over them, with each expert keeping its own batch-norm statistics.  Expert ``k``'s channels
occupy the ``k``-th block of every feature map (layout ``b (e c) h w``):

* ``Conv2d(cin, cout, groups=g)`` of each expert -> one ``Conv2d(E*cin, E*cout, groups=E*g)``
  whose weight is the experts' weights concatenated along the output dimension (a grouped
  convolution never mixes groups, so expert ``k`` only sees its own block);
* ``BatchNorm2d(c)`` -> ``BatchNorm2d(E*c)``: BN statistics are per channel over (batch, h, w), so
  every expert keeps its own batch statistics, running statistics and affine parameters, exactly
  as with E separate BN layers (same momentum, same ``num_batches_tracked``);
* channel-wise modules (activations, pooling, dropout, identity) are used unchanged;
* the option-A shortcut pads channels *within* each expert's block (:class:`GroupedShortcutA`).

The shared trunk's output is repeated E times along channels on entry; the pooled output
``[B, E*D]`` is returned as ``[E, B, D]``.  Only modules whose forward is known to be channel-wise
or group-local are accepted (an allow-list): a module that mixes channels, or draws one random
mask per sample (drop-path, drop-block: the experts would share masks), is a one-line
:class:`~balpoe.errors.BalpoeError`.

State dicts keep the per-expert layout: :class:`GroupedBranches` saves and loads the keys an
``nn.ModuleList`` of the E branches would have (``0.layer2.0.conv1.weight``, ...), so a
checkpoint trained with ``model.batched_experts: true`` loads into the looped model and back.
Optimizer state follows the parameters, so resuming must keep the same setting.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from timm.layers import SelectAdaptivePool2d

from balpoe.errors import BalpoeError
from balpoe.models.resnet_cifar import BasicBlockA, ShortcutA

# Modules whose forward acts on each channel independently: reused as they are.
CHANNELWISE = (nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Sigmoid, nn.Tanh,
               nn.Dropout, nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten)
# Containers whose forward only chains their children (plus residual additions): grouped child by child.
CONTAINERS: tuple[type, ...] = (nn.Sequential, BasicBlockA)
try:  # timm's ResNet / ResNeXt blocks (forward: convs, BN, activations, optional downsample, residual add)
    from timm.models.resnet import BasicBlock as _TimmBasic
    from timm.models.resnet import Bottleneck as _TimmBottleneck
    CONTAINERS += (_TimmBasic, _TimmBottleneck)
except ImportError:  # pragma: no cover - older timm
    pass
# Pool types of SelectAdaptivePool2d that keep one output per channel ('catavgmax' doubles them).
_POOLS = ("avg", "max", "avgmax", "fast", "fastavg", "fastmax")


class GroupedShortcutA(nn.Module):
    """Option-A shortcut for E experts: subsample by 2 and zero-pad each expert's channel block."""

    def __init__(self, shortcut: ShortcutA, num_experts: int):
        super().__init__()
        self.pad, self.num_experts = shortcut.pad, num_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = rearrange(x[:, :, ::2, ::2], "b (e c) h w -> b e c h w", e=self.num_experts)
        return rearrange(F.pad(x, (0, 0, 0, 0, *self.pad)), "b e c h w -> b (e c) h w")


def group_conv2d(convs: list[nn.Conv2d]) -> nn.Conv2d:
    """E convolutions of one shape -> one grouped convolution (weights concatenated along dim 0)."""
    c, e = convs[0], len(convs)
    if c.padding_mode != "zeros":
        raise BalpoeError(f"model.batched_experts: Conv2d with padding_mode={c.padding_mode!r} is not supported")
    out = nn.Conv2d(e * c.in_channels, e * c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation,
                    groups=e * c.groups, bias=c.bias is not None, device=c.weight.device, dtype=c.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(torch.cat([m.weight for m in convs]))
        if c.bias is not None:
            out.bias.copy_(torch.cat([m.bias for m in convs]))
    return out


def group_batchnorm2d(bns: list[nn.BatchNorm2d]) -> nn.BatchNorm2d:
    """E BatchNorm2d(c) -> one BatchNorm2d(E*c): the same per-channel (hence per-expert) statistics."""
    b, e = bns[0], len(bns)
    tensors = [*b.parameters(), *b.buffers()]
    out = nn.BatchNorm2d(e * b.num_features, b.eps, b.momentum, b.affine, b.track_running_stats,
                         device=tensors[0].device if tensors else None)
    with torch.no_grad():
        if b.affine:
            out.weight.copy_(torch.cat([m.weight for m in bns]))
            out.bias.copy_(torch.cat([m.bias for m in bns]))
        if b.track_running_stats:
            out.running_mean.copy_(torch.cat([m.running_mean for m in bns]))
            out.running_var.copy_(torch.cat([m.running_var for m in bns]))
            out.num_batches_tracked.copy_(bns[0].num_batches_tracked)
    return out


def group_modules(mods: list[nn.Module], path: str = "") -> nn.Module:
    """The grouped twin of E structurally identical modules (see the module docstring)."""
    first, where = mods[0], f" at '{path}'" if path else ""
    kind = type(first)
    if any(type(m) is not kind for m in mods):
        raise BalpoeError(f"model.batched_experts: the expert branches differ{where}")
    if kind is nn.Conv2d:
        return group_conv2d(mods)
    if kind is nn.BatchNorm2d:
        return group_batchnorm2d(mods)
    if kind is ShortcutA:
        return GroupedShortcutA(first, len(mods))
    if kind is SelectAdaptivePool2d and first.pool_type in _POOLS:
        return copy.deepcopy(first)
    if kind in CHANNELWISE:
        return copy.deepcopy(first)
    if kind in CONTAINERS:
        if list(first.parameters(recurse=False)) or list(first.buffers(recurse=False)):
            raise BalpoeError(f"model.batched_experts: {kind.__name__}{where} holds its own tensors")
        out = copy.deepcopy(first)  # same attributes (flags, callables); children replaced below
        for name, _ in first.named_children():
            setattr(out, name, group_modules([m.get_submodule(name) for m in mods], f"{path}.{name}".lstrip(".")))
        return out
    raise BalpoeError(f"model.batched_experts: {kind.__name__}{where} has no grouped form (supported: Conv2d, "
                      "BatchNorm2d, channel-wise activations/pooling/dropout, Sequential and ResNet blocks); "
                      "set model.batched_experts: false")


class GroupedBranches(nn.Module):
    """E expert branches run as one grouped network: ``[B, C, H, W]`` (shared) -> ``[E, B, D]``.

    Numerically the looped branches (up to float summation order), with the looped state-dict keys.
    """

    def __init__(self, branches: list[nn.Module]):
        super().__init__()
        if len(branches) < 1:
            raise BalpoeError("model.batched_experts needs at least one expert branch")
        shapes = [[(k, tuple(v.shape)) for k, v in b.state_dict().items()] for b in branches]
        if any(s != shapes[0] for s in shapes):
            raise BalpoeError("model.batched_experts: the expert branches have different parameters")
        self.num_experts = len(branches)
        self.body = group_modules(list(branches))
        # public since torch 2.5; the private twin (same signature) before that
        (getattr(self, "register_state_dict_post_hook", None) or self._register_state_dict_hook)(_per_expert_state_dict)
        self.register_load_state_dict_pre_hook(_grouped_state_dict)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        x = x.repeat(1, self.num_experts, *([1] * (x.dim() - 2)))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.body(x)
        if out.dim() != 2:
            raise BalpoeError(f"model.batched_experts: the expert branch must end in a flattening pooling layer, "
                              f"got an output of shape {tuple(out.shape)}")
        return rearrange(out, "b (e d) -> e b d", e=self.num_experts)


def _per_expert_state_dict(module: GroupedBranches, state_dict: dict, prefix: str, local_metadata) -> None:
    """``body.<name>`` -> ``<k>.<name>`` for each expert k (dim-0 blocks; 0-d tensors copied)."""
    body, e = prefix + "body.", module.num_experts
    grouped = [(key[len(body):], state_dict.pop(key)) for key in [k for k in state_dict if k.startswith(body)]]
    parts = [(name, value.chunk(e) if value.dim() else [value] * e) for name, value in grouped]
    for k in range(e):  # expert-major, the order of the looped model's keys
        for name, chunks in parts:
            state_dict[f"{prefix}{k}.{name}"] = chunks[k]


def _grouped_state_dict(module: GroupedBranches, state_dict: dict, prefix: str, local_metadata, strict,
                        missing_keys, unexpected_keys, error_msgs) -> None:
    """Inverse of :func:`_per_expert_state_dict`, applied before loading (per-expert keys -> ``body.``)."""
    for name, own in module.body.state_dict().items():
        keys = [f"{prefix}{k}.{name}" for k in range(module.num_experts)]
        if not all(k in state_dict for k in keys):
            continue
        parts = [state_dict.pop(k) for k in keys]
        state_dict[f"{prefix}body.{name}"] = torch.cat(parts) if own.dim() else parts[0]
