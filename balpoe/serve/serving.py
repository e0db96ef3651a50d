"""The pieces of serving a model, with plain arguments: preprocessing, the served module, image
files and target priors.

* :class:`Preprocess`: the checkpoint's *test* transform up to the [0, 1] tensor (resize to the
  training size, or resize + centre crop for image-file datasets); the normalisation is part of
  the module.
* :class:`ServingModule`: ``float [B, C, H, W] in [0, 1] -> logits [B, K]``: normalise, run the
  experts, average their logits (:meth:`~balpoe.models.multi_expert.MultiExpertNet.ensemble`) and add
  a per-class offset (``-lambda_m log pi_train`` to balance them, ``+ log q`` for a target prior).
  What ``balpoe predict`` runs and what ``balpoe export`` writes.
* :func:`collect_images`, :func:`load_image`: image files and folders (recursively, sorted).
* :func:`resolve_prior`: ``uniform``, class weights, ``dirichlet:...`` or a weight file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
from PIL import Image
from torchvision import transforms as T

from balpoe.data.augment import folder_transform
from balpoe.data.decode import load_pil
from balpoe.errors import BalpoeError
from balpoe.losses.priors import log_prior
from balpoe.models.multi_expert import MultiExpertNet
from balpoe.shift.distributions import floored_log, normalize_prior
from balpoe.shift.targets import parse_prior

#: file suffixes taken from a folder (a file named explicitly is read whatever its suffix)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
                            ".pbm", ".pnm"})
#: PIL mode of the model's input channels
CHANNEL_MODES = {1: "L", 3: "RGB"}


@dataclass(frozen=True)
class Preprocess:
    """What an image goes through before the model: PIL ``mode`` (``L`` for 1 channel, ``RGB`` for
    3), then either a resize to ``height x width`` (in-memory datasets: CIFAR, Fashion-MNIST) or,
    when ``crop_resize`` is set, ``Resize(crop_resize)`` (shorter side) + ``CenterCrop(height)``
    (image-file datasets: the official test transform), then ``ToTensor`` (values in [0, 1]); the
    module normalises with ``mean`` and ``std``."""
    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_resize: int | None = None

    def __post_init__(self):
        if self.channels not in CHANNEL_MODES:
            raise BalpoeError(f"serving needs 1 (grey) or 3 (RGB) input channels, the model has {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise BalpoeError(f"normalisation constants have {len(self.mean)} means and {len(self.std)} standard "
                              f"deviations for {self.channels} channels")

    @property
    def mode(self) -> str:
        return CHANNEL_MODES[self.channels]

    @property
    def input_size(self) -> list[int]:
        return [self.channels, self.height, self.width]

    def transform(self):
        """PIL image (any mode, any size) -> float tensor ``[C, H, W]`` in [0, 1]."""
        if self.crop_resize is not None:
            test = folder_transform(False, self.mean, self.std, self.height, test_resize=self.crop_resize)
            ops = [t for t in test.transforms if not isinstance(t, T.Normalize)]
        else:
            ops = [_ResizeTo(self.height, self.width), T.ToTensor()]
        return T.Compose([_Convert(self.mode), *ops])

    def describe(self) -> dict:
        """The preprocessing as plain data (exported files' metadata)."""
        if self.crop_resize is not None:
            resize = {"resize_shorter_side": self.crop_resize, "center_crop": [self.height, self.width],
                      "interpolation": "bilinear"}
        else:
            resize = {"resize": [self.height, self.width], "interpolation": "bilinear"}
        return {"input_size": self.input_size, "channel_order": self.mode, "layout": "NCHW", "dtype": "float32",
                "value_range": [0.0, 1.0], "mean": list(self.mean), "std": list(self.std),
                "normalised_inside": True, **resize}


class _Convert:
    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)


class _ResizeTo:
    """Resize to exactly ``(h, w)`` (bilinear, antialiased); an image of that size is kept as it is."""

    def __init__(self, h: int, w: int):
        self.size = (h, w)
        self.resize = T.Resize(self.size, antialias=True)

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if (img.height, img.width) == self.size else self.resize(img)


