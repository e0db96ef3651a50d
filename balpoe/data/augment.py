"""Training augmentation: batched and per sample on the training device for in-memory data, and
the torchvision/timm transforms of the image-file path.

Device path, in the order of the official torchvision pipelines: random crop with zero padding ->
random horizontal flip -> random rotation in [-deg, deg] (nearest, zero fill, about the centre) ->
strong policy (AutoAugment / RandAugment / TrivialAugmentWide, :mod:`balpoe.data.autoaugment`) ->
Cutout -> /255 -> normalise.  Every sample draws its own offsets, flip, angle and policy ops from
the given generator.

Image-file path (:func:`folder_transform`): ``RandomResizedCrop`` -> flip -> ``ColorJitter(0.4, 0.4,
0.4, 0)`` -> policy (torchvision's ``AutoAugment`` / ``TrivialAugmentWide``, timm's
``rand_augment_transform``) -> ``ToTensor`` -> Cutout -> ``Normalize``; with RandAugment this is the
official BalPoE long-training pipeline for ImageNet-LT and iNaturalist 2018 (PaCo's ``randncls``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from timm.data import rand_augment_transform
from timm.data.transforms import str_to_pil_interp
from torchvision import transforms as T

from balpoe.data.autoaugment import (autoaugment_cifar10_official, cutout, parse_randaugment, rand_augment,
                                    strong_augment)
from balpoe.errors import BalpoeError


def random_crop_flip(x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Per-sample ``RandomCrop(size, padding)`` + ``RandomHorizontalFlip`` on a uint8 batch ``[B, C, H, W]``."""
    b, _, h, w = x.shape
    dev = x.device
    if padding:
        x = F.pad(x, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (b, 1), device=dev, generator=generator)
        ox = torch.randint(0, 2 * padding + 1, (b, 1), device=dev, generator=generator)
    else:
        oy = ox = torch.zeros(b, 1, dtype=torch.long, device=dev)
    rows = oy + torch.arange(h, device=dev)
    cols = ox + torch.arange(w, device=dev)
    if flip:
        flips = torch.rand(b, 1, device=dev, generator=generator) < 0.5
        cols = torch.where(flips, cols.flip(1), cols)
    if not padding and not flip:
        return x
    out = x[torch.arange(b, device=dev)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return rearrange(out, "b h w c -> b c h w")  # advanced indexing put the channel axis last


def random_rotation(x: torch.Tensor, degrees: float, generator: torch.Generator) -> torch.Tensor:
    """Per-sample ``RandomRotation(degrees)`` (nearest, fill 0) of a float batch ``[B, C, H, W]``."""
    b, _, h, w = x.shape
    angle = (torch.rand(b, device=x.device, generator=generator) * 2 - 1) * (degrees * math.pi / 180)
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(cos)
    # Normalised coordinates; the aspect factors keep the rotation rigid for non-square images.
    theta = torch.stack([torch.stack([cos, -sin * h / w, zero], -1),
                         torch.stack([sin * w / h, cos, zero], -1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(x / 255 - mean) / std`` for a batch in [0, 255]; ``mean``/``std`` are ``[C]``."""
    scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1)
    shift = (mean / std).view(1, -1, 1, 1)
    return x.float().mul(scale).sub_(shift)


def augment_batch(x: torch.Tensor, padding: int, flip: bool, rotation: float, generator: torch.Generator,
                  policy: str = "none", randaugment: str = "rand-n2-m10-mstd0.5", cutout_length: int = 0,
                  interpolation: str | None = None, fill: tuple[int, ...] | None = None,
                  policy_fill: tuple[int, ...] | None = None) -> torch.Tensor:
    """Crop + flip (uint8), rotation, then the strong ``policy`` and Cutout (uint8); returns float in
    [0, 255].  ``fill``: RandAugment's default fill colour (the dataset mean in [0, 255]);
    ``policy_fill`` (recipe ``data.augment.fill``) overrides every policy's fill."""
    x = random_crop_flip(x, padding, flip, generator)
    if policy == "none" and not cutout_length:
        x = x.float()
        return random_rotation(x, rotation, generator) if rotation else x
    if rotation:  # nearest resampling with zero fill: the rotated values are exactly uint8 values
        x = random_rotation(x.float(), rotation, generator).to(torch.uint8)
    if policy == "randaugment":
        ra_fill = policy_fill if policy_fill is not None else (128 if fill is None else fill)
        x = rand_augment(x, generator, randaugment, fill=ra_fill, interpolation=interpolation or "bilinear")
    else:
        x = strong_augment(x, policy, generator, interpolation=interpolation, fill=policy_fill)
    return cutout(x, cutout_length, generator).float()


class Cutout:
    """Cutout (DeVries & Taylor 2017) of one image tensor ``[C, H, W]`` after ``ToTensor``: one hole
    of side ``length`` set to 0 (the reference ``Cutout(n_holes=1, length)``), drawn with torch's
    global generator (the DataLoader seeds it per worker)."""

    def __init__(self, length: int):
        self.length = int(length)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        _, h, w = img.shape
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        half = self.length // 2
        out = img.clone()
        out[:, max(cy - half, 0):min(cy + half, h), max(cx - half, 0):min(cx + half, w)] = 0
        return out

    def __repr__(self) -> str:
        return f"Cutout(length={self.length})"


class OfficialCIFAR10Policy:
    """The official BalPoE ``CIFAR10Policy`` as a PIL transform for the ``DataLoader`` path: the
    batched device op (:func:`~balpoe.data.autoaugment.autoaugment_cifar10_official`) on a batch of
    one, its draws from a generator seeded by torch's global generator (seeded per worker)."""

    def __init__(self, fill=128):
        self.fill = fill

    def __call__(self, img: Image.Image) -> Image.Image:
        a = torch.from_numpy(np.array(img))
        x = (a.unsqueeze(-1) if a.dim() == 2 else a).permute(2, 0, 1).unsqueeze(0).contiguous()
        g = torch.Generator().manual_seed(int(torch.randint(2 ** 62, ())))
        out = autoaugment_cifar10_official(x, g, fill=self.fill)[0].permute(1, 2, 0).numpy()
        return Image.fromarray(out[..., 0] if out.shape[2] == 1 else out)

    def __repr__(self) -> str:
        return f"OfficialCIFAR10Policy(fill={self.fill})"


def policy_transform(policy: str, randaugment: str, fill: tuple[int, ...], interpolation: str | None,
                     policy_fill: tuple[int, ...] | None = None):
    """The image-file path's policy op (a PIL transform), or None for ``none``: torchvision's
    ``AutoAugment(CIFAR10)`` / ``TrivialAugmentWide`` (nearest by default, as torchvision), the official
    BalPoE ``CIFAR10Policy`` (:class:`OfficialCIFAR10Policy`) or timm's ``rand_augment_transform(config,
    {"img_mean": fill, "translate_pct": 0.45})`` (timm's random bilinear/bicubic by default;
    ``interpolation`` fixes it).  ``policy_fill`` (recipe ``data.augment.fill``) overrides each fill."""
    mode = None if interpolation is None else getattr(T.InterpolationMode, interpolation.upper())
    tv_fill = {} if policy_fill is None else {"fill": [float(v) for v in policy_fill]}
    if policy == "autoaugment_cifar10":
        return T.AutoAugment(T.AutoAugmentPolicy.CIFAR10, **({"interpolation": mode} if mode else {}), **tv_fill)
    if policy == "autoaugment_cifar10_official":
        return OfficialCIFAR10Policy(128 if policy_fill is None else tuple(policy_fill))
    if policy == "trivialaugment":
        return T.TrivialAugmentWide(**({"interpolation": mode} if mode else {}), **tv_fill)
    if policy_fill is not None:
        fill = tuple(policy_fill)
    if policy == "randaugment":
        parse_randaugment(randaugment)  # one-line error for a malformed config string
        hparams = {"img_mean": tuple(fill), "translate_pct": 0.45}
        if interpolation is not None:
            hparams["interpolation"] = str_to_pil_interp(interpolation)
        return rand_augment_transform(randaugment, hparams)
    if policy != "none":
        raise BalpoeError(f"unknown strong augmentation policy {policy!r}")
    return None


def folder_transform(train: bool, mean, std, image_size: int = 224, *, color_jitter: bool = True,
                     policy: str = "none", randaugment: str = "rand-n2-m10-mstd0.5", cutout_length: int = 0,
                     interpolation: str | None = None, flip: bool = True, scale=None, ratio=None,
                     rotation: float = 0.0, test_resize: int | None = None,
                     policy_fill: tuple[int, ...] | None = None) -> T.Compose:
    """The image-file path's transform.  Train: ``RandomResizedCrop(image_size, scale, ratio)`` ->
    flip -> ``RandomRotation(rotation)`` -> ``ColorJitter(0.4, 0.4, 0.4, 0)`` (``color_jitter``) ->
    policy (:func:`policy_transform`, its fill ``policy_fill``) -> ``ToTensor`` -> Cutout ->
    ``Normalize``.  Test: ``Resize(test_resize)`` (default ``image_size * 256 / 224``) ->
    ``CenterCrop(image_size)`` -> ``ToTensor`` -> ``Normalize``.  The defaults are the official
    BalPoE ImageNet-LT pipeline."""
    if not train:
        resize = int(round(image_size * 256 / 224)) if test_resize is None else test_resize
        ops = [T.Resize(resize), T.CenterCrop(image_size)]
        return T.Compose(ops + [T.ToTensor(), T.Normalize(mean, std)])
    extra = {k: tuple(v) for k, v in (("scale", scale), ("ratio", ratio)) if v is not None}
    ops: list = [T.RandomResizedCrop(image_size, **extra)]
    if flip:
        ops.append(T.RandomHorizontalFlip())
    if rotation:
        ops.append(T.RandomRotation(rotation))
    if color_jitter:
        ops.append(T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0))
    strong = policy_transform(policy, randaugment, tuple(round(255 * m) for m in mean), interpolation, policy_fill)
    if strong is not None:
        ops.append(strong)
    ops.append(T.ToTensor())
    if cutout_length:
        ops.append(Cutout(cutout_length))
    return T.Compose(ops + [T.Normalize(mean, std)])
