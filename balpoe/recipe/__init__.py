"""Recipes: YAML files validated into typed dataclasses.  This module is the reference of every key.

A recipe has the sections ``data`` (with ``data.augment``), ``model``, ``loss``, ``optim``, ``train``
and (for MiSLAS-style decoupled training) ``stage2``: one dataclass each below (:class:`Recipe`, the
top level, last).  Every key is declared with its type, default and allowed values (:func:`_f`);
:func:`_cross_checks` holds the rules that relate keys to each other.  Unknown keys,
wrong types, non-finite numbers and out-of-range values raise :class:`~balpoe.errors.BalpoeError`
with one line naming the key.  ``--set key=value`` overrides use dotted keys (``optim.lr=0.05``)
and YAML syntax for the value.  The generic machinery (reading files, coercing values, overrides,
the Markdown reference ``docs/recipe.md``) lives in :mod:`balpoe.recipe._parse`.

Each package's ``build.py`` takes the section it needs (``build_data(recipe.data, ...)``,
``build_model(recipe.model, ...)``, ``build_criterion(recipe.loss, ...)``); everything below the
``build.py`` modules takes plain arguments.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from balpoe.errors import BalpoeError, quoted, shown
from balpoe.recipe._parse import (MAX_BATCH, MAX_EPOCHS, NAME_CHARS, PATH_CHARS, apply_overrides, build_section,
                                  check_kwargs, markdown_reference, parse_override, read_mapping)

__all__ = ["flat_keys", "AugmentConfig", "DataConfig", "ModelConfig", "LossConfig", "OptimConfig", "TrainConfig", "Stage2Config",
           "Recipe", "load_recipe", "recipe_from_dict", "apply_overrides", "parse_override", "check_kwargs",
           "reference_markdown"]


def _f(default: Any = None, *, choices: tuple | None = None, min: float | None = None,  # noqa: A002
       max: float | None = None, gt: float | None = None, max_len: int = NAME_CHARS, default_factory=None,  # noqa: A002
       doc: str = "", omit_default: bool = False):
    """A recipe key: its default (or ``default_factory``) and what :mod:`balpoe.recipe._parse`
    checks and documents: the allowed ``choices``, the bounds ``min`` <= value <= ``max`` and
    value > ``gt`` (each item of a list), the longest string ``max_len``, and ``doc`` (its line in
    ``docs/recipe.md``).  ``omit_default``: the resolved recipe (:meth:`Recipe.to_dict`) leaves the
    key out while it holds its default (keys added later: earlier recipes resolve as they did)."""
    meta = {"choices": choices, "min": min, "max": max, "gt": gt, "max_len": max_len, "doc": doc,
            "omit_default": omit_default}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)




@dataclass
class AugmentConfig:
    """Training augmentation.  In-memory data (built-in datasets and small image folders, device
    path, in this order): pad-and-crop, flip, rotation, ``policy``, Cutout.  Image files read per
    epoch: RandomResizedCrop (or pad-and-crop), flip, rotation, colour jitter, ``policy``, Cutout.
    Keys that do not apply to the dataset's pipeline are refused (``balpoe.data.pipeline``)."""
    crop: str = _f("auto", choices=("auto", "pad_crop", "random_resized_crop", "none"),
                   doc="training crop: pad_crop (zero padding + random crop, CIFAR-style), random_resized_crop "
                       "(ImageNet-style) or none; auto: pad_crop for in-memory datasets and small images (<= 64 px), "
                       "random_resized_crop for larger image files")
    crop_padding: Union[int, None] = _f(None, min=0, max=256, doc="pad_crop: zero padding of the random crop "
                                                                 "(null: 4; 0 = no crop)")
    crop_scale: Union[list[float], None] = _f(None, gt=0, max=1, doc="random_resized_crop: range of the crop's area "
                                                                    "fraction (null: [0.08, 1])")
    crop_ratio: Union[list[float], None] = _f(None, gt=0, max=100, doc="random_resized_crop: range of the crop's "
                                                                      "aspect ratio (null: [0.75, 1.3333])")
    flip: bool = _f(True, doc="random horizontal flip")
    rotation: Union[float, None] = _f(None, min=0, max=180, doc="random rotation in [-deg, deg] (null: 15 for the "
                                                               "built-in in-memory datasets as BalPoE CIFAR, 0 for "
                                                               "image files)")
    policy: str = _f("none", choices=("none", "autoaugment_cifar10", "autoaugment_cifar10_official", "randaugment",
                                      "trivialaugment"),
                     doc="strong augmentation per sample: AutoAugment (CIFAR-10 policy) in torchvision's form or in "
                         "the official BalPoE code's PIL form (CIFAR10Policy: rotate +theta, bicubic shear, grey "
                         "fill, ...), RandAugment, TrivialAugmentWide")
    randaugment: str = _f("rand-n2-m10-mstd0.5", doc="timm RandAugment config string (policy: randaugment)")
    cutout: int = _f(0, min=0, max=1024, doc="Cutout hole side in pixels (0 = off; DeVries & Taylor 2017)")
    interpolation: Union[str, None] = _f(None, choices=(None, "nearest", "bilinear"),
                                         doc="resampling of the policy's geometric ops (null: the policy's "
                                             "reference default: nearest for AutoAugment/TrivialAugment, "
                                             "bilinear for RandAugment)")
    fill: Union[list[int], None] = _f(None, min=0, max=255,
                                      doc="fill colour of the policy's geometric ops, one value or one per channel "
                                          "(null: the policy's reference fill: the dataset mean for randaugment, 0 for "
                                          "autoaugment_cifar10 / trivialaugment, 128 for autoaugment_cifar10_official)")
    color_jitter: Union[bool, None] = _f(None, doc="image files: ColorJitter(0.4, 0.4, 0.4, 0) (null: the "
                                                   "dataset's default, on with policy randaugment; image_folder / "
                                                   "image_list: on for large images, off for small ones)")


