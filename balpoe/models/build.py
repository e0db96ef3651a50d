"""Building the multi-expert network: from a timm model name and a split
(:func:`build_multi_expert`), and from a recipe's ``model`` section (:func:`build_model`).

* ``split="head"``: the whole timm backbone (features + pooling) is shared, each expert owns a
  head.  Works for every timm model.
* ``split="<stage>"``: the top-level children up to and including ``<stage>`` are shared; each
  expert owns its own copy of the later stages (:func:`split_children`), checked with a dummy batch
  (:func:`check_split_forward`).
* The backbone's initial weights: timm's pretrained weights, or a local file
  (:mod:`balpoe.models.weights`); ``model.reinit`` / ``model.trainable`` re-initialise and freeze
  named modules (:func:`reinit_modules`, :func:`freeze_except`).
"""

from __future__ import annotations

from collections import OrderedDict

import timm
import torch
import torch.nn as nn

from balpoe.errors import BalpoeError, clip
from balpoe.models.grouped import GroupedBranches
from balpoe.models.heads import LinearHead, build_head, init_linear_head
from balpoe.models.lws import convert_heads_to_lws
from balpoe.models.multi_expert import MultiExpertNet
from balpoe.models.resnet_cifar import reduced_widths
from balpoe.models.weights import WeightMatch, load_weights, read_weights
from balpoe.recipe import ModelConfig
from balpoe.runtime import distributed as dist
from balpoe.runtime.console import console

# Importing registers our models in timm's registry.
from balpoe.models import resnet_cifar as _resnet_cifar  # noqa: F401
from balpoe.models import small_cnn as _small_cnn  # noqa: F401




def _module_named(model: nn.Module, name: str, key: str, backbone: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        tops = ", ".join(n for n, _ in model.named_children())
        raise BalpoeError(f"recipe key '{key}' names {name!r}, not a module of backbone '{backbone}' (dotted names "
                          f"such as layer4.2; top-level: {clip(tops, 200)})") from None


def reinit_modules(model: nn.Module, names: list[str], backbone: str = "") -> None:
    """Re-initialise the modules ``names`` (recipe ``model.reinit``) of a backbone: every layer under
    them gets torch's default initialisation (``reset_parameters``; BN statistics reset too), as a
    block built on its own, e.g. the official MiSLAS Places-LT ``Bottleneck(2048, 512)`` added after
    the pretrained ResNet-152."""
    for name in names:
        for m in _module_named(model, name, "model.reinit", backbone).modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()


def freeze_except(model: nn.Module, trainable: list[str], backbone: str = "") -> list[nn.Module]:
    """Freeze every parameter of a backbone outside the modules ``trainable`` (recipe
    ``model.trainable``; dotted module names) and return the modules wholly outside them, which
    :meth:`MultiExpertNet.train` keeps in eval mode.  ``trainable`` empty: nothing is frozen."""
    if not trainable:
        return []
    for name in trainable:
        _module_named(model, name, "model.trainable", backbone)
    under = lambda n: any(n == t or n.startswith(t + ".") for t in trainable)  # noqa: E731
    above = lambda n: any(t.startswith(n + ".") for t in trainable)  # noqa: E731
    for name, p in model.named_parameters():
        p.requires_grad_(under(name))
    return [m for n, m in model.named_modules() if n and not under(n) and not above(n)]


def check_backbone(name: str) -> None:
    """``name`` is in timm's model registry (one-line error otherwise)."""
    if not isinstance(name, str) or not timm.is_model(name):
        raise BalpoeError(f"model.backbone '{clip(name, 120)}' is not a timm model name (see timm.list_models())")


def _create_backbone(name: str, in_chans: int, kwargs: dict, pretrained: bool = False) -> nn.Module:
    check_backbone(name)
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, in_chans=in_chans, **kwargs)
    except TypeError as e:
        if "zero_init_last" in str(e):
            raise BalpoeError(f"model.zero_init_last is not accepted by timm model '{name}' (a timm ResNet option; "
                              "use null for other backbones)") from None
        raise BalpoeError(f"model.kwargs not accepted by timm model '{name}': {clip(e)}") from None
    except Exception as e:  # noqa: BLE001 - a kwarg value the model cannot build with is a user error
        if pretrained:  # no network (hub / HTTP errors), no such weights, or a bad cached file
            raise BalpoeError(f"model.pretrained: timm could not load the pretrained weights of '{name}' "
                              f"({type(e).__name__}: {clip(e, 150)}); without network access, download them where "
                              "there is one and set model.pretrained_file to the local file instead") from None
        if not kwargs:
            raise
        raise BalpoeError(f"model.kwargs not accepted by timm model '{name}': {type(e).__name__}: {clip(e)}") from None
    return model


