"""SADE's test-time self-supervised aggregation of a frozen multi-expert model (Zhang et al., NeurIPS
2022, "Self-Supervised Aggregation of Diverse Experts for Test-Agnostic Long-Tailed Recognition").

The experts stay frozen; only E aggregation weights are learnt, on the *unlabelled* images of one
target (test) set, by making the aggregated prediction stable across two augmented views::

    w = softmax(theta)                               theta in R^E, every entry 1/E at the start
    z(v) = sum_k w_k f_k(v)                          weighted sum of the expert *logits*
    maximise  mean_i cos(softmax(z(v_i')), softmax(z(v_i'')))     (cosine eps 1e-6)

by SGD on ``theta`` (Nesterov momentum 0.9, weight decay on ``theta``; lr and weight decay per dataset,
:data:`OFFICIAL_SGD`), batches of 128 shuffled images, 5 epochs, stopping after an epoch in which a
weight falls below 0.05 (rounded to two decimals).  The model runs in eval mode (BN uses its
running statistics and keeps them).  The prediction is then ``sum_k w_k f_k(x)`` on the plain test
images (:func:`aggregate_logits`), so every target set can be scored on cached logits
``[E, N, C]``.  The weights are learnt per target set, from scratch for each.

The objective needs *images*, not cached logits: each epoch draws new views.  Because the experts
are frozen, each batch's expert logits are computed once under ``torch.no_grad`` (both views in
one forward pass) and only ``theta`` is differentiated; the gradient is the official one.

Views: the official view is MoCo v2's augmentation (``RandomCrop(32, padding=4)`` (CIFAR) or
``RandomResizedCrop(224, scale=(0.2, 1))`` (ImageNet-LT), ``ColorJitter(0.4, 0.4, 0.4, 0.1)`` with
p = 0.8, ``RandomGrayscale(0.2)``, Gaussian blur sigma in [0.1, 2] with p = 0.2 (CIFAR) / 0.5
(ImageNet-LT), horizontal flip).  Here a view is the library's batched training augmentation
(:func:`~balpoe.data.augment.augment_batch`, as the device loader runs it): pad-and-crop (``padding``,
default 4) and horizontal flip, optionally rotation and a strong policy (``augment``: the
``augment_batch`` keywords, e.g. ``{"policy": "randaugment"}``) standing in for the colour
distortions; the library has no batched colour jitter / greyscale / blur, so by default the views
differ only geometrically.  Image-file datasets can pass their own pairs of views.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from balpoe.data.augment import augment_batch, normalize
from balpoe.data.samplers import instance_balanced_indices
from balpoe.errors import BalpoeError
from balpoe.runtime.precision import amp_dtype, autocast
from balpoe.runtime.seeding import torch_stream

#: official SGD (lr, weight decay) of the test-time aggregation by dataset (registry names), from
#: the official ``configs/test_time_*_sade.json`` (l. 24-33): CIFAR-100-LT (IR 10 / 50 / 100),
#: ImageNet-LT, Places-LT (whose ``share_lr`` is not an SGD argument), iNaturalist 2018
OFFICIAL_SGD: dict[str, tuple[float, float]] = {"cifar100": (0.1, 5e-4), "imagenet_lt": (0.025, 5e-4),
                                                "places_lt": (0.01, 4e-4), "inat": (0.2, 2e-4)}
#: cosine similarity's eps (official ``test_training_cifar.py`` l. 354)
COSINE_EPS = 1e-6
# Other official constants, as the defaults of learn_aggregation_weights: batch size 128 of shuffled
# target images (test_training_cifar.py l. 300, l. 228), 5 epochs (configs/test_time_*_sade.json
# "epochs", l. 37-38; the script's --epochs flag is never read), SGD momentum 0.9 with Nesterov
# (configs l. 30-31).  Official views: test_training_cifar.py l. 179-189 (RandomCrop(32, 4),
# jitter p 0.8, greyscale p 0.2, blur p 0.2, flip) and test_training_imagenet.py l. 177-187
# (RandomResizedCrop(224, scale=(0.2, 1)), blur p 0.5), two draws per image (TwoCropsTransform, l. 158-167).


@dataclass
class AggregationWeights:
    """Learnt aggregation: ``weights`` float32 ``[E]`` on the simplex; ``objective``: per epoch, the
    mean cosine similarity of the two views' aggregated predictions (each batch measured before its
    step, weighted by its size); ``stopped_early``: a weight fell below ``min_weight``."""
    weights: torch.Tensor
    objective: list[float] = field(default_factory=list)
    stopped_early: bool = False

    @property
    def epochs(self) -> int:
        return len(self.objective)

    def apply(self, expert_logits: torch.Tensor) -> torch.Tensor:
        """:func:`aggregate_logits` with these weights."""
        return aggregate_logits(expert_logits, self.weights)

    def as_dict(self) -> dict[str, Any]:
        return {"weights": [float(w) for w in self.weights], "objective": list(self.objective),
                "epochs": self.epochs, "stopped_early": self.stopped_early}


def aggregate_logits(expert_logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_k w_k f_k``: expert logits ``[E, ..., C]`` and weights ``[E]`` on the simplex -> ``[..., C]``
    (official ``test_training_cifar.py`` l. 401-402: the weighted sum of the expert logits)."""
    if not isinstance(expert_logits, torch.Tensor) or expert_logits.dim() < 2:
        raise BalpoeError("expert logits must be a tensor [E, ..., C]")
    weights = torch.as_tensor(weights)
    if weights.dim() != 1 or len(weights) != expert_logits.shape[0]:
        raise BalpoeError(f"aggregation weights must be a vector of {expert_logits.shape[0]} (one per expert), "
                          f"got shape {list(weights.shape)}")
    if not torch.isfinite(weights).all() or (weights < 0).any() or abs(float(weights.double().sum()) - 1) > 1e-4:
        raise BalpoeError(f"aggregation weights must be non-negative and sum to 1, got {[float(w) for w in weights]}")
    w = weights.to(expert_logits.device, expert_logits.dtype)
    return torch.tensordot(w, expert_logits, dims=1)