@dataclass
class DataConfig:
    dataset: str = _f("cifar100", doc="a registered dataset (balpoe.data.registry): cifar10, cifar100, "
                                      "fashion_mnist, imagenet_lt, places_lt, inat, ...")
    root: Union[str, None] = _f(None, max_len=PATH_CHARS,
                                doc="data directory (default: ./data, or the dataset's usual place)")
    download: bool = _f(False, doc="download through torchvision when the files are missing")
    imb_factor: float = _f(100.0, min=1, doc="imbalance ratio N_max / N_min of the LT training split")
    imb_profile: str = _f("exp", choices=("exp", "step"))
    augment: AugmentConfig = _f(default_factory=AugmentConfig)
    sampler: str = _f("instance", choices=("instance", "class_balanced", "class_aware"),
                      doc="training stream: instance (each image once), class_balanced (class, then image, "
                          "drawn with replacement), class_aware (official MiSLAS stage 2: classes in shuffled "
                          "cycles, images_per_class_visit images a visit, ceil(n/B)+1 batches an epoch)")
    images_per_class_visit: int = _f(4, min=1, max=MAX_BATCH, doc="images per class visit of sampler class_aware "
                                                                  "(num_samples_cls, 4 in MiSLAS)")
    many_threshold: int = _f(100, min=0, max=10 ** 9, doc="many-shot: more than this many training images")
    few_threshold: int = _f(20, min=0, max=10 ** 9, doc="few-shot: fewer than this many training images")
    groups: str = _f("counts", choices=("counts", "ranges"),
                     doc="many/medium/few groups: counts (training counts vs many_threshold / few_threshold, Liu et "
                         "al. 2019) or ranges (class-index ranges data.group_ranges, as the official MiSLAS code)")
    group_ranges: list[int] = _f(min=0, max=10 ** 9, default_factory=list,
                                 doc="groups: ranges: [a, b]: many = labels 0..a-1, medium = a..b-1, few = b.. "
                                     "(MiSLAS CIFAR-100: [36, 71], CIFAR-10: [3, 7])")
    holdout_fraction: float = _f(0.0, min=0, max=0.5,
                                 doc="stratified slice of the LT training split held out (calibration)")
    loader: str = _f("auto", choices=("auto", "device", "dataloader"))
    num_workers: int = _f(4, min=0, max=256, doc="DataLoader workers (dataloader path only)")
    image_size: Union[int, None] = _f(None, min=8, max=4096,
                                      doc="image files: crop size the model sees (null: 224, or the images' own "
                                          "size for small images)")
    channels: Union[int, None] = _f(None, min=1, max=3,
                                    doc="image_folder / image_list: 1 (grey) or 3 (RGB) input channels (null: 1 when "
                                        "the sampled images are all grey, else 3)")
    normalize: str = _f("auto", choices=("auto", "computed", "imagenet"),
                        doc="normalisation constants: computed (per-channel mean/std of the training split), imagenet, "
                            "or auto (the dataset's own constants; image_folder / image_list: computed for small "
                            "images, imagenet for large ones); data.mean/std give them explicitly")
    mean: Union[list[float], None] = _f(None, min=0, max=1, doc="normalisation mean per channel, in [0, 1]")
    std: Union[list[float], None] = _f(None, gt=0, max=10, doc="normalisation standard deviation per channel")
    test_crop_fraction: Union[float, None] = _f(None, gt=0, max=1,
                                                doc="image files, test time: resize the shorter side to image_size / "
                                                    "fraction, then centre-crop image_size (null: 224/256 for "
                                                    "random_resized_crop, 1 otherwise)")
    in_memory: Union[bool, str] = _f("auto", choices=(True, False, "auto"),
                                     doc="image files: decode once into uint8 tensors and augment on the training "
                                         "device like the built-in datasets (auto: when the pipeline has no "
                                         "random_resized_crop / colour jitter and the images fit "
                                         "balpoe.data.pipeline.IN_MEMORY_BUDGET)")
    decode: str = _f("tensor", choices=("tensor", "pil"),
                     doc="image files: torchvision decoding into uint8 tensors (faster, same random draws) or PIL")
    train_root: Union[str, None] = _f(None, max_len=PATH_CHARS,
                                      doc="image_folder: training folder of class sub-folders (root/<class>/<image>)")
    val_root: Union[str, None] = _f(None, max_len=PATH_CHARS,
                                    doc="image_folder: validation folder (the calibration holdout)")
    test_root: Union[str, None] = _f(None, max_len=PATH_CHARS, doc="image_folder: test folder")
    test_fraction: float = _f(0.0, min=0, max=0.9, doc="no test split: a stratified slice of the training "
                                                      "images (seeded with the recipe seed) is the test set")
    train_list: Union[str, None] = _f(None, max_len=PATH_CHARS,
                                      doc="image_list (and the LT list datasets): 'path label' lines, the paths "
                                          "relative to data.root; the file itself in data.root or the working dir")
    val_list: Union[str, None] = _f(None, max_len=PATH_CHARS,
                                    doc="validation list (the calibration holdout); imagenet_lt / places_lt use "
                                        "ImageNet_LT_val.txt / Places_LT_val.txt in data.root when present")
    test_list: Union[str, None] = _f(None, max_len=PATH_CHARS, doc="test list ('path label' lines)")
    class_names: Union[str, None] = _f(None, max_len=PATH_CHARS,
                                       doc="list datasets: file of class names, one a line in label order "
                                           "(default: the label numbers)")
    lt_subsample: Union[bool, None] = _f(None, doc="build the LT training split from balanced classes with "
                                                   "data.imb_factor (null: the dataset's default, on for CIFAR "
                                                   "and Fashion-MNIST, off for image files)")
    test_lists: list[str] = _f(default_factory=list, max_len=PATH_CHARS,
                               doc="test-distribution list files ('path label' lines, subsets of the test split) "
                                   "evaluated by label-shift evaluation, named by their file stem")


