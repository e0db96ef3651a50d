"""Recipes: YAML files validated into typed dataclasses.

A recipe has the sections ``data``, ``model``, ``loss``, ``optim``, ``train`` and (for MiSLAS-style
decoupled training) ``stage2``.  Every key is declared below with its type and allowed range;
unknown keys, wrong types and out-of-range values raise :class:`~balpoe.errors.BalpoeError` with
one line naming the key.  ``--set key=value`` overrides use dotted keys (``optim.lr=0.05``) and
YAML syntax for the value.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from balpoe.errors import BalpoeError


def _f(default: Any = None, *, choices: tuple | None = None, min: float | None = None,  # noqa: A002
       max: float | None = None, gt: float | None = None, default_factory=None, doc: str = ""):  # noqa: A002
    meta = {"choices": choices, "min": min, "max": max, "gt": gt, "doc": doc}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class AugmentConfig:
    """Training augmentation of the in-memory path (torchvision order: crop, flip, rotation)."""
    crop_padding: int = _f(4, min=0, doc="zero padding of the random crop (0 = no crop)")
    flip: bool = _f(True, doc="random horizontal flip")
    rotation: float = _f(15.0, min=0, max=180, doc="random rotation in [-deg, deg] (BalPoE CIFAR: 15)")


@dataclass
class DataConfig:
    dataset: str = _f("cifar100", doc="a registered dataset (balpoe.data.registry): cifar10, cifar100, "
                                      "fashion_mnist, imagenet_lt, places_lt, inat, ...")
    root: Union[str, None] = _f(None, doc="data directory (default: ./data, or the dataset's usual place)")
    download: bool = _f(False, doc="download through torchvision when the files are missing")
    imb_factor: float = _f(100.0, min=1, doc="imbalance ratio N_max / N_min of the LT training split")
    imb_profile: str = _f("exp", choices=("exp", "step"))
    augment: AugmentConfig = _f(default_factory=AugmentConfig)
    sampler: str = _f("instance", choices=("instance", "class_balanced"))
    many_threshold: int = _f(100, min=0, doc="many-shot: more than this many training images")
    few_threshold: int = _f(20, min=0, doc="few-shot: fewer than this many training images")
    holdout_fraction: float = _f(0.0, min=0, max=0.5,
                                 doc="stratified slice of the LT training split held out (calibration)")
    loader: str = _f("auto", choices=("auto", "device", "dataloader"))
    num_workers: int = _f(4, min=0, doc="DataLoader workers (dataloader path only)")
    image_size: int = _f(224, min=8, doc="crop size of the image-folder datasets")


@dataclass
class ModelConfig:
    backbone: str = _f("resnet32_cifar", doc="any timm model name")
    num_experts: int = _f(3, min=1)
    split: str = _f("head", doc="'head' (experts own only heads) or the name of the last shared stage")
    head: str = _f("cosine", choices=("linear", "cosine"))
    scale: float = _f(30.0, gt=0, doc="cosine head scale s")
    pretrained_file: Union[str, None] = _f(None, doc="local state_dict to load into the backbone")
    batched_experts: bool = _f(False, doc="run the expert branches together as grouped convolutions "
                                          "(same maths and checkpoint keys; a GPU speed lever)")
    kwargs: dict = _f(default_factory=dict, doc="extra keyword arguments for timm.create_model")


@dataclass
class LossConfig:
    name: str = _f("logit_adjusted", doc="a registered stage-1 loss (balpoe.losses.build.LOSSES)")
    tau: Union[list[float], None] = _f(None, doc="per-expert tau; default: evenly from tau_min..tau_max")
    tau_min: float = _f(0.0)
    tau_max: float = _f(2.0)
    tau_spacing: str = _f("limits", choices=("limits", "uniform"))


@dataclass
class OptimConfig:
    lr: float = _f(0.1, gt=0)
    momentum: float = _f(0.9, min=0, max=1)
    nesterov: bool = _f(True)
    weight_decay: float = _f(5e-4, min=0)
    batch_size: int = _f(128, min=1)
    epochs: int = _f(200, min=1)
    warmup_epochs: int = _f(5, min=0, doc="linear warmup lr*(e+1)/W for e < W (official BalPoE)")
    schedule: str = _f("multistep", choices=("multistep", "cosine", "constant"))
    milestones: list[int] = _f(default_factory=lambda: [160, 180])
    gamma: float = _f(0.1, gt=0)
    min_lr: float = _f(0.0, min=0, doc="eta_min of the cosine schedule")


@dataclass
class TrainConfig:
    mixup_alpha: float = _f(0.4, min=0, doc="Beta(alpha, alpha) mixup; 0 turns mixup off")
    device: str = _f("auto", doc="auto, cpu, cuda, cuda:N")
    amp: bool = _f(False, doc="bf16 autocast where native: CUDA, AVX512-BF16/AMX CPUs (heads, loss in fp32)")
    channels_last: bool = _f(False)
    compile: bool = _f(False, doc="torch.compile the model")
    compile_mode: str = _f("default", choices=("default", "reduce-overhead", "max-autotune",
                                              "max-autotune-no-cudagraphs"),
                           doc="torch.compile mode ('reduce-overhead': CUDA graphs)")
    sync_bn: bool = _f(False, doc="SyncBatchNorm under torchrun")
    checkpoint_every: int = _f(10, min=1)
    eval_every: int = _f(0, min=0, doc="evaluate on the test set every N epochs (0: only at the end)")
    eval_batch_size: int = _f(1024, min=1)
    threads: int = _f(0, min=0, doc="CPU threads for torch (0: torch's default)")


@dataclass
class Stage2Config:
    """MiSLAS stage 2 (classifier re-training); used when ``stage: 2``."""
    init_checkpoint: Union[str, None] = _f(None, doc="stage-1 checkpoint to start from")
    classifier: str = _f("mislas", choices=("mislas", "lws", "crt"))
    shifted_bn: bool = _f(True, doc="re-estimate BN statistics on the class-balanced stream")
    delta_lr_factor: float = _f(0.2, min=0, doc="learning-rate factor of dW")
    eps_1: float = _f(0.0, min=0, max=1, doc="LAS smoothing of the most frequent class")
    eps_k: float = _f(0.0, min=0, max=1, doc="LAS smoothing of the rarest class")
    las_form: str = _f("concave", choices=("concave", "linear", "convex", "power"))
    las_power: Union[float, None] = _f(None, gt=0, doc="exponent p of the power form (Eq. 7)")
    expert_adjust: str = _f("relative", choices=("relative", "absolute", "none"),
                            doc="logit offset of expert k in the stage-2 loss: relative (tau_k - mean tau), "
                                "absolute (tau_k, as stage 1) or none; 0 for E = 1 with relative")


@dataclass
class Recipe:
    name: str = _f("balpoe")
    seed: int = _f(0, min=0)
    stage: int = _f(1, choices=(1, 2))
    data: DataConfig = _f(default_factory=DataConfig)
    model: ModelConfig = _f(default_factory=ModelConfig)
    loss: LossConfig = _f(default_factory=LossConfig)
    optim: OptimConfig = _f(default_factory=OptimConfig)
    train: TrainConfig = _f(default_factory=TrainConfig)
    stage2: Stage2Config = _f(default_factory=Stage2Config)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Validation


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0]).split(' ', 1)[-1]}s"
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_null = [a for a in args if a is not type(None)]
        if len(non_null) == 1:  # Optional[X]: X's own (more precise) message
            return _coerce(value, non_null[0], key)
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except BalpoeError:
                pass
        raise BalpoeError(f"recipe key '{key}' must be {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise BalpoeError(f"recipe key '{key}' must be {_type_name(tp)}, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return dict(value)
    raise BalpoeError(f"recipe key '{key}' must be {_type_name(tp)}, got {value!r}")


def _check_range(value: Any, meta: dict, key: str) -> None:
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise BalpoeError(f"recipe key '{key}' must be one of {', '.join(map(str, meta['choices']))}; got {value!r}")
    vals = value if isinstance(value, list) else [value]
    for v in vals:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if meta.get("min") is not None and v < meta["min"]:
            raise BalpoeError(f"recipe key '{key}' must be >= {meta['min']}, got {v!r}")
        if meta.get("max") is not None and v > meta["max"]:
            raise BalpoeError(f"recipe key '{key}' must be <= {meta['max']}, got {v!r}")
        if meta.get("gt") is not None and v <= meta["gt"]:
            raise BalpoeError(f"recipe key '{key}' must be > {meta['gt']}, got {v!r}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "recipe"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise BalpoeError(f"recipe section '{where}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in fields:
            raise BalpoeError(f"unknown recipe key '{prefix}{k}' (known in '{where}': {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        key, tp = f"{prefix}{name}", hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, raw[name], key + ".")
        else:
            value = _coerce(raw[name], tp, key)
            _check_range(value, dict(f.metadata), key)
            kwargs[name] = value
    return cls(**kwargs)


def _cross_checks(r: Recipe) -> None:
    if r.loss.tau is not None and len(r.loss.tau) != r.model.num_experts:
        raise BalpoeError(f"recipe key 'loss.tau' has {len(r.loss.tau)} values but model.num_experts is "
                          f"{r.model.num_experts}")
    if r.optim.warmup_epochs >= r.optim.epochs:
        raise BalpoeError(f"recipe key 'optim.warmup_epochs' ({r.optim.warmup_epochs}) must be smaller than "
                          f"optim.epochs ({r.optim.epochs})")
    if r.optim.schedule == "multistep" and sorted(r.optim.milestones) != r.optim.milestones:
        raise BalpoeError(f"recipe key 'optim.milestones' must be increasing, got {r.optim.milestones}")
    if r.data.few_threshold > r.data.many_threshold:
        raise BalpoeError("recipe key 'data.few_threshold' must not exceed data.many_threshold")
    if r.stage == 2:
        if not r.stage2.init_checkpoint:
            raise BalpoeError("recipe key 'stage2.init_checkpoint' is required when stage is 2")
        if r.stage2.eps_k > r.stage2.eps_1:
            raise BalpoeError(f"recipe key 'stage2.eps_k' ({r.stage2.eps_k}) must not exceed "
                              f"stage2.eps_1 ({r.stage2.eps_1})")
        if r.stage2.las_form == "power" and r.stage2.las_power is None:
            raise BalpoeError("recipe key 'stage2.las_power' is required when stage2.las_form is power")


def recipe_from_dict(raw: dict) -> Recipe:
    """Validate a plain dict (e.g. parsed YAML) into a :class:`Recipe`."""
    recipe = _build(Recipe, raw, "")
    _cross_checks(recipe)
    return recipe


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'optim.lr=0.05'`` -> (['optim', 'lr'], 0.05); the value is parsed as YAML."""
    if "=" not in text:
        raise BalpoeError(f"override expects key=value, got {text!r}")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise BalpoeError(f"override expects key=value, got {text!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides or []:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            if not isinstance(node.get(part, {}), dict):
                raise BalpoeError(f"override {text!r}: '{part}' is not a section")
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply ``key=value`` overrides and validate it."""
    path = Path(path)
    if not path.is_file():
        raise BalpoeError(f"recipe file '{path}' not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise BalpoeError(f"recipe file '{path}' is not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise BalpoeError(f"recipe file '{path}' must hold a mapping of sections")
    return recipe_from_dict(apply_overrides(raw, overrides or []))