def view_agreement(logits0: torch.Tensor, logits1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """SADE's objective (to maximise): the mean over the batch of the cosine similarity of
    ``softmax(sum_k w_k f_k)`` of view 0 and of view 1; logits ``[E, B, C]``, weights ``[E]``
    (official ``test_training_cifar.py`` l. 367-376; the loss is its negative)."""
    p0 = F.softmax(torch.tensordot(weights, logits0, dims=1), dim=-1)
    p1 = F.softmax(torch.tensordot(weights, logits1, dims=1), dim=-1)
    return F.cosine_similarity(p0, p1, dim=-1, eps=COSINE_EPS).mean()


def below_min_weight(weights: torch.Tensor, min_weight: float | None) -> bool:
    """Whether a weight, rounded to two decimals, is below ``min_weight`` (the official stopping rule
    after each epoch, ``test_training_cifar.py`` l. 319-320 on the weights rounded at l. 386: 0.047
    rounds to 0.05 and does not stop); ``min_weight`` None or 0: never."""
    return bool(min_weight) and bool((torch.round(weights, decimals=2) < min_weight).any())


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BalpoeError(f"SADE aggregation {what} must be an integer >= 1, got {value!r}")
    return value


def _number(value, what: str, low: float, high: float = math.inf, open_high: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value >= low \
        and (value < high if open_high else value <= high)
    if not ok:
        bound = f"in [{low:g}, {high:g}{')' if open_high else ']'}" if math.isfinite(high) else f">= {low:g}"
        raise BalpoeError(f"SADE aggregation {what} must be a finite number {bound}, got {value!r}")
    return float(value)


def _check_arguments(epochs, batch_size, lr, momentum, weight_decay, nesterov, min_weight, seed) -> None:
    _positive_int(epochs, "epochs")
    _positive_int(batch_size, "batch size")
    if _number(lr, "lr", 0.0) == 0:
        raise BalpoeError(f"SADE aggregation lr must be > 0, got {lr!r}")
    if _number(momentum, "momentum", 0.0, 1.0, open_high=True) == 0 and nesterov:
        raise BalpoeError("SADE aggregation: Nesterov momentum needs momentum > 0")
    _number(weight_decay, "weight decay", 0.0)
    if min_weight is not None:
        _number(min_weight, "min_weight", 0.0, 1.0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 32:
        raise BalpoeError(f"SADE aggregation seed must be an integer in [0, 2**32), got {seed!r}")


class _Views:
    """The epoch's pairs of normalised views ``(x0, x1)`` on ``device``, from uint8 images or batches."""

    def __init__(self, images, batch_size: int, mean, std, padding: int, flip: bool, rotation: float,
                 augment: dict | None, seed: int, device: torch.device):
        self.images, self.batch_size, self.seed, self.device = images, batch_size, seed, device
        self.padding, self.flip, self.rotation = padding, flip, rotation
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32, device=device).flatten()
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32, device=device).flatten()
        self.augment = dict(augment or {})
        if mean is not None:  # RandAugment's default fill: the dataset mean, as the device loader
            self.augment.setdefault("fill", tuple(round(255 * float(m)) for m in self.mean))
        if isinstance(images, torch.Tensor):
            if images.dtype != torch.uint8 or images.dim() != 4 or len(images) == 0:
                raise BalpoeError("SADE aggregation images must be a non-empty uint8 tensor [N, C, H, W], got "
                                  f"{images.dtype} {list(images.shape)}")
            self._check_normalisation(images.shape[1])
        elif not isinstance(images, Iterable):
            raise BalpoeError("SADE aggregation images must be a uint8 tensor [N, C, H, W] or an iterable of "
                              f"image batches, got {type(images).__name__}")

    def _check_normalisation(self, channels: int) -> None:
        if self.mean is None or self.std is None:
            raise BalpoeError("SADE aggregation needs mean and std to normalise uint8 images")
        if len(self.mean) != channels or len(self.std) != channels or not (self.std > 0).all():
            raise BalpoeError(f"SADE aggregation mean and std must be {channels} values (std > 0), got "
                              f"{self.mean.tolist()} and {self.std.tolist()}")

    def _pair(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device)
        views = [normalize(augment_batch(x, self.padding, self.flip, self.rotation, generator, **self.augment),
                           self.mean, self.std) for _ in range(2)]
        return views[0], views[1]

    def epoch(self, epoch: int):
        aug = torch_stream(self.seed, epoch, "augment", device=self.device)
        if isinstance(self.images, torch.Tensor):
            # shuffled (official DataLoader(shuffle=True), test_training_cifar.py l. 228), last batch kept
            order = instance_balanced_indices(len(self.images), torch_stream(self.seed, epoch, "order",
                                                                              device=self.images.device),
                                              device=self.images.device)
            for i in range(0, len(order), self.batch_size):
                yield self._pair(self.images[order[i:i + self.batch_size]], aug)
            return
        for i, item in enumerate(self.images):
            if isinstance(item, torch.Tensor) and item.dtype == torch.uint8 and item.dim() == 4 and len(item):
                self._check_normalisation(item.shape[1])
                yield self._pair(item, aug)
            elif isinstance(item, (tuple, list)) and len(item) == 2 and all(
                    isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() == 4 for v in item) \
                    and item[0].shape == item[1].shape and len(item[0]):
                yield item[0].to(self.device), item[1].to(self.device)
            else:
                raise BalpoeError(f"SADE aggregation batch {i}: expected a uint8 image batch [B, C, H, W] or a "
                                  "pair of normalised float views [B, C, H, W]")


def learn_aggregation_weights(model: torch.nn.Module, images: torch.Tensor | Iterable, *, mean=None, std=None,
                              epochs: int = 5, batch_size: int = 128, lr: float = 0.1, momentum: float = 0.9,
                              weight_decay: float = 5e-4, nesterov: bool = True, min_weight: float | None = 0.05,
                              padding: int = 4, flip: bool = True, rotation: float = 0.0,
                              augment: dict | None = None, seed: int = 0, device: torch.device | str | None = None,
                              amp: bool = False) -> AggregationWeights:
    """Learn SADE's expert aggregation weights on the unlabelled images of one target set (module
    docstring) with the model frozen.

    ``model(x) -> [E, B, C]`` (:class:`~balpoe.models.multi_expert.MultiExpertNet`), E >= 2; it runs in
    eval mode and is returned to its previous mode; its parameters and buffers are not changed.
    ``images``: uint8 ``[N, C, H, W]`` (shuffled into batches of ``batch_size``; two views each by
    :func:`~balpoe.data.augment.augment_batch` with ``padding`` / ``flip`` / ``rotation`` / ``augment``,
    then normalised with ``mean`` / ``std``), or a re-iterable of batches, each a uint8
    ``[B, C, H, W]`` (viewed as above) or a pair ``(x0, x1)`` of normalised float views used as
    given.  Randomness: the ``order`` and ``augment`` streams of ``seed``
    (:mod:`balpoe.runtime.seeding`), one epoch each.  Defaults: the official CIFAR-100-LT constants
    (other datasets: :data:`OFFICIAL_SGD`); ``min_weight=None`` (or 0) never stops early.
    ``device``: default the model's; ``amp``: the expert logits under bf16 autocast where native
    (as :func:`~balpoe.evaluate.logits.collect_logits`)."""
    _check_arguments(epochs, batch_size, lr, momentum, weight_decay, nesterov, min_weight, seed)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    views = _Views(images, batch_size, mean, std, padding, flip, rotation, augment, seed, device)
    dtype = amp_dtype(device, amp, warn=False)
    theta: torch.Tensor | None = None
    optimizer: torch.optim.Optimizer | None = None
    result = AggregationWeights(torch.empty(0))
    was_training = model.training
    model.eval()  # official test_training_cifar.py l. 345
    try:
        for epoch in range(epochs):
            total, count = 0.0, 0
            for x0, x1 in views.epoch(epoch):
                with torch.no_grad(), autocast(device, dtype is not None, dtype):
                    out = model(torch.cat([x0, x1]))
                b = len(x0)
                if out.dim() != 3 or out.shape[1] != 2 * b:
                    raise BalpoeError(f"SADE aggregation needs per-expert logits [E, B, C] from the model, got "
                                      f"shape {list(out.shape)} for a batch of {2 * b}")
                if theta is None:
                    if out.shape[0] < 2:
                        raise BalpoeError(f"SADE aggregation needs a model with at least 2 experts, got {out.shape[0]}")
                    # official l. 312-315: FloatTensor(3) filled with 1/3 (uniform weights), SGD on it alone
                    theta = torch.full((out.shape[0],), 1.0 / out.shape[0], device=device, requires_grad=True)
                    optimizer = torch.optim.SGD([theta], lr=lr, momentum=momentum, weight_decay=weight_decay,
                                                nesterov=nesterov)
                elif out.shape[0] != len(theta):
                    raise BalpoeError(f"SADE aggregation: the model gave {out.shape[0]} experts, earlier {len(theta)}")
                logits = out.float()
                agreement = view_agreement(logits[:, :b], logits[:, b:], F.softmax(theta, dim=0))
                optimizer.zero_grad()
                (-agreement).backward()  # official l. 376: loss = -cosine similarity
                optimizer.step()
                total, count = total + float(agreement.detach()) * b, count + b  # official l. 382: size-weighted meter
            if count == 0:
                raise BalpoeError(f"SADE aggregation: no images in epoch {epoch + 1} (pass a re-iterable of "
                                  "batches, such as a list or a loader, not a one-shot iterator)")
            result.objective.append(total / count)
            if below_min_weight(F.softmax(theta.detach(), dim=0), min_weight):
                result.stopped_early = True
                break
    finally:
        model.train(was_training)
    result.weights = F.softmax(theta.detach(), dim=0).float().cpu()
    return result