@dataclass
class ModelConfig:
    backbone: str = _f("resnet32_cifar", doc="any timm model name")
    num_experts: int = _f(3, min=1, max=64)
    split: str = _f("head", doc="'head' (experts own only heads) or the name of the last shared stage")
    head: str = _f("cosine", choices=("linear", "cosine"))
    head_init: str = _f("default", choices=("default", "kaiming"), doc="linear heads: torch default, kaiming_normal_")
    scale: float = _f(30.0, gt=0, doc="cosine head scale s")
    pretrained_file: Union[str, None] = _f(None, max_len=PATH_CHARS, doc="local state_dict to load into the backbone")
    pretrained: bool = _f(False, doc="timm's pretrained weights for model.backbone (downloaded once; offline: "
                                     "model.pretrained_file)")
    pretrained_strict: bool = _f(True, doc="refuse a model.pretrained_file whose keys or shapes do not all match "
                                           "the backbone (false: load the matching tensors and report the rest)")
    batched_experts: bool = _f(False, doc="run the expert branches together as grouped convolutions "
                                          "(same maths and checkpoint keys; a GPU speed lever)")
    kwargs: dict = _f(default_factory=dict, doc="extra keyword arguments for timm.create_model")
    zero_init_last: Union[bool, None] = _f(None, doc="timm ResNets: start the last BN weight of every residual "
                                                     "branch at 0 (null: timm's default, true); false: 1, as "
                                                     "torchvision and the official BalPoE / MiSLAS ResNets "
                                                     "(zero_init_residual=False)")
    trainable: list[str] = _f(default_factory=list,
                              doc="backbone modules that train (dotted names, e.g. layer4.2); the rest of every "
                                  "backbone copy is frozen and kept in eval mode, the heads always train (empty: "
                                  "everything trains; official MiSLAS Places-LT: the block after the frozen "
                                  "pretrained ResNet-152)")
    reduce_dimension: bool = _f(False, omit_default=True,
                                doc="RIDE's reduced-width experts (official RIDE / SADE ResNet-32 reduce_dimension): "
                                    "the per-expert stages of a CIFAR ResNet (resnet*_cifar, model.split layer1) at "
                                    "3/4 width, layer2/layer3 24/48 instead of 32/64 channels")
    reinit: list[str] = _f(default_factory=list,
                           doc="backbone modules re-initialised (torch's default init) after the pretrained weights "
                               "are loaded: a freshly built block, e.g. layer4.2")


