"""The multi-expert network: a shared trunk and E expert branches built from any timm model.

* ``split="head"``: the whole timm backbone (features + pooling) is shared, each expert owns a
  head. Works for every timm model.
* ``split="<stage>"``: the top-level children of the timm model up to and including ``<stage>``
  are shared; each expert owns its own copy of the later stages (and of the pooling), like BalPoE's
  ResNet-32 (shared stem + ``layer1``; per-expert ``layer2``, ``layer3``) and ResNet-50 (shared up
  to ``layer2``).  This needs a model whose top-level children run in forward order, which holds
  for timm's ResNet/ResNeXt family and for ``resnet32_cifar`` / ``small_cnn``.  Each expert's
  branch comes from an independently initialised copy of the model, as in the official code where
  every expert's layers are created separately.

With ``batched=True`` (recipe ``model.batched_experts``) the E branches run as one network of
grouped convolutions (:class:`~balpoe.models.grouped.GroupedBranches`): same maths, same
state-dict keys, one kernel per layer instead of E.

``forward`` returns per-expert logits ``[E, B, C]``; the ensemble logit is their mean
(BalPoE: the product of the experts' softmax distributions, re-normalised).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from pathlib import Path

import timm
import torch
import torch.nn as nn
from einops import rearrange
from safetensors.torch import load_file as load_safetensors

from balpoe.errors import BalpoeError, clip
from balpoe.models.grouped import GroupedBranches
from balpoe.models.heads import build_head
from balpoe.models.lws import LWSDeltaHead
from balpoe.runtime import distributed as dist
from balpoe.runtime.console import console

# Importing registers our models in timm's registry.
from balpoe.models import resnet_cifar as _resnet_cifar  # noqa: F401
from balpoe.models import small_cnn as _small_cnn  # noqa: F401


class MultiExpertNet(nn.Module):
    """Shared ``trunk`` -> per-expert ``branches[k]`` -> per-expert ``heads[k]``.

    ``branches`` is a list of modules (run in a loop) or one :class:`GroupedBranches` (run at once).
    """

    def __init__(self, trunk: nn.Module, branches: list[nn.Module] | GroupedBranches, heads: list[nn.Module],
                 frozen: list[nn.Module] | None = None):
        super().__init__()
        self.trunk = trunk
        self.branches = branches if isinstance(branches, GroupedBranches) else nn.ModuleList(branches)
        self.heads = nn.ModuleList(heads)
        if (self.branches.num_experts if self.batched else len(self.branches)) != len(heads):
            raise ValueError("one branch per head")
        # backbone modules outside model.trainable: frozen, and kept in eval mode by train()
        self.frozen_modules = list(frozen or [])

    def train(self, mode: bool = True) -> "MultiExpertNet":
        """``nn.Module.train``, except that the frozen backbone modules (``model.trainable``) stay in
        eval mode: their BN layers use and keep their running statistics (official MiSLAS Places-LT:
        ``model.eval()`` on the frozen ResNet-152 while the added block trains)."""
        super().train(mode)
        for m in self.frozen_modules:
            m.train(False)
        return self

    @property
    def batched(self) -> bool:
        """Whether the expert branches run together as grouped convolutions."""
        return isinstance(self.branches, GroupedBranches)

    @property
    def num_experts(self) -> int:
        return len(self.heads)

    def expert_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Pooled features ``[B, D]`` of each expert."""
        shared = self.trunk(x)
        if self.batched:
            return list(self.branches(shared).unbind(0))
        return [branch(shared) for branch in self.branches]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-expert logits ``[E, B, C]``."""
        return torch.stack([head(f) for head, f in zip(self.heads, self.expert_features(x))])

    def flat_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Per-expert logits laid out sample-major, ``[B, E, C]`` (the official code's ``logits``)."""
        return rearrange(self(x), "e b c -> b e c")

    @staticmethod
    def ensemble(expert_logits: torch.Tensor) -> torch.Tensor:
        """BalPoE aggregation: the mean of the expert logits ``[E, ..., C]`` -> ``[..., C]`` (the
        product of the experts' softmax distributions, re-normalised)."""
        return expert_logits.mean(0)

    def param_groups(self, lr: float, weight_decay: float, delta_lr_factor: float = 1.0) -> list[dict]:
        """Optimizer parameter groups of the trainable parameters (the module that owns the
        parameters says how they are optimised).

        Stage 1: one group, every parameter at ``lr``.  With MiSLAS Eq. 4 heads
        (:class:`~balpoe.models.lws.LWSDeltaHead`, stage 2): the ``dW`` tensors at
        ``lr * delta_lr_factor`` (group ``'delta'``) and the rest (``s``) at ``lr`` (group
        ``'scale'``); frozen parameters are left out and empty groups dropped."""
        trainable = [p for p in self.parameters() if p.requires_grad]
        if not trainable:
            raise BalpoeError("the model has no trainable parameters")
        delta_ids = {id(p) for m in self.modules() if isinstance(m, LWSDeltaHead) for p in m.delta_parameters()}
        if not any(isinstance(m, LWSDeltaHead) for m in self.modules()):
            return [{"params": trainable, "lr": lr, "weight_decay": weight_decay}]
        groups = [{"name": "scale", "params": [p for p in trainable if id(p) not in delta_ids], "lr": lr,
                   "weight_decay": weight_decay},
                  {"name": "delta", "params": [p for p in trainable if id(p) in delta_ids],
                   "lr": lr * delta_lr_factor, "weight_decay": weight_decay}]
        return [g for g in groups if g["params"]]