class ServingModule(nn.Module):
    """``x`` float ``[B, C, H, W]`` in [0, 1] -> ``ensemble((x - mean) / std) + offset``, ``[B, K]``.

    ``offset`` (``[K]``) is ``-lambda_m log pi_train`` for the balanced logits
    (:func:`~balpoe.losses.priors.balance_logits`), plus ``log q`` for a target prior q
    (:func:`prior_offset`)."""

    def __init__(self, model: MultiExpertNet, mean: Sequence[float], std: Sequence[float], offset: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("offset", offset.detach().to(torch.float32).reshape(-1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return MultiExpertNet.ensemble(self.model((x - self.mean) / self.std)) + self.offset


def prior_offset(class_counts, lam_model: float, prior: torch.Tensor | None = None) -> torch.Tensor:
    """``-lambda_m log pi_train`` (balances the ensemble logits) ``+ log max(q, 1e-8)`` for a target
    prior q (Bayes rule, as :meth:`~balpoe.shift.selector.TauSelector.known`); float64 ``[K]``."""
    offset = -lam_model * log_prior(class_counts, torch.float64)
    if prior is not None:
        offset = offset + floored_log(prior.to(torch.float64))
    return offset


# ------------------------------------------------------------------------------------------------
# Image files


def collect_images(inputs: Sequence[str | Path] | str | Path) -> list[Path]:
    """Image paths from files and folders: a file is taken as it is (whatever its suffix), a folder
    gives every file with an image suffix (:data:`IMAGE_SUFFIXES`) inside it, recursively, sorted;
    duplicates are dropped.  A missing path, or no image at all, is a one-line error."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if not inputs:
        raise BalpoeError("no input images given (image files or folders)")
    paths: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted((f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()),
                           key=lambda f: f.as_posix())
            if not found:
                raise BalpoeError(f"folder '{p}' holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        elif p.is_file():
            found = [p]
        else:
            raise BalpoeError(f"input '{p}' not found")
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                paths.append(f)
    return paths


def load_image(path: Path, transform) -> torch.Tensor:
    """``transform(PIL image)``; any failure (not an image, truncated, unreadable, larger than the
    pixel limit: :func:`~balpoe.data.decode.load_pil`, as in training and evaluation) raises
    :class:`BalpoeError` with one line naming the file and the reason."""
    im = load_pil(path)
    try:
        return transform(im)
    except Exception as e:  # noqa: BLE001 - any failure on a decoded image is a bad input file
        lines = str(e).replace(str(path), "the file").strip().splitlines()
        reason = lines[0][:160] if lines else type(e).__name__
        raise BalpoeError(f"cannot read image '{path}': {reason}") from None


# ------------------------------------------------------------------------------------------------
# Target priors

_NUMBER = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")


def _looks_like_weights(spec: str) -> bool:
    return spec.startswith("dirichlet") or all(_NUMBER.match(p) for p in spec.split(","))


def read_prior_file(path: str | Path, class_names: Sequence[str]) -> torch.Tensor:
    """Class weights from a file (normalised, float64 ``[K]``): JSON (a list of weights in label
    order, or a mapping class name -> weight naming every class) or text (one weight per class in
    label order, separated by newlines, commas or spaces; ``#`` starts a comment)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BalpoeError(f"cannot read prior file '{path}' ({type(e).__name__})") from None
    what = f"prior file '{path}'"
    stripped = text.strip()
    if stripped.startswith(("[", "{")):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise BalpoeError(f"{what} is not valid JSON (line {e.lineno}: {e.msg})") from None
        if isinstance(data, dict):
            unknown = [k for k in data if k not in class_names]
            if unknown:
                raise BalpoeError(f"{what} names classes the model does not have: "
                                  f"{', '.join(repr(k) for k in unknown[:5])}")
            missing = [c for c in class_names if c not in data]
            if missing:
                raise BalpoeError(f"{what} lacks weights for {len(missing)} of {len(class_names)} classes (e.g. "
                                  f"{', '.join(repr(c) for c in missing[:3])}); name every class")
            data = [data[c] for c in class_names]
        if not isinstance(data, list) or not all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                                 for w in data):
            raise BalpoeError(f"{what}: expected a JSON list of numbers or a mapping class name -> number")
        weights = [float(w) for w in data]
    else:
        fields = [f for line in text.splitlines() for f in re.split(r"[,\s]+", line.split("#", 1)[0]) if f]
        try:
            weights = [float(f) for f in fields]
        except ValueError:
            bad = next(f for f in fields if not _NUMBER.match(f))
            raise BalpoeError(f"{what}: {bad[:40]!r} is not a number (expected one weight per class)") from None
    if not weights:
        raise BalpoeError(f"{what} holds no weights (expected one per class)")
    return normalize_prior(weights, len(class_names), what)


def resolve_prior(spec: str | Sequence[float] | torch.Tensor | None, class_counts,
                  class_names: Sequence[str]) -> torch.Tensor | None:
    """A target prior (float64 ``[K]``, sums to 1) or ``None`` for the balanced logits.

    ``spec``: ``None`` or ``"uniform"`` (balanced); comma-separated class weights or
    ``dirichlet:<profile>:<concentration>:<seed>`` (:func:`~balpoe.shift.targets.parse_prior`);
    the path of a weight file (:func:`read_prior_file`); or a sequence / tensor of weights."""
    if spec is None:
        return None
    if not isinstance(spec, str):
        return normalize_prior(torch.as_tensor(spec, dtype=torch.float64).reshape(-1), len(class_names), "prior")
    text = spec.strip()
    if text == "uniform":
        return None
    if Path(text).is_file():
        prior = read_prior_file(text, class_names)
    elif _looks_like_weights(text):
        prior = parse_prior(text, class_counts)
    else:
        raise BalpoeError(f"prior {text!r} is neither 'uniform', class weights, dirichlet:<profile>:<concentration>:"
                          "<seed> nor an existing weight file")
    if prior.numel() != len(class_names):
        raise BalpoeError(f"prior {text!r} has {prior.numel()} entries, expected one per class ({len(class_names)})")
    return prior