@dataclass
class LossConfig:
    """The stage-1 loss.  The tau keys belong to logit_adjusted; the keys after them to the baseline
    losses named in their description.  null: the loss's official default (in the description); a
    key set for a loss it does not apply to is refused (balpoe.losses.build.check_loss)."""
    name: str = _f("logit_adjusted", doc="a registered stage-1 loss (balpoe.losses.build.LOSSES): logit_adjusted, "
                                         "ce, focal, class_balanced, ldam, balanced_softmax, ride, sade")
    tau: Union[list[float], None] = _f(None, doc="per-expert tau; default: evenly from tau_min..tau_max")
    tau_min: float = _f(0.0)
    tau_max: float = _f(2.0)
    tau_spacing: str = _f("limits", choices=("limits", "uniform"))
    gamma: Union[float, None] = _f(None, omit_default=True, min=0, doc="focal exponent: focal (null: 2, Lin et al. 2017), "
                                                   "class_balanced with base focal (null: 1, class-balanced-loss code)")
    focal_form: Union[str, None] = _f(None, omit_default=True, choices=(None, "paper", "ldam_drw"),
                                      doc="where the class weight goes in focal: paper (w_y (1-p)^gamma CE) or "
                                          "ldam_drw (focal of the weighted CE, the LDAM-DRW code); focal, "
                                          "class_balanced with base focal (null: paper)")
    base: Union[str, None] = _f(None, omit_default=True, choices=(None, "ce", "focal"),
                                doc="class_balanced: the weighted loss, softmax cross-entropy or focal (null: ce)")
    beta: Union[float, None] = _f(None, omit_default=True, min=0,
                                  doc="effective-number beta of the class-balanced weights (Cui et al. 2019), < 1: "
                                      "class_balanced, ldam, ride (null: 0.9999)")
    reduction: Union[str, None] = _f(None, omit_default=True, choices=(None, "mean", "weighted_mean"),
                                     doc="class_balanced: batch mean of w_y l (mean, the class-balanced-loss code) "
                                         "or sum w_y l / sum w_y (weighted_mean, torch / LDAM-DRW) (null: mean)")
    drw_epoch: Union[int, None] = _f(None, omit_default=True, min=0, max=MAX_EPOCHS,
                                     doc="deferred re-weighting: class weights from this 0-based epoch on, 1 before "
                                         "(Cao et al. 2019); ldam, ride (null: 160), class_balanced (null: 0, "
                                         "weighted from the start)")
    max_m: Union[float, None] = _f(None, omit_default=True, gt=0, doc="largest LDAM margin (the rarest class's): ldam, ride "
                                                   "(null: 0.5)")
    s: Union[float, None] = _f(None, omit_default=True, gt=0, doc="cosine-logit scale the LDAM margin is multiplied by; must equal "
                                               "model.scale: ldam, ride (null: 30)")
    diversity_factor: Union[float, None] = _f(None, omit_default=True, doc="ride: lambda of the diversity term, < 0 pushes experts "
                                                        "apart (null: -0.2, official RIDELoss)")
    diversity_temperature: Union[float, None] = _f(None, omit_default=True, gt=0, doc="ride: temperature T of the diversity KL "
                                                                   "(null: 1)")
    reweight_factor: Union[float, None] = _f(None, omit_default=True, min=0, max=1,
                                             doc="ride: r of the per-class diversity temperature from drw_epoch on "
                                                 "(null: 0.05)")
    sade_tau: Union[float, None] = _f(None, omit_default=True, doc="sade: lambda of the backward expert's inverse prior "
                                                "(null: 2, official CIFAR-100-LT / ImageNet-LT; 1 iNat / Places)")


