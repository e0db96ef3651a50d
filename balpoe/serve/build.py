"""Checkpoint + recipe -> what serving needs: the model, its preprocessing, the balancing offset
and (for unlabelled adaptation) the labelled source data to calibrate on.

The preprocessing is the checkpoint's test transform.  Checkpoints record the model's input size
``[C, H, W]`` (``input_size``); for older ones it comes from the recipe: 32x32 RGB for CIFAR,
28x28 grey for Fashion-MNIST, ``data.image_size`` for the image-file datasets (which are also
resized and centre-cropped as in their test transform).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from balpoe.data.build import build_data, data_location, stored_location_keys, stored_origin
from balpoe.data.image_list import LIST_FILES
from balpoe.data.registry import get_dataset
from balpoe.errors import BalpoeError
from balpoe.evaluate.build import SourceSet, check_source, ensemble_prior, load_model, source_logits
from balpoe.models.multi_expert import MultiExpertNet
from balpoe.runtime.console import console
from balpoe.serve.serving import Preprocess

#: ``[C, H, W]`` of the in-memory datasets, for checkpoints that do not record it
KNOWN_INPUT_SIZES = {"cifar10": [3, 32, 32], "cifar100": [3, 32, 32], "fashion_mnist": [1, 28, 28]}


@dataclasses.dataclass
class Served:
    """A checkpoint ready to serve: the network (eval mode), its recipe and checkpoint dict, the
    preprocessing, ``lam_model`` (the power of pi_train its ensemble logits keep), the training
    class counts and the class names."""
    path: str
    model: MultiExpertNet
    recipe: object
    ckpt: dict
    preprocess: Preprocess
    lam_model: float
    class_counts: torch.Tensor
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def is_image_file_dataset(ckpt: dict, dataset: str) -> bool:
    """Whether the checkpoint's data were image files with the folder test transform (resize +
    centre crop): recorded in the checkpoint (``image_files``); for older checkpoints, the
    list-file datasets (ImageNet-LT, Places-LT, iNaturalist 2018)."""
    return bool(ckpt["image_files"]) if "image_files" in ckpt else dataset in LIST_FILES


def checkpoint_preprocess(ckpt: dict, recipe, where: str) -> Preprocess:
    """The test-time preprocessing of a checkpoint (module docstring)."""
    data = recipe.data
    file_dataset = is_image_file_dataset(ckpt, data.dataset)
    size = ckpt.get("input_size")
    if not size:
        if file_dataset:
            size = [3, int(data.image_size or 224), int(data.image_size or 224)]
        elif data.dataset in KNOWN_INPUT_SIZES:
            size = KNOWN_INPUT_SIZES[data.dataset]
        else:
            raise BalpoeError(f"{where} does not record its input size and dataset {data.dataset!r} has no known "
                              "one; re-save it with a current balpoe (training records input_size)")
    try:
        c, h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise BalpoeError(f"{where} has an invalid input_size {size!r} (expected [C, H, W])") from None
    if c != int(ckpt["in_chans"]):
        raise BalpoeError(f"{where}: input_size has {c} channels but the model takes {ckpt['in_chans']}")
    mean, std = ckpt.get("mean"), ckpt.get("std")
    if mean is None or std is None:
        spec = get_dataset(data.dataset)
        mean, std = spec.mean, spec.std
    crop = int(round(h * 256 / 224)) if file_dataset else None
    if isinstance(ckpt.get("test_resize"), int) and not isinstance(ckpt["test_resize"], bool) \
            and 0 < ckpt["test_resize"] <= 16384:  # image files (on disk or decoded into memory): their test resize
        crop, file_dataset = ckpt["test_resize"], True
    if file_dataset and h != w:
        raise BalpoeError(f"{where}: an image-file dataset's input must be square, got {h}x{w}")
    return Preprocess(c, h, w, tuple(float(m) for m in mean), tuple(float(s) for s in std), crop)


def load_served(checkpoint: str | Path, device: torch.device | str = "cpu") -> Served:
    """Load a checkpoint (``.pt`` or ``.safetensors``) for serving (float32, eval mode)."""
    where = f"checkpoint '{checkpoint}'"
    model, recipe, ckpt = load_model(checkpoint, device)
    # Predictions and exported modules run in float32; calibration logits are computed the same way.
    recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, amp=False))
    num_classes = int(ckpt["num_classes"])
    names = ckpt.get("class_names") or [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise BalpoeError(f"{where} has {len(names)} class names for {num_classes} classes")
    counts = torch.as_tensor(ckpt["class_counts"], dtype=torch.int64)
    return Served(str(checkpoint), model.float().eval(), recipe, ckpt, checkpoint_preprocess(ckpt, recipe, where),
                  ensemble_prior(recipe)[1], counts, [str(n) for n in names])


def calibration_source(served: Served, device: torch.device, seed: int = 0,
                       quiet: bool = False) -> tuple[SourceSet | None, str]:
    """Labelled source data to calibrate the unlabelled prior estimate on, as ``balpoe eval`` uses
    (:func:`~balpoe.evaluate.build.source_logits`: the recipe's held-out slice, else a slice of the
    training split): ``(SourceSet, "")``, or ``(None, reason)`` when the checkpoint's data cannot
    be built on this machine (nothing is downloaded).  The checkpoint's stored recipe chose where
    those data are read from: said in the reason, or (unless ``quiet``) printed."""
    recipe = served.recipe
    cfg = dataclasses.replace(recipe.data, download=False)
    where = f"checkpoint {served.path!r}"
    try:
        bundle = build_data(cfg, device, seed=recipe.seed)
    except BalpoeError as e:
        return None, f"{e}; {stored_origin(stored_location_keys(cfg), where)}"
    if not quiet:
        console.print(data_location(cfg, stored_in=where), markup=False, highlight=False, soft_wrap=True)
    if (bundle.num_classes, bundle.in_chans) != (served.num_classes, int(served.ckpt["in_chans"])):
        return None, (f"dataset {cfg.dataset!r} here has {bundle.num_classes} classes and {bundle.in_chans} channels, "
                      f"the model {served.num_classes} and {served.ckpt['in_chans']}")
    bundle.class_counts = served.class_counts.clone()
    try:
        check_source(bundle, "auto")
    except BalpoeError as e:
        return None, str(e)
    return source_logits(served.model, bundle, recipe.data, device, batch_size=recipe.train.eval_batch_size,
                         amp=recipe.train.amp, lam_model=served.lam_model, seed=seed), ""