def split_children(model: nn.Module, split: str) -> tuple[nn.Sequential, nn.Sequential]:
    """Split a model whose top-level children run in forward order after the child ``split``."""
    children = list(model.named_children())
    names = [n for n, _ in children]
    if split not in names:
        raise BalpoeError(f"model.split '{clip(split, 80)}' is not a top-level stage of this backbone "
                          f"(choose 'head' or one of: {clip(', '.join(names), 200)})")
    i = names.index(split)
    tail = children[i + 1:]
    # timm applies ``drop_rate`` functionally inside ``forward_head`` (before the classifier), not as a
    # child module: keep it as an explicit Dropout after the pooling so splitting does not drop it.
    drop = float(getattr(model, "drop_rate", 0.0) or 0.0)
    if drop > 0:
        pos = next((j for j, (n, _) in enumerate(tail) if n in ("fc", "head", "classifier")), len(tail))
        tail.insert(pos, ("head_drop", nn.Dropout(drop)))
    return nn.Sequential(OrderedDict(children[: i + 1])), nn.Sequential(OrderedDict(tail))


def probe_sizes(model: nn.Module, kwargs: dict) -> list[tuple[int, int]]:
    """Spatial sizes of the dummy batch that checks a split, in the order tried: ``img_size`` of the
    kwargs or, for a timm model with ``pretrained_cfg["fixed_input_size"]`` (ViT, Swin), its
    ``pretrained_cfg["input_size"]``; otherwise 32x32 (cheap: CIFAR / small backbones, and any
    convnet), then ``input_size`` where the model has one (for convnets that need larger images)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = kwargs.get("img_size")
    if size is None and cfg.get("fixed_input_size"):
        size = cfg.get("input_size")
    sizes = []
    for s in ([size] if size is not None else [(32, 32), cfg.get("input_size")]):
        try:
            hw = (int(s), int(s)) if isinstance(s, int) else tuple(int(v) for v in s[-2:])
        except (TypeError, ValueError, IndexError):
            continue
        if len(hw) == 2 and hw not in sizes:
            sizes.append(hw)
    return sizes or [(32, 32)]


def check_split_forward(trunk: nn.Module, branch: nn.Module, split: str, backbone: str, in_chans: int,
                        num_features: int, sizes: list[tuple[int, int]]) -> None:
    """A batch of two zero images ``[2, in_chans, H, W]`` through ``trunk`` and one expert
    ``branch`` gives pooled features ``[2, num_features]``; otherwise (the later top-level children
    do not run in forward order, or the forward fails at every size in ``sizes``) a one-line error
    naming ``model.split``.

    Runs on the CPU in eval mode without gradients and leaves the modules as it found them: their
    train/eval flags are restored, no BN statistics change (eval mode) and torch's global random
    state is saved and restored around it."""
    modules = [*trunk.modules(), *branch.modules()]
    flags = [m.training for m in modules]
    where = f"model.split '{clip(split, 80)}' for backbone '{backbone}'"
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            trunk.eval(), branch.eval()
            for i, size in enumerate(sizes):
                shape = [2, in_chans, *size]
                try:
                    out = branch(trunk(torch.zeros(shape)))
                    break
                except Exception as e:  # noqa: BLE001 - any failure means the split does not work here
                    if i + 1 == len(sizes):
                        raise BalpoeError(f"{where}: a {shape} batch through the shared stages and one expert branch "
                                          f"fails ({type(e).__name__}: {clip(e, 150)}); use model.split: head or "
                                          "another stage") from None
    finally:
        for m, flag in zip(modules, flags):
            m.training = flag
    got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != [2, num_features]:
        raise BalpoeError(f"{where}: the shared stages and one expert branch map a {shape} batch to {got}, not "
                          f"pooled features [2, {num_features}] (the later top-level children do not run in forward "
                          "order); use model.split: head or another stage")


def build_multi_expert(backbone: str, num_classes: int, num_experts: int = 3, split: str = "head",
                       head: str = "cosine", scale: float = 30.0, in_chans: int = 3,
                       pretrained_file: str | None = None, kwargs: dict | None = None,
                       batched: bool = False, pretrained: bool = False,
                       pretrained_strict: bool = True, zero_init_last: bool | None = None,
                       trainable: list[str] | None = None, reinit: list[str] | None = None) -> MultiExpertNet:
    """Build a :class:`MultiExpertNet` from a timm model name.

    The branches are built (and initialised) one by one in both modes, so a seed gives the same
    initial weights with ``batched`` on or off.  A stage split is checked with a dummy batch
    (:func:`check_split_forward`) before the other experts are built.

    Initial weights of the backbone (every expert's copy): timm's pretrained weights
    (``pretrained``), or a local ``pretrained_file`` (:func:`read_weights`) matched by name and
    shape (:func:`load_weights`; ``pretrained_strict``: refuse a partial match); what loaded is said
    in one console line.

    ``zero_init_last`` (timm ResNets; None = timm's default, True): the last BN weight of every
    residual branch starts at 0; False is torchvision's and the official BalPoE / MiSLAS ResNets'
    ``zero_init_residual=False`` (weight 1).  ``reinit`` (:func:`reinit_modules`) re-initialises
    backbone modules after the weights are loaded; ``trainable`` (:func:`freeze_except`) freezes the
    rest of every backbone copy (the heads always train)."""
    kwargs = dict(kwargs or {})
    if zero_init_last is not None:
        kwargs["zero_init_last"] = zero_init_last
    trainable, reinit = list(trainable or []), list(reinit or [])
    if trainable and batched:
        raise BalpoeError("model.trainable with model.batched_experts: the grouped branches do not keep frozen "
                          "parameters; set model.batched_experts: false")
    state = read_weights(pretrained_file) if pretrained_file else None
    frozen: list[nn.Module] = []

    def create() -> tuple[nn.Module, WeightMatch | None]:
        model = _create_backbone(backbone, in_chans, kwargs, pretrained)
        match = None if state is None else load_weights(model, state, pretrained_file, backbone, pretrained_strict)
        reinit_modules(model, reinit, backbone)
        frozen.extend(freeze_except(model, trainable, backbone))
        return model, match

    first, match = create()
    if match is not None and dist.rank() == 0:
        console.print(f"model.pretrained_file '{clip(str(pretrained_file), 200)}': {match.summary()}"
                      + (f", into each of the {num_experts} expert copies" if split != "head" and num_experts > 1
                         else ""), highlight=False, soft_wrap=True)
    # timm: pooled pre-logit width is ``head_hidden_size`` where a model has a pre-logits layer.
    num_features = getattr(first, "head_hidden_size", None) or first.num_features
    if split == "head":
        trunk, branches = first, [nn.Identity() for _ in range(num_experts)]
    else:
        trunk, tail = split_children(first, split)
        check_split_forward(trunk, tail, split, backbone, in_chans, num_features, probe_sizes(first, kwargs))
        branches = [tail]
        for _ in range(num_experts - 1):
            other, _ = create()
            branches.append(split_children(other, split)[1])
    heads = [build_head(head, num_features, num_classes, scale) for _ in range(num_experts)]
    if batched:
        if split == "head":
            raise BalpoeError("model.batched_experts needs model.split to name a backbone stage: with split 'head' "
                              "the experts own only their heads and there are no branches to batch")
        branches = GroupedBranches(branches)
    return MultiExpertNet(trunk, branches, heads, frozen=frozen)


def reduce_dimension(cfg: ModelConfig) -> bool:
    """``model.reduce_dimension``, checked: RIDE's reduced-width experts
    (:func:`~balpoe.models.resnet_cifar.reduced_widths`) exist for the CIFAR ResNets split after
    ``layer1`` (each expert owns ``layer2`` and ``layer3``), and set the widths themselves."""
    if not cfg.reduce_dimension:
        return False
    if not (cfg.backbone.startswith("resnet") and cfg.backbone.endswith("_cifar")):
        raise BalpoeError(f"recipe key 'model.reduce_dimension' applies to the CIFAR ResNets (resnet32_cifar, ...), "
                          f"not model.backbone '{clip(cfg.backbone, 120)}'")
    if cfg.split != "layer1":
        raise BalpoeError(f"recipe key 'model.reduce_dimension' needs model.split layer1 (each expert owns the "
                          f"reduced layer2 and layer3), got '{clip(cfg.split, 80)}'")
    if "widths" in cfg.kwargs:
        raise BalpoeError("recipe keys 'model.reduce_dimension' and 'model.kwargs' widths both set the widths: "
                          "set one")
    return True


def build_model(cfg: ModelConfig, num_classes: int, in_chans: int, *, stage2_classifier: str | None = None,
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
    kwargs = {**cfg.kwargs, "widths": list(reduced_widths())} if reduce_dimension(cfg) else cfg.kwargs
    model = build_multi_expert(cfg.backbone, num_classes, cfg.num_experts, cfg.split, cfg.head, cfg.scale, in_chans,
                               cfg.pretrained_file if pretrained else None, kwargs, batched=cfg.batched_experts,
                               pretrained=cfg.pretrained and pretrained, pretrained_strict=cfg.pretrained_strict,
                               zero_init_last=cfg.zero_init_last, trainable=cfg.trainable, reinit=cfg.reinit)
    for head in model.heads:
        if isinstance(head, LinearHead):
            init_linear_head(head, head_init)
    if stage2_classifier is not None:
        convert_heads_to_lws(model, stage2_classifier, stage2_weight_decay_target)
    return model