@dataclass
class OptimConfig:
    lr: float = _f(0.1, gt=0)
    momentum: float = _f(0.9, min=0, max=1)
    nesterov: bool = _f(True)
    weight_decay: float = _f(5e-4, min=0)
    batch_size: int = _f(128, min=1, max=MAX_BATCH)
    epochs: int = _f(200, min=1, max=MAX_EPOCHS)
    warmup_epochs: int = _f(5, min=0, max=MAX_EPOCHS, doc="linear warmup lr*(e+1)/W for e < W (official BalPoE)")
    schedule: str = _f("multistep", choices=("multistep", "cosine", "constant"))
    milestones: list[int] = _f(min=1, max=MAX_EPOCHS, default_factory=lambda: [160, 180],
                              doc="epochs at which a multistep schedule multiplies the lr by gamma")
    gamma: float = _f(0.1, gt=0)
    min_lr: float = _f(0.0, min=0, doc="eta_min of the cosine schedule")


@dataclass
class TrainConfig:
    mixup_alpha: float = _f(0.4, min=0, doc="Beta(alpha, alpha) mixup; 0 turns mixup off")
    device: str = _f("auto", doc="auto, cpu, cuda, cuda:N")
    amp: bool = _f(False, doc="bf16 autocast where native: CUDA, AVX512-BF16/AMX CPUs (heads, loss in fp32)")
    channels_last: bool = _f(False)
    compile: Union[bool, str] = _f(False, choices=(False, True, "auto"),
                                   doc="torch.compile the model; auto: on CUDA devices only (on a CPU "
                                       "compiling does not repay its time)")
    compile_mode: str = _f("default", choices=("default", "reduce-overhead", "max-autotune",
                                              "max-autotune-no-cudagraphs"),
                           doc="torch.compile mode ('reduce-overhead': CUDA graphs)")
    sync_bn: bool = _f(False, doc="SyncBatchNorm under torchrun")
    checkpoint_every: int = _f(10, min=1, max=MAX_EPOCHS)
    eval_every: int = _f(0, min=0, max=MAX_EPOCHS,
                         doc="test curve: evaluate on the test set every N epochs (0: only at the end); metrics.jsonl "
                             "gets test_acc/many/medium/few/ece, eval.json's test_curve and report.html also the best "
                             "epoch on the test set (as the official logs report; optimistic, never the headline)")
    eval_batch_size: int = _f(1024, min=1, max=MAX_BATCH)
    val_every: int = _f(0, min=0, max=MAX_EPOCHS, doc="evaluate the validation split (data.val_root / val_list / "
                                                     "holdout_fraction) every N epochs and keep OUT/best.pt "
                                                     "(0: off)")
    select_metric: str = _f("balanced_acc", choices=("balanced_acc", "nll"),
                            doc="validation metric best.pt is chosen by: balanced accuracy (higher) or "
                                "class-balanced NLL (lower)")
    early_stop_patience: int = _f(0, min=0, max=MAX_EPOCHS,
                                  doc="stop after this many validations without a better select_metric (0: never)")
    threads: int = _f(0, min=0, max=1024, doc="CPU threads for torch (0: torch's default; training on the CPU: "
                                              "at most the cores the 1-minute load average leaves free, at least 1)")
    log_tensorboard: bool = _f(False, doc="also log to OUT/tensorboard (pip install 'balpoe[tensorboard]')")