#: top-level modules holding a timm model's classifier: a weights file's tensors under them are not used
#: (the backbone is built without a classifier; each expert has its own head)
CLASSIFIER_NAMES = ("fc", "head", "classifier", "last_linear")
#: how many key names a message shows
SHOWN_KEYS = 3


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: a ``state_dict``, a checkpoint dict holding one under
    ``'state_dict'`` or ``'model'`` (loaded with ``torch.load(weights_only=True)``: no code runs), or
    a ``.safetensors`` file.  A DDP ``module.`` prefix on every key is dropped.  One-line errors
    name ``model.pretrained_file``."""
    p = Path(path).expanduser()
    where = f"model.pretrained_file '{clip(str(path), 200)}'"
    if not p.is_file():
        raise BalpoeError(f"{where} not found")
    try:
        state = load_safetensors(str(p)) if p.suffix == ".safetensors" else \
            torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error
        kind = "safetensors" if p.suffix == ".safetensors" else "torch state_dict (weights only)"
        raise BalpoeError(f"{where} could not be read as a {kind} ({type(e).__name__}: {clip(e, 150)})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BalpoeError(f"{where} holds no state_dict (expected a mapping of parameter names to tensors, or a "
                          "checkpoint dict with one under 'state_dict' or 'model')")
    if all(str(k).startswith("module.") for k in state):
        state = {str(k)[len("module."):]: v for k, v in state.items()}
    return {str(k): v for k, v in state.items()}


@dataclasses.dataclass
class WeightMatch:
    """How a weights file's tensors match a backbone's state: ``loaded`` keys (same name and shape),
    ``missing`` (in the backbone, not in the file; BN ``num_batches_tracked`` counters excepted),
    ``unexpected`` (in the file, not in the backbone), ``mismatched`` (same name, other shape:
    ``(key, file shape, backbone shape)``) and ``unused`` classifier tensors of the file
    (:data:`CLASSIFIER_NAMES`), which do not count against a match."""
    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple, tuple]]
    unused: list[str]
    parameters: int

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    @property
    def total(self) -> int:
        """Tensors the backbone expects (loaded + missing + of another shape)."""
        return len(self.loaded) + len(self.missing) + len(self.mismatched)

    def problems(self) -> str:
        """``2 missing (a, b), 1 unexpected (c), 1 of another shape (d: file [..], backbone [..])``."""
        def names(keys: list[str]) -> str:
            return ", ".join(keys[:SHOWN_KEYS]) + (", ..." if len(keys) > SHOWN_KEYS else "")
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing ({names(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected ({names(self.unexpected)})")
        if self.mismatched:
            shown_ = [f"{k}: file {list(a)}, backbone {list(b)}" for k, a, b in self.mismatched[:SHOWN_KEYS]]
            parts.append(f"{len(self.mismatched)} of another shape ({'; '.join(shown_)}"
                         f"{'; ...' if len(self.mismatched) > SHOWN_KEYS else ''})")
        return ", ".join(parts)

    def summary(self) -> str:
        """One line: what loaded, what did not, what was unused."""
        line = f"loaded {len(self.loaded)} of {self.total} backbone tensors ({self.parameters:,} parameters)"
        if not self.complete:
            line += f"; not loaded: {self.problems()}"
        if self.unused:
            line += f"; {len(self.unused)} classifier tensors unused"
        return line


def match_weights(own: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> WeightMatch:
    """Compare a backbone's ``state_dict()`` ``own`` with a weights file's tensors ``given`` by
    name and shape (works on meta tensors too)."""
    loaded, missing, mismatched = [], [], []
    for k, v in own.items():
        if k not in given:
            if not k.endswith("num_batches_tracked"):
                missing.append(k)
        elif tuple(given[k].shape) != tuple(v.shape):
            mismatched.append((k, tuple(given[k].shape), tuple(v.shape)))
        else:
            loaded.append(k)
    extra = [k for k in given if k not in own]
    unused = [k for k in extra if k.split(".", 1)[0] in CLASSIFIER_NAMES]
    unexpected = [k for k in extra if k.split(".", 1)[0] not in CLASSIFIER_NAMES]
    params = sum(own[k].numel() for k in loaded if own[k].is_floating_point())
    return WeightMatch(loaded, missing, unexpected, mismatched, unused, params)


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: str, backbone: str,
                 strict: bool = True) -> WeightMatch:
    """Load the tensors of ``state`` (from ``model.pretrained_file`` ``path``) that match ``model``
    by name and shape.  With ``strict`` a partial match is refused with a one-line error (missing,
    unexpected and other-shape keys: counts and the first names); otherwise the matching tensors are
    loaded and the match returned for the report.  No matching tensor at all is always an error."""
    match = match_weights(model.state_dict(), state)
    where = f"model.pretrained_file '{clip(str(path), 200)}'"
    if not match.loaded:
        raise BalpoeError(f"{where} has no tensor matching backbone '{backbone}' ({match.problems()})")
    if strict and not match.complete:
        raise BalpoeError(f"{where} does not match backbone '{backbone}': {match.problems()}; {len(match.loaded)} of "
                          f"{match.total} tensors ({match.parameters:,} parameters) would load: set "
                          "model.pretrained_strict: false to load those, or use a file of this backbone")
    model.load_state_dict({k: state[k] for k in match.loaded}, strict=False)
    return match


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