@dataclass
class Stage2Config:
    """MiSLAS stage 2 (classifier re-training); used when ``stage: 2``."""
    init_checkpoint: Union[str, None] = _f(None, max_len=PATH_CHARS, doc="stage-1 checkpoint to start from")
    classifier: str = _f("mislas", choices=("mislas", "lws", "crt"))
    shifted_bn: bool = _f(True, doc="re-estimate BN statistics on the class-balanced stream")
    delta_lr_factor: float = _f(0.2, min=0, doc="learning-rate factor of dW")
    eps_1: float = _f(0.0, min=0, max=1, doc="LAS smoothing of the most frequent class")
    eps_k: float = _f(0.0, min=0, max=1, doc="LAS smoothing of the rarest class")
    las_form: str = _f("concave", choices=("concave", "linear", "convex", "power"))
    las_power: Union[float, None] = _f(None, gt=0, doc="exponent p of the power form (Eq. 7)")
    las_target: str = _f("paper", choices=("paper", "official"),
                         doc="LAS target: paper (Eq. 1: eps_y/(K-1) on each wrong class) or official (MiSLAS "
                             "methods.py: eps_y/K on every class, the label too)")
    weight_decay_target: str = _f("stage1", choices=("stage1", "zero"),
                                  doc="classifier 'mislas': where weight decay pulls it: stage1 (Eq. 4 as written: "
                                      "dW -> 0, towards the stage-1 W) or zero (official MiSLAS train_stage2.py: "
                                      "the fine-tuned W, b -> 0)")
    expert_adjust: str = _f("relative", choices=("relative", "absolute", "none"),
                            doc="logit offset of expert k in the stage-2 loss: relative (tau_k - mean tau), "
                                "absolute (tau_k, as stage 1) or none; 0 for E = 1 with relative")


@dataclass
class Recipe:
    name: str = _f("balpoe")
    seed: int = _f(0, min=0, max=2 ** 32 - 1, doc="numpy accepts seeds below 2**32")
    stage: int = _f(1, choices=(1, 2))
    data: DataConfig = _f(default_factory=DataConfig)
    model: ModelConfig = _f(default_factory=ModelConfig)
    loss: LossConfig = _f(default_factory=LossConfig)
    optim: OptimConfig = _f(default_factory=OptimConfig)
    train: TrainConfig = _f(default_factory=TrainConfig)
    stage2: Stage2Config = _f(default_factory=Stage2Config)

    def to_dict(self) -> dict:
        # asdict deep-copies model.kwargs: bound it first (a YAML alias chain would expand).
        check_kwargs(self.model.kwargs, "model.kwargs")
        return _omit_defaults(self, dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _omit_defaults(section: Any, out: dict) -> dict:
    """``out`` (``section`` as a dict) without the ``omit_default`` keys that hold their default."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            _omit_defaults(value, out[f.name])
        elif f.metadata.get("omit_default") and value == f.default:
            del out[f.name]
    return out


# ---------------------------------------------------------------------------------------------
# Rules between keys

#: timm.create_model arguments balpoe sets itself.
_RESERVED_KWARGS = {"num_classes": "the number of classes comes from the dataset",
                    "in_chans": "the number of channels comes from the dataset",
                    "pretrained": "use model.pretrained or model.pretrained_file"}


#: a run name is a plain name: it becomes the default output folder runs/<name>
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def _cross_checks(r: Recipe) -> None:
    """The rules that relate keys to each other (each key alone was checked when it was parsed)."""
    if not _PLAIN_NAME.match(r.name) or ".." in r.name:
        raise BalpoeError(f"recipe key 'name' must be a plain name (letters, digits, '.', '_', '+', '-'; no path), "
                          f"got {quoted(r.name)}")
    if r.loss.tau is not None and len(r.loss.tau) != r.model.num_experts:
        raise BalpoeError(f"recipe key 'loss.tau' has {len(r.loss.tau)} values but model.num_experts is "
                          f"{r.model.num_experts}")
    if r.loss.tau_min > r.loss.tau_max:
        raise BalpoeError(f"recipe key 'loss.tau_min' ({r.loss.tau_min}) must not exceed loss.tau_max "
                          f"({r.loss.tau_max})")
    if r.optim.warmup_epochs >= r.optim.epochs:
        raise BalpoeError(f"recipe key 'optim.warmup_epochs' ({r.optim.warmup_epochs}) must be smaller than "
                          f"optim.epochs ({r.optim.epochs})")
    if r.optim.min_lr > r.optim.lr:
        raise BalpoeError(f"recipe key 'optim.min_lr' ({r.optim.min_lr}) must not exceed optim.lr ({r.optim.lr})")
    if r.optim.schedule == "multistep":
        if sorted(r.optim.milestones) != r.optim.milestones:
            raise BalpoeError(f"recipe key 'optim.milestones' must be increasing, got {shown(r.optim.milestones)}")
        early = [m for m in r.optim.milestones if m < r.optim.warmup_epochs]
        if early:
            raise BalpoeError(f"recipe key 'optim.milestones' has {early[0]} inside the warmup: milestones must be "
                              f">= optim.warmup_epochs ({r.optim.warmup_epochs})")
    if r.data.test_fraction > 0:
        for key in ("test_root", "test_list"):
            if getattr(r.data, key):
                raise BalpoeError(f"recipe key 'data.test_fraction' ({r.data.test_fraction}) and data.{key} both give "
                                  "a test split: set one")
    if r.data.holdout_fraction > 0:
        for key in ("val_root", "val_list"):
            if getattr(r.data, key):
                raise BalpoeError(f"recipe key 'data.holdout_fraction' ({r.data.holdout_fraction}) and data.{key} both "
                                  f"give the calibration holdout: set data.holdout_fraction: 0 to use data.{key}")
    if len(set(r.data.test_lists)) != len(r.data.test_lists):
        raise BalpoeError(f"recipe key 'data.test_lists' names a file twice: {shown(r.data.test_lists)}")
    if r.model.pretrained and r.model.pretrained_file:
        raise BalpoeError("recipe keys 'model.pretrained' and 'model.pretrained_file' both give initial weights: set "
                          "one")
    if r.data.groups == "ranges" and (len(r.data.group_ranges) != 2 or r.data.group_ranges[0] > r.data.group_ranges[1]):
        raise BalpoeError(f"recipe key 'data.group_ranges' must be two boundaries [a, b] with a <= b when "
                          f"data.groups is ranges, got {shown(r.data.group_ranges)}")
    _check_pipeline_keys(r)
    if r.data.few_threshold > r.data.many_threshold:
        raise BalpoeError("recipe key 'data.few_threshold' must not exceed data.many_threshold")
    if "zero_init_last" in r.model.kwargs:
        raise BalpoeError("recipe key 'model.kwargs' must not set 'zero_init_last' (use model.zero_init_last)")
    for name, why in _RESERVED_KWARGS.items():
        if name in r.model.kwargs:
            raise BalpoeError(f"recipe key 'model.kwargs' must not set '{name}' ({why})")
    if r.stage == 2:
        if not r.stage2.init_checkpoint:
            raise BalpoeError("recipe key 'stage2.init_checkpoint' is required when stage is 2")
        if r.stage2.eps_k > r.stage2.eps_1:
            raise BalpoeError(f"recipe key 'stage2.eps_k' ({r.stage2.eps_k}) must not exceed "
                              f"stage2.eps_1 ({r.stage2.eps_1})")
        if r.stage2.las_form == "power" and r.stage2.las_power is None:
            raise BalpoeError("recipe key 'stage2.las_power' is required when stage2.las_form is power")


def _check_pipeline_keys(r: Recipe) -> None:
    """Augmentation, normalisation and validation keys that only make sense together."""
    a, d = r.data.augment, r.data
    for key, pair in (("crop_scale", a.crop_scale), ("crop_ratio", a.crop_ratio)):
        if pair is not None and (len(pair) != 2 or pair[0] > pair[1]):
            raise BalpoeError(f"recipe key 'data.augment.{key}' must be two increasing numbers [low, high], got "
                              f"{shown(pair)}")
    if d.channels == 2:
        raise BalpoeError("recipe key 'data.channels' must be 1 (grey) or 3 (RGB), got 2")
    if (d.mean is None) != (d.std is None):
        raise BalpoeError("recipe keys 'data.mean' and 'data.std' go together: set both or neither")
    if d.mean is not None:
        if len(d.mean) != len(d.std) or len(d.mean) not in (1, 3):
            raise BalpoeError(f"recipe keys 'data.mean' and 'data.std' must hold one value per channel (1 or 3), got "
                              f"{len(d.mean)} and {len(d.std)}")
        if d.normalize != "auto":
            raise BalpoeError(f"recipe key 'data.normalize' is {d.normalize} but data.mean/std give the constants: set "
                              "one")
    if r.train.early_stop_patience and not r.train.val_every:
        raise BalpoeError("recipe key 'train.early_stop_patience' needs train.val_every > 0 (early stopping watches "
                          "the validation split)")


def recipe_from_dict(raw: dict) -> Recipe:
    """Validate a plain dict (e.g. parsed YAML) into a :class:`Recipe`."""
    recipe = build_section(Recipe, raw)
    _cross_checks(recipe)
    return recipe


def flat_keys(d: dict, prefix: str = "") -> dict:
    """A nested recipe dict (:meth:`Recipe.to_dict`) as dotted key -> value (``model.kwargs``, a
    mapping handed to the backbone, stays one value): what resuming and ``balpoe compare`` compare."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "kwargs":
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply ``key=value`` overrides and validate it."""
    return recipe_from_dict(apply_overrides(read_mapping(path), overrides or []))


def reference_markdown() -> str:
    """Every recipe key with its type, default, allowed values and description, as Markdown
    (``docs/recipe.md``; regenerate it with ``python -c "from balpoe.recipe import reference_markdown as r;
    print(r(), end='')" > docs/recipe.md``)."""
    return markdown_reference(Recipe, (
        "Generated from the schema in `balpoe/recipe/__init__.py` by `reference_markdown()` (a test checks it is "
        "up to date: `python -c \"from balpoe.recipe import reference_markdown as r; print(r(), end='')\" > "
        "docs/recipe.md`). Unknown keys, wrong types and out-of-range values are one-line errors naming the key; "
        "`--set section.key=value` overrides any key."))
