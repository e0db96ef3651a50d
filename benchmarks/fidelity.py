#!/usr/bin/env python
# fidelity.py -- end-to-end fidelity of the shipped BalPoE recipe: does the library as shipped
# (`balpoe train` with the recipe's speed levers: bf16 autocast, channels_last, device-resident
# augmentation) reach the accuracy and calibration of a faithful official-style training run?
# What: balanced test accuracy, ECE (15 bins), NLL and the mean accuracy over the 11 SADE test
# distributions (forward50 .. uniform .. backward50, no adaptation), per side and seed, mean +- std
# over seeds, and the difference library - reference of the means with its Welch standard error
# sqrt(s_a^2/n_a + s_b^2/n_b); |diff| <= 2 SE is the pass criterion.  --levers turns each speed
# lever off in turn, to attribute a difference.
# How: real Fashion-MNIST (zero-padded to 32x32, 3 channels) written in the CIFAR-10 pickle layout
# and read by recipes/balpoe/cifar10_lt_ir100.yaml (LT IR100: 14,886 training images); both sides
# train the same recipe, network construction (same initial weights) and schedule from the same
# seeds; the official-style side is benchmarks/reference_balpoe.py (PIL DataLoader, fp32 NCHW,
# global-RNG mixup, per-expert loss loop, torch.optim.SGD, CustomLR, seed_everything); both are
# evaluated by one evaluator (the library's collect_logits on its test loader, float32; metrics from
# balpoe.evaluate.metrics), so only training differs.
# Command (CPU: 12 epochs, warmup 1, milestones [9, 10], mixup 0.4, seeds 1 2 3, 1 thread; about
# 13 min per library run and 27 min per reference run on a free core; resumable, chunks below):
#   python benchmarks/fidelity.py                      # -> runs/fidelity/results.json
# Command (GPU: the recipe's full 200-epoch schedule, seeds 1 2 3):
#   python benchmarks/fidelity.py --device cuda --workers 4 --out runs/fidelity_gpu
# Results: see README 'Fidelity'
"""End-to-end fidelity of the shipped BalPoE recipe: the library as shipped vs a faithful
official-style training run, same data, same settings, same seeds, with statistics.

    python benchmarks/fidelity.py                          # CPU default: 12 epochs, seeds 1 2 3
    python benchmarks/fidelity.py --levers                 # + one run per speed lever turned off
    python benchmarks/fidelity.py --device cuda --workers 4 --out runs/fidelity_gpu   # 200 epochs

Sides (each trains ``recipes/balpoe/cifar10_lt_ir100.yaml`` with the same overrides and seed):

* **fast**: the library as shipped, ``balpoe.training.build.train`` (what ``balpoe train`` runs):
  device-resident data with batched augmentation, the library's loss, mixup streams and
  optimizer, and the recipe's speed levers (``train.amp: true`` = bf16 autocast where the device
  has native bf16, ``train.channels_last: true``);
* **reference**: ``reference_balpoe.train_reference``, a faithful re-implementation of the
  official training run (emasa/BalPoE-CalibratedLT: ``train.py``, ``trainer/trainer.py``,
  ``utils/combiner.py``, ``model/loss.py``): ``seed_everything``, a PIL ``DataLoader`` with the
  official CIFAR transforms (``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``,
  ``RandomRotation(15)``, ``ToTensor``, ``Normalize``) in ``--workers`` worker processes, float32
  NCHW, mixup with ``np.random.beta`` / ``torch.randperm`` from the global RNGs, the
  ``BSExpertLoss`` shape, ``torch.optim.SGD`` on all parameters and the official ``CustomLR``
  schedule; the same multi-expert network built from the recipe (architecture differences are
  excluded; with the same seed both sides even start from the same weights).
* **levers** (``--levers``): the fast side again with one speed lever off in turn -- bf16
  autocast (``train.amp=false``), channels_last (``train.channels_last=false``), device-resident
  augmentation (``data.loader=dataloader``: the library's own DataLoader path) -- and batched
  experts flipped (``model.batched_experts``); a lever that changes nothing on this device (bf16
  without native bf16) is skipped and listed.
* **diagnostics** (``--sides``, never by default): the mixup lambda stream swapped.  The official
  code re-seeds numpy's global generator with 0 while it builds the LT split, so every official
  run draws the same lambda sequence whatever its seed (its seeds are not independent in lambda);
  the library draws one sequence per seed and epoch.  ``reference_seed_mixup`` is the reference
  without that reset (lambdas from ``seed_everything(seed)``); ``fast_official_mixup`` is the fast
  side with its lambdas from the official stream (:func:`official_mixup_stream`).

Data: real Fashion-MNIST (the IDX files of the Debian package ``dataset-fashion-mnist`` or
``--fmnist-root``), each 28x28 image zero-padded to 32x32 and replicated to 3 channels, written
with ``balpoe.data.cifar.save_cifar`` in the CIFAR-10 python-pickle layout (bytes keys,
Fashion-MNIST class names) into ``--data-dir`` (default ``runs/fidelity/data``; reused when
present).  The recipe reads it with ``data.root=DIR data.download=false``; LT subsampling with
imbalance ratio 100 keeps 14,886 of the 60,000 training images (6000, 3597, ..., 60 per class);
the test set is the balanced 10,000 images.  Other recipes work too (any in-memory dataset; a
``fashion_mnist`` recipe reads ``--fmnist-root`` directly).

Schedule: on CUDA the recipe's own (200 epochs, warmup 5, lr x0.1 at 160 and 180, mixup alpha 0.8).
On the CPU the default is 12 epochs: ``--epochs E`` below the recipe's compresses the schedule
(warmup and milestones scaled by E / 200 and floored, warmup at least 1 and below E, milestones at
least 1: 12 epochs give warmup 1, milestones [9, 10]) and sets mixup alpha 0.4 (``--mixup-alpha``);
``--threads`` (default 1 on the CPU) sets ``train.threads`` for both sides.

Evaluation, identical for every run: the trained network (NCHW, float32, eval mode) on the
library's test loader (``balpoe.evaluate.logits.collect_logits``; batch 256 for every side,
``train.eval_batch_size``, which does not touch training), ensemble = mean expert logits;
balanced top-1, many/medium/few, ECE (15 bins), NLL (``balpoe.evaluate.metrics``); the 11 SADE
test distributions indexed from the same logits (``balpoe.shift.targets.target_sets`` with
``parse_test_dists("all")``, no adaptation) and their mean accuracy.  The fast side's own
``eval.json`` (bf16 evaluation where the recipe trains in bf16) is kept as ``library_eval``.

Statistics: per side and metric the mean and the sample std (ddof 1) over seeds; the difference
fast - reference of the means with the Welch standard error ``sqrt(s_a^2/n_a + s_b^2/n_b)`` and
whether ``|diff| <= 2 SE``; the JSON adds the paired difference over common seeds.  With both
diagnostic sides present, ``stream_matched`` (:func:`stream_matched`) compares library and
reference with the lambda streams matched, the 2 x 2 design of training code and lambda stream.

Output: ``--out DIR`` (default ``runs/fidelity``) holds one folder per side and seed
(``DIR/<side>/seed<S>/``: ``result.json``, ``test_logits.pt``, the training curve; the fast side's
library run in ``run/``) and ``DIR/results.json``; ``--json PATH`` writes a copy.  A side/seed whose
``result.json`` exists is reused (its configuration must match, else a one-line error), a folder
without one (an interrupted run) is started again (a reference run whose training finished and
whose evaluation was interrupted is only evaluated, from its ``model.pt``), so the long CPU job can
be resumed and split into chunks that run one after the other or side by side, e.g.::

    python benchmarks/fidelity.py --sides fast --seeds 1          # one chunk per side and seed ...
    python benchmarks/fidelity.py --sides reference --seeds 1
    python benchmarks/fidelity.py --report-only                   # ... then the table of all of them

``--report-only`` needs the flags of the runs (``--device``, ``--epochs``, ``--set``, ...): a
result made with another configuration is a one-line error, never mixed in.  Chunks may run side by
side (the data are written once, atomically; the reference's ``--workers`` processes need CPU time
too).

Cost on the CPU, 1 thread (measured on 2,048 images, so approximate): the library about 1 min per
epoch, the reference (PIL workers included) about 2.2 min; with the evaluations of the 10,000 test
images (the library's own and the shared float32 one) about 13 and 27 minutes per run, about 2 hours
for both sides and 3 seeds one after the other; ``--levers`` adds four library runs per seed.  Peak
memory about 1.7 GB per process (the float32 activations of ResNet-32 x 3 at batch 128).

``--limit N`` trains on N images of the LT split (a fixed random subset, the same for every side
and seed; the split is ordered by class, so its literal first N images would be one class): smoke
tests only.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import pickle
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from balpoe.data.build import build_data, build_loader
from balpoe.data.cifar import cifar_dir, save_cifar
from balpoe.data.fashion_mnist import CLASS_NAMES as FMNIST_CLASS_NAMES
from balpoe.data.fashion_mnist import find_fashion_mnist, load_fashion_mnist
from balpoe.data.registry import get_dataset
from balpoe.errors import BalpoeError, run_reporting_errors
from balpoe.evaluate.build import load_model
from balpoe.evaluate.logits import collect_logits
from balpoe.evaluate.metrics import accuracy
from balpoe.evaluate.report import report_from_logits
from balpoe.models.multi_expert import MultiExpertNet
from balpoe.recipe import Recipe, load_recipe
from balpoe.runtime.checkpoint import atomic_save, atomic_write_text, json_text, write_json
from balpoe.runtime.console import console as balpoe_console
from balpoe.runtime.device import device_name, resolve_device
from balpoe.runtime.precision import amp_dtype
from balpoe.shift.distributions import TEST_DISTRIBUTIONS
from balpoe.shift.targets import parse_test_dists, target_sets
from balpoe.training.build import build_plan, check_names, compile_enabled, train, write_results
from balpoe.training import trainer
from balpoe.training.trainer import train_model

# a sibling in benchmarks/ (a script's own directory is importable)
from reference_balpoe import official_numpy_reset, reference_model, train_reference  # isort: skip

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO / "recipes" / "balpoe" / "cifar10_lt_ir100.yaml"
DEFAULT_OUT = Path("runs/fidelity")
DEFAULT_DATA = Path("runs/fidelity/data")
CPU_EPOCHS = 12
SHORT_MIXUP_ALPHA = 0.4
#: evaluation batch of every side (does not change training; 1024 costs twice the time on a CPU)
EVAL_BATCH = 256
DATA_MARKER = "fidelity_data.json"

#: metrics of a run (ensemble, balanced test set) in table order; sade_mean = mean top-1 over the 11 SADE sets
METRICS = ("acc", "many", "medium", "few", "ece", "nll", "sade_mean")
HEADLINE = ("acc", "ece", "nll", "sade_mean")
LABELS = {"acc": "acc", "many": "many", "medium": "medium", "few": "few", "ece": "ECE", "nll": "NLL",
          "sade_mean": "SADE-11"}
BASE_SIDES = ("fast", "reference")
#: every lever side the script knows (key -> label); which apply depends on the recipe and device
LEVER_LABELS = {"amp_off": "fast, autocast off (train.amp)", "channels_last_off": "fast, channels_last off",
                "device_loader_off": "fast, DataLoader path (device augmentation off)",
                "batched_experts_on": "fast, batched experts on", "batched_experts_off": "fast, batched experts off"}
#: diagnostic sides: one side with its mixup lambda stream swapped for the other side's kind of stream
#: (the official code re-seeds numpy's global generator with 0 while it builds the LT split, so every
#: official run, whatever its seed, draws the same lambda sequence; the library draws one per seed)
DIAGNOSTIC_LABELS = {"reference_seed_mixup": "reference, lambdas from the run's seed (numpy not reset to 0)",
                     "fast_official_mixup": "fast, lambdas from the official stream (numpy reset to 0)"}
#: the side a diagnostic side is a variant of
DIAGNOSTIC_BASE = {"reference_seed_mixup": "reference", "fast_official_mixup": "fast"}
SIDE_LABELS = {"fast": "fast (library as shipped)", "reference": "reference (official-style)", **LEVER_LABELS,
               **DIAGNOSTIC_LABELS}


def base_side(side: str) -> str:
    """``fast`` or ``reference``: the training code a side runs (a lever runs the fast side)."""
    return DIAGNOSTIC_BASE.get(side, "reference" if side == "reference" else "fast")


# ------------------------------------------------------------------------------------------------
# Data: Fashion-MNIST in the CIFAR-10 pickle layout


def fmnist_as_cifar(images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, 1, 28, 28]`` -> ``[N, 3, 32, 32]``: zero-padded by 2 on each side, grey replicated."""
    x = np.pad(images, ((0, 0), (0, 0), (2, 2), (2, 2)))
    return np.ascontiguousarray(np.repeat(x, 3, axis=1))


def prepare_data(data_dir: Path, fmnist_root: str | None, console: Console) -> dict:
    """Write Fashion-MNIST as CIFAR-10 (``data_dir/cifar-10-batches-py``) unless a copy made from the
    same source is there; returns the marker (source folder, image counts).  Only a folder this
    script wrote (it holds the marker file) is ever replaced; the marker is written last."""
    source = find_fashion_mnist(fmnist_root)
    if source is None:
        load_fashion_mnist(fmnist_root, train=True)   # raises the library's one-line "not found" error
    marker_path, target = data_dir / DATA_MARKER, cifar_dir(data_dir, 10)

    def present() -> dict | None:
        if marker_path.is_file() and target.is_dir():
            marker = json.loads(marker_path.read_text())
            if marker.get("source") == str(source.resolve()):
                return marker
        return None

    if (marker := present()) is not None:
        console.print(f"data: reusing {target} (Fashion-MNIST from {source})")
        return marker
    if target.exists() and not marker_path.is_file():
        raise BalpoeError(f"{target} exists and was not written by fidelity.py; choose another --data-dir")
    start = time.perf_counter()
    train_x, train_y, _ = load_fashion_mnist(str(source), train=True)
    test_x, test_y, _ = load_fashion_mnist(str(source), train=False)
    tmp = data_dir / f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_cifar(tmp, 10, (fmnist_as_cifar(train_x), train_y), (fmnist_as_cifar(test_x), test_y),
               class_names=list(FMNIST_CLASS_NAMES))
    marker = {"source": str(source.resolve()), "train_images": int(len(train_y)), "test_images": int(len(test_y)),
              "format": "Fashion-MNIST, zero-padded 28x28 -> 32x32, grey replicated to 3 channels, "
                        "CIFAR-10 python-pickle layout"}
    if present() is None:               # else a chunk started alongside wrote the same data meanwhile
        marker_path.unlink(missing_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(cifar_dir(tmp, 10), target)
        atomic_write_text(json.dumps(marker, indent=1) + "\n", marker_path)
        console.print(f"data: wrote {target} from {source} ({len(train_y):,} training, {len(test_y):,} test "
                      f"images) in {time.perf_counter() - start:.1f} s")
    shutil.rmtree(tmp, ignore_errors=True)
    return marker


def full_train_labels(data_cfg) -> np.ndarray | None:
    """The training labels before long-tailed subsampling (what the official CIFAR-LT dataset shuffles
    with numpy's global RNG, :func:`reference_balpoe.official_numpy_reset`); ``None`` for a dataset
    that is long-tailed as found.  CIFAR batches are read one at a time and their images dropped."""
    spec = get_dataset(data_cfg.dataset)
    if not spec.subsample_lt:
        return None
    if data_cfg.dataset in ("cifar10", "cifar100"):
        folder = cifar_dir(data_cfg.root or "data", 10 if data_cfg.dataset == "cifar10" else 100)
        files, key = ((sorted(folder.glob("data_batch_*")), b"labels") if data_cfg.dataset == "cifar10"
                      else ([folder / "train"], b"fine_labels"))
        labels = []
        for f in files:
            with open(f, "rb") as fh:
                labels.append(np.asarray(pickle.load(fh, encoding="bytes")[key], dtype=np.int64))
        return np.concatenate(labels)
    return np.asarray(spec.read(data_cfg, "train").labels, dtype=np.int64)


def limit_indices(n: int, limit: int) -> torch.Tensor:
    """A fixed random subset of ``limit`` of ``n`` indices (seed 0, sorted): the same for every run."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:limit].sort().values


def limit_bundle(bundle, limit: int):
    """The bundle with its training split cut to :func:`limit_indices` (class counts recomputed)."""
    if limit and limit < len(bundle.train):
        bundle.train = bundle.train.subset(limit_indices(len(bundle.train), limit).to(bundle.train.labels.device))
        bundle.class_counts = torch.bincount(bundle.train.labels.cpu(), minlength=bundle.num_classes)
    return bundle


# ------------------------------------------------------------------------------------------------
# Recipes of the sides


def schedule_overrides(recipe, epochs: int, mixup_alpha: float | None) -> list[str]:
    """``--epochs``/``--mixup-alpha`` as recipe overrides: the recipe's schedule compressed to ``epochs``
    (module docstring) and mixup alpha 0.4 when shorter than the recipe's, else unchanged."""
    o = recipe.optim
    out = []
    short = epochs < o.epochs
    if epochs != o.epochs:
        out.append(f"optim.epochs={epochs}")
        warmup = 0 if o.warmup_epochs == 0 else max(1, o.warmup_epochs * epochs // o.epochs)
        out.append(f"optim.warmup_epochs={min(warmup, epochs - 1)}")
        if o.schedule == "multistep":
            out.append(f"optim.milestones=[{', '.join(str(max(1, m * epochs // o.epochs)) for m in o.milestones)}]")
    if mixup_alpha is None and short:
        mixup_alpha = SHORT_MIXUP_ALPHA
    if mixup_alpha is not None:
        out.append(f"train.mixup_alpha={mixup_alpha:g}")
    return out


def lever_specs(recipe, device: torch.device, workers: int) -> tuple[list[dict], list[dict]]:
    """The fast path's speed levers that apply to ``recipe`` on ``device``: ``(levers, skipped)``,
    each lever ``{key, label, overrides}``, each skipped one ``{key, reason}``."""
    t, levers, skipped = recipe.train, [], []
    if not t.amp:
        skipped.append({"key": "amp_off", "reason": "the recipe trains in float32 (train.amp: false)"})
    elif amp_dtype(device, True, warn=False) is None:
        skipped.append({"key": "amp_off", "reason": f"no autocast on this {device.type} device (no native bf16): "
                                                    "the recipe already trains in float32 here"})
    else:
        levers.append({"key": "amp_off", "overrides": ["train.amp=false"]})
    if t.channels_last:
        levers.append({"key": "channels_last_off", "overrides": ["train.channels_last=false"]})
    else:
        skipped.append({"key": "channels_last_off", "reason": "the recipe trains NCHW (train.channels_last: false)"})
    if recipe.data.loader != "dataloader":
        levers.append({"key": "device_loader_off", "overrides": ["data.loader=dataloader",
                                                                 f"data.num_workers={workers}"]})
    else:
        skipped.append({"key": "device_loader_off", "reason": "the recipe already uses the DataLoader path"})
    batched = recipe.model.batched_experts
    levers.append({"key": f"batched_experts_{'off' if batched else 'on'}",
                   "overrides": [f"model.batched_experts={'false' if batched else 'true'}"]})
    for lv in levers:
        lv["label"] = LEVER_LABELS[lv["key"]]
    return levers, skipped


#: recipe keys the reference side does not read (it trains float32 NCHW, uncompiled, looped experts,
#: from its own PIL DataLoader): left out of its fingerprint
REFERENCE_IGNORES = {"train": ("amp", "channels_last", "compile", "compile_mode"), "model": ("batched_experts",),
                     "data": ("loader", "decode")}


def fingerprint(recipe, limit: int, data_source: str | None, device: torch.device, side: str) -> dict:
    """What a reusable result must have been made with: the resolved recipe (see :func:`canonical`;
    ``train.compile`` as it applies on ``device``: ``auto`` is ``false`` on a CPU), ``--limit`` and
    the data source."""
    r = recipe.to_dict()
    r["train"]["compile"] = compile_enabled(recipe.train.compile, device)
    return canonical({"recipe": r, "limit": limit or None, "data_source": data_source}, side)


def canonical(config: dict | None, side: str) -> dict | None:
    """A fingerprint in the form results are compared in: without the keys that do not change the
    result (CPU threads, DataLoader workers; ``train.compile_mode`` of an uncompiled run; for the
    reference side :data:`REFERENCE_IGNORES`), and with the recipe keys a stored result lacks filled
    in from the recipe defaults: a key added to the recipe schema after the result was made matches
    when the current recipe leaves it at its default (every new key's default keeps the earlier
    behaviour); a key the stored recipe has with another value still differs."""
    if not isinstance(config, dict) or not isinstance(config.get("recipe"), dict):
        return config

    def fill(stored, default):
        if not (isinstance(stored, dict) and isinstance(default, dict)):
            return stored
        return {**{k: v for k, v in default.items() if k not in stored},
                **{k: fill(v, default.get(k)) for k, v in stored.items()}}

    drop = {"train": {"threads"}, "data": {"num_workers"}}
    if base_side(side) == "reference":
        for section, keys in REFERENCE_IGNORES.items():
            drop[section] = drop.get(section, set()) | set(keys)
    r = fill(config["recipe"], Recipe().to_dict())
    if isinstance(r.get("data"), dict) and r["data"].get("image_size") == 224:
        r["data"] = {**r["data"], "image_size": None}  # the old default (224) never applied to in-memory datasets
    if r["train"].get("compile") is False:
        drop["train"] = drop["train"] | {"compile_mode"}
    r = {sec: ({k: v for k, v in val.items() if k not in drop.get(sec, ())} if isinstance(val, dict) else val)
         for sec, val in r.items()}
    return {**config, "recipe": r}


def first_difference(a, b, path: str = "") -> str:
    """The first key path where two JSON-like values differ (for the mismatch error)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
    return f"{path}: {a!r} vs {b!r}"


# ------------------------------------------------------------------------------------------------
# The shared evaluator


class Evaluator:
    """The balanced test set of the base recipe, its loader and the 11 SADE target sets: every run is
    evaluated here, identically (float32, NCHW, the library's test loader and metrics)."""

    def __init__(self, bundle, recipe, device: torch.device):
        self.bundle, self.device = bundle, device
        self.counts = bundle.class_counts.clone()
        self.many, self.few = recipe.data.many_threshold, recipe.data.few_threshold
        self.loader = build_loader(bundle, "test", recipe.train.eval_batch_size, recipe.data, train=False)
        self.labels = bundle.test.labels.cpu()
        self.targets = target_sets(self.labels, self.counts, parse_test_dists("all"))

    def evaluate(self, model: torch.nn.Module) -> dict:
        model = model.to(self.device).to(memory_format=torch.contiguous_format)
        start = time.perf_counter()
        expert, labels = collect_logits(model, self.loader, self.device, amp=False)
        if not torch.equal(labels, self.labels):
            raise BalpoeError("the test loader's labels are not the test set's, in order")
        rep = report_from_logits(expert, labels, self.counts, self.many, self.few)
        ens = MultiExpertNet.ensemble(expert)
        sade = {name: accuracy(ens[t.indices], labels[t.indices]) for name, t in self.targets.items()}
        metrics = {k: finite_or_none(rep[k]) for k in ("acc", "many", "medium", "few", "ece", "mce", "nll", "brier")}
        metrics["sade_mean"] = float(np.mean(list(sade.values())))
        return {"metrics": metrics, "sade": sade, "expert_acc": rep["expert_acc"],
                "eval_s": time.perf_counter() - start, "logits": expert, "labels": labels}


def finite_or_none(v) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


# ------------------------------------------------------------------------------------------------
# Runs


@contextlib.contextmanager
def official_mixup_stream(train_labels, num_classes: int):
    """Inside the block the library's trainer draws its mixup lambdas from the official stream:
    numpy's global generator as :func:`reference_balpoe.official_numpy_reset` leaves it (seed 0, one
    shuffle per class of the full training set), one ``beta(alpha, alpha)`` per step, across epochs
    -- the lambda sequence of every reference run.  The pairing permutations and everything else stay
    the library's.  A diagnostic of the benchmark, not a library option."""
    per_epoch = trainer.numpy_stream
    started = False

    def stream(seed: int, epoch: int, name: str, rank: int = 0):
        nonlocal started
        if name != "mixup_lambda":
            return per_epoch(seed, epoch, name, rank)
        if not started:   # reset where the first epoch starts: nothing before it can consume the stream
            official_numpy_reset(train_labels, num_classes)
            started = True
        return np.random.mtrand._rand   # the global RandomState that np.random.beta draws from

    trainer.numpy_stream = stream
    try:
        yield
    finally:
        trainer.numpy_stream = per_epoch


def train_library(recipe, out: Path, limit: int) -> None:
    """The fast side: ``balpoe.training.build.train`` (``balpoe train``); with ``limit`` the same
    steps (seed, data, plan, ``train_model``) with the training split cut to :func:`limit_bundle`."""
    quiet, balpoe_console.quiet = balpoe_console.quiet, True
    try:
        if not limit:
            train(recipe, out, show_progress=False, report=False)
            return
        check_names(recipe)
        if recipe.train.threads:
            torch.set_num_threads(recipe.train.threads)
        device = resolve_device(recipe.train.device)
        out.mkdir(parents=True, exist_ok=False)
        torch.manual_seed(recipe.seed)
        np.random.seed(recipe.seed)
        bundle = limit_bundle(build_data(recipe.data, device, seed=recipe.seed), limit)
        plan = build_plan(recipe, bundle, device)
        model = train_model(plan, out, show_progress=False)
        write_results(plan.evaluate(model, analysis=True), out, plan.recipe,
                      html_report=False)
    finally:
        balpoe_console.quiet = quiet


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def finished_reference(run_dir: Path, recipe) -> bool:
    """Whether ``run_dir`` holds a reference run whose training finished (``model.pt`` is saved after
    the last epoch, and ``metrics.jsonl`` has one row per epoch) but whose evaluation did not."""
    return (run_dir / "model.pt").is_file() and len(read_rows(run_dir / "metrics.jsonl")) == recipe.optim.epochs


def run_side(side: str, recipe, run_dir: Path, ctx: dict) -> dict:
    """Train one side for one seed into ``run_dir`` and evaluate it; returns the result dict."""
    run_dir.mkdir(parents=True, exist_ok=True)
    device, evaluator = ctx["device"], ctx["evaluator"]
    start = time.perf_counter()
    extra = {}
    reference = base_side(side) == "reference"
    if reference:
        extra["workers"] = ctx["workers"]
    if reference and finished_reference(run_dir, recipe):
        # training finished (model.pt is written only after the last epoch) but the evaluation was
        # interrupted: evaluate the saved weights instead of training again
        model = reference_model(recipe, evaluator.bundle.num_classes, evaluator.bundle.in_chans, device)
        model.load_state_dict(torch.load(run_dir / "model.pt", map_location=device, weights_only=True))
        rows = read_rows(run_dir / "metrics.jsonl")
    elif reference:
        # reference_seed_mixup: no reset of numpy to 0, so its lambdas come from seed_everything(seed)
        labels = None if side == "reference_seed_mixup" else ctx["full_train_labels"]
        model, rows = train_reference(recipe, evaluator.bundle, device, ctx["workers"], full_train_labels=labels,
                                      train=evaluator.bundle.train, metrics_path=run_dir / "metrics.jsonl")
        atomic_save(model.state_dict(), run_dir / "model.pt")
    else:
        lib_dir = run_dir / "run"
        streams = official_mixup_stream(ctx["full_train_labels"], evaluator.bundle.num_classes) \
            if side == "fast_official_mixup" else contextlib.nullcontext()
        with streams:
            train_library(recipe, lib_dir, ctx["limit"])
        model, _, _ = load_model(lib_dir / "last.pt", device)
        rows = read_rows(lib_dir / "metrics.jsonl")
        lib_eval = json.loads((lib_dir / "eval.json").read_text())
        extra["library_eval"] = {k: finite_or_none(lib_eval[k]) for k in ("acc", "ece", "nll")}
        dtype = amp_dtype(device, recipe.train.amp, warn=False)
        extra["library_eval"]["autocast"] = None if dtype is None else str(dtype).replace("torch.", "")
    train_s = time.perf_counter() - start
    ev = ctx["evaluator"].evaluate(model)
    del model
    gc.collect()
    torch.save({"expert_logits": ev.pop("logits"), "labels": ev.pop("labels")}, run_dir / "test_logits.pt")
    wall_s = time.perf_counter() - start
    return {"side": side, "seed": recipe.seed, **ev, "wall_s": wall_s, "train_s": train_s,
            "train_images": len(evaluator.bundle.train), "class_counts": evaluator.counts.tolist(),
            "epoch_time_s_sum": float(sum(r["epoch_time_s"] for r in rows)),
            "final_loss": rows[-1]["loss"] if rows else None,
            "curve": [{k: r[k] for k in ("epoch", "loss", "lr", "epoch_time_s")} for r in rows], **extra,
            "config": ctx["fingerprints"][(side, recipe.seed)]}


def result_path(out: Path, side: str, seed: int) -> Path:
    return out / side / f"seed{seed}" / "result.json"


def load_result(out: Path, side: str, seed: int, expected: dict | None) -> dict | None:
    """A finished side/seed of ``out`` (``None`` if there is none); a one-line error when it was made
    with another configuration than ``expected``."""
    path = result_path(out, side, seed)
    if not path.is_file():
        return None
    res = json.loads(path.read_text())
    stored = canonical(res.get("config"), side)
    if expected is not None and stored != expected:
        raise BalpoeError(f"{path} was made with another configuration ({first_difference(stored, expected)}"
                          f"); use another --out or delete {path.parent}")
    return res


# ------------------------------------------------------------------------------------------------
# Statistics


def describe(values: list) -> dict:
    """Mean and sample std (ddof 1; None for fewer than 2 values) of the finite values."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    n = len(v)
    return {"n": n, "mean": float(np.mean(v)) if n else None,
            "std": float(np.std(v, ddof=1)) if n > 1 else None, "values": v}


def compared(diff: float | None, se: float | None) -> dict:
    """A difference with its standard error and whether ``|diff| <= 2 SE`` (None where unknown)."""
    if diff is None:
        return {"diff": None, "se": None, "within_2se": None}
    return {"diff": diff, "se": se, "within_2se": None if se is None else bool(abs(diff) <= 2 * se)}


def welch(a: dict, b: dict) -> dict:
    """``a - b`` of two :func:`describe` results with the Welch standard error ``sqrt(s_a²/n_a + s_b²/n_b)``
    and whether ``|diff| <= 2 SE`` (None where it cannot be computed)."""
    if a["mean"] is None or b["mean"] is None:
        return compared(None, None)
    se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"]) if a["std"] is not None and b["std"] is not None \
        else None
    return compared(a["mean"] - b["mean"], se)


def paired(runs_a: dict, runs_b: dict, metric: str) -> dict:
    """Mean, std and standard error of the per-seed differences over the seeds both sides ran."""
    common = [s for s in runs_a if s in runs_b]
    d = [runs_a[s]["metrics"][metric] - runs_b[s]["metrics"][metric] for s in common
         if runs_a[s]["metrics"][metric] is not None and runs_b[s]["metrics"][metric] is not None]
    out = describe(d)
    out["se"] = out["std"] / math.sqrt(out["n"]) if out["std"] is not None else None
    out["seeds"] = [int(s) for s in common]
    return out


def stream_matched(summary: dict, metric: str) -> dict:
    """Library - reference with the mixup lambda streams matched, from the 2 x 2 design (training
    code x lambda stream): ``per_seed`` = fast - reference_seed_mixup (both draw lambdas per seed),
    ``official`` = fast_official_mixup - reference (both draw the official sequence), and
    ``combined``, their mean, with SE ``sqrt(se_1² + se_2²) / 2`` (the four sides are independent
    runs).  Also ``stream_effect``: the official stream - per-seed streams, averaged over the two
    training codes, with its SE."""
    one = welch(summary["fast"][metric], summary["reference_seed_mixup"][metric])
    two = welch(summary["fast_official_mixup"][metric], summary["reference"][metric])
    eff_lib = welch(summary["fast_official_mixup"][metric], summary["fast"][metric])
    eff_ref = welch(summary["reference"][metric], summary["reference_seed_mixup"][metric])

    def mean_of(a: dict, b: dict) -> dict:
        if a["diff"] is None or b["diff"] is None:
            return compared(None, None)
        se = None if a["se"] is None or b["se"] is None else math.sqrt(a["se"] ** 2 + b["se"] ** 2) / 2
        return compared((a["diff"] + b["diff"]) / 2, se)
    return {"per_seed": one, "official": two, "combined": mean_of(one, two), "stream_effect": mean_of(eff_lib, eff_ref)}


def summarise(runs: dict[str, dict[str, dict]]) -> dict:
    """Per side and metric :func:`describe`; fast - reference (Welch) and each lever vs both."""
    summary = {side: {m: describe([r["metrics"][m] for r in by_seed.values()]) for m in METRICS}
               for side, by_seed in runs.items()}
    out = {"summary": summary}
    if "fast" in summary and "reference" in summary:
        out["difference"] = {m: welch(summary["fast"][m], summary["reference"][m]) for m in METRICS}
        out["paired"] = {m: paired(runs["fast"], runs["reference"], m) for m in METRICS}
    if all(side in summary for side in ("fast", "reference", *DIAGNOSTIC_LABELS)):
        out["stream_matched"] = {m: stream_matched(summary, m) for m in METRICS}
    out["lever_differences"] = {
        side: {vs: {m: welch(summary[side][m], summary[vs][m]) for m in METRICS}
               for vs in ("reference", "fast") if vs in summary}
        for side in summary if side in LEVER_LABELS or side in DIAGNOSTIC_LABELS}
    return out


# ------------------------------------------------------------------------------------------------
# Output


def make_console() -> Console:
    return Console() if sys.stdout.isatty() else Console(width=170)   # no wrapping when piped


def fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def fmt_ms(d: dict) -> str:
    if d["mean"] is None:
        return "-"
    return f"{d['mean']:.2f}" + ("" if d["std"] is None else f" ± {d['std']:.2f}")


def fmt_diff(w: dict) -> str:
    if w["diff"] is None:
        return "-"
    text = f"{w['diff']:+.2f}" + ("" if w["se"] is None else f" ± {w['se']:.2f}")
    return text if w["within_2se"] is not False else f"[bold red]{text}[/]"


#: the rows of the stream-matched comparison (key of :func:`stream_matched`, label)
MATCHED_ROWS = (("combined", "library - reference, lambda streams matched (mean of the two below)"),
                ("per_seed", "  per-seed lambdas: fast - reference_seed_mixup"),
                ("official", "  official lambdas: fast_official_mixup - reference"),
                ("stream_effect", "official - per-seed lambda stream (either code)"))


def comparison_rows(result: dict) -> list[tuple[str, dict]]:
    """``(label, {metric: difference})`` for every comparison of the results, in table order: fast -
    reference, the stream-matched comparison, each lever or diagnostic side against both sides."""
    rows = []
    if "difference" in result:
        rows.append(("fast - reference", result["difference"]))
    if "stream_matched" in result:
        rows += [(name, {m: result["stream_matched"][m][key] for m in METRICS}) for key, name in MATCHED_ROWS]
    for side, by_vs in result.get("lever_differences", {}).items():
        rows += [(f"{side} - {vs}", d) for vs, d in by_vs.items()]
    return rows


def print_tables(result: dict, console: Console) -> None:
    runs, stats = result["runs"], result
    table = Table(title=f"{result['recipe_name']}: {fmt(result['data']['train_images'], ',')} training images, "
                        f"{result['epochs']} epochs, {result['device']} -- balanced test set (float32 evaluation)")
    for col in ("side", "seed", *[LABELS[m] for m in METRICS], "wall s"):
        table.add_column(col, justify="left" if col == "side" else "right")
    for side, by_seed in runs.items():
        for seed, r in by_seed.items():
            table.add_row(side, seed, *[fmt(r["metrics"][m]) for m in METRICS], f"{r['wall_s']:.0f}")
    for side in runs:
        table.add_row(f"[bold]{side}[/]", "mean ± std", *[fmt_ms(stats["summary"][side][m]) for m in METRICS], "")
    console.print(table)

    diffs = comparison_rows(stats)
    if diffs:
        dt = Table(title="difference of the means ± Welch SE (red: |diff| > 2 SE)")
        for col in ("comparison", *[LABELS[m] for m in METRICS], "|Δacc| ≤ 2 SE"):
            dt.add_column(col, justify="left" if col == "comparison" else "right")
        for name, d in diffs:
            ok = d["acc"]["within_2se"]
            dt.add_row(name, *[fmt_diff(d[m]) for m in METRICS], "-" if ok is None else ("yes" if ok else "NO"))
        console.print(dt)
    if "difference" in stats:
        for m in HEADLINE:
            w = stats["difference"][m]
            if w["diff"] is None:
                continue
            verdict = "n/a (needs 2 seeds per side)" if w["within_2se"] is None else \
                ("within 2 SE" if w["within_2se"] else "OUTSIDE 2 SE")
            console.print(f"{LABELS[m]}: fast - reference = {w['diff']:+.3f}, SE {fmt(w['se'], '.3f')} -> {verdict}")
    for s in result.get("levers_skipped", []):
        console.print(f"lever not run: {s['key']} ({s['reason']})")
    if result["missing"]:
        console.print(f"missing (not run yet): {', '.join(result['missing'])}")




def md_diff(w: dict, spec: str) -> str:
    """``-1.24 ± 0.53 (2.3 SE)`` for a :func:`welch` result."""
    if w["diff"] is None:
        return "-"
    if w["se"] is None:
        return format(w["diff"], "+" + spec)
    ratio = f" ({abs(w['diff']) / w['se']:.1f} SE)" if w["se"] > 0 else ""
    return f"{w['diff']:+{spec}} ± {w['se']:{spec}}{ratio}"


def markdown_tables(result: dict) -> str:
    """The per-side table and the table of differences (each side against the reference and the
    fast side) in Markdown, as README's 'Fidelity' section shows them."""
    runs, summary = result["runs"], result.get("summary", {})
    spec = {"acc": ".2f", "ece": ".2f", "nll": ".3f", "sade_mean": ".2f"}

    def ms(d: dict, f: str) -> str:
        if d["mean"] is None:
            return "-"
        return format(d["mean"], f) + ("" if d["std"] is None else f" ± {d['std']:{f}}")

    head = ["balanced acc", "ECE", "NLL", "mean acc, 11 test distributions"]
    lines = ["| side | seeds | balanced acc per seed | " + " | ".join(head) + " |",
             "|---|---|---|" + "---:|" * len(head)]
    for side, by_seed in runs.items():
        per_seed = ", ".join(f"{r['metrics']['acc']:.2f}" for r in by_seed.values())
        lines.append(f"| {SIDE_LABELS.get(side, side)} | {', '.join(by_seed)} | {per_seed} | "
                     + " | ".join(ms(summary[side][m], spec[m]) for m in HEADLINE) + " |")
    pairs = [(name.strip().replace(" - ", " − "), d) for name, d in comparison_rows(result)]
    if pairs:
        lines += ["", "| difference of the means ± Welch SE | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
        lines += [f"| {name} | " + " | ".join(md_diff(d[m], spec[m]) for m in HEADLINE) + " |" for name, d in pairs]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------


def parse_sides(text: str) -> list[str]:
    sides = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in sides if s not in SIDE_LABELS]
    if unknown or not sides:
        raise argparse.ArgumentTypeError(f"unknown side(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(SIDE_LABELS)}")
    return sides


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("recipe", nargs="?", default=str(DEFAULT_RECIPE), help="YAML recipe (default: %(default)s)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override for every side (repeatable; after the schedule overrides)")
    ap.add_argument("--epochs", type=int, default=None,
                    help=f"epochs per run (default: {CPU_EPOCHS} on the CPU, the recipe's on CUDA); fewer than the "
                         "recipe's compress its schedule")
    ap.add_argument("--mixup-alpha", type=float, default=None,
                    help=f"mixup alpha for every side (default: {SHORT_MIXUP_ALPHA:g} when the schedule is compressed, "
                         "else the recipe's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="run seeds (default: 1 2 3)")
    ap.add_argument("--sides", type=parse_sides, default=list(BASE_SIDES),
                    help="comma-separated sides to run: fast, reference and/or lever keys (default: fast,reference)")
    ap.add_argument("--levers", action="store_true",
                    help="also run the fast side once per speed lever turned off (flipped for batched experts)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    ap.add_argument("--workers", type=int, default=2, help="reference DataLoader worker processes (default: 2)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads, train.threads of every side (default: 1 on the CPU, torch's on CUDA)")
    ap.add_argument("--limit", type=int, default=0, metavar="N", help="train on N images of the LT split (smoke tests)")
    ap.add_argument("--fmnist-root", default=None,
                    help="folder with the Fashion-MNIST IDX files (default: $BALPOE_DATA, then "
                         "/usr/share/datasets/fashion-mnist)")
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA),
                    help="where Fashion-MNIST is written in the CIFAR-10 layout (default: %(default)s; reused)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="run folders and results.json (default: %(default)s)")
    ap.add_argument("--report-only", action="store_true", help="train nothing: the tables of the results in --out")
    ap.add_argument("--json", help="also write the results JSON here")
    ap.add_argument("--markdown", help="also write the tables in Markdown here (as README 'Fidelity' shows them)")
    args = ap.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        ap.error("--epochs must be >= 1")
    if args.limit < 0 or args.workers < 0 or (args.threads is not None and args.threads < 0):
        ap.error("--limit, --workers and --threads must be >= 0")
    seeds = list(dict.fromkeys(args.seeds))

    console = make_console()
    device = resolve_device(args.device, what="--device")
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else 0)
    if threads and not args.report_only:
        torch.set_num_threads(threads)
    out = Path(args.out)

    # The recipe of every side and seed (no data read yet).
    base0 = load_recipe(args.recipe, args.overrides)
    epochs = args.epochs or (base0.optim.epochs if device.type == "cuda" else CPU_EPOCHS)
    data_over, data_source = [], None
    user_root = any(o.split("=", 1)[0].strip() == "data.root" for o in args.overrides)
    if base0.data.dataset == "cifar10" and not user_root:
        data_dir = Path(args.data_dir)
        data_over = [f"data.root={data_dir}", "data.download=false"]
        marker = data_dir / DATA_MARKER
        if args.report_only:
            data_source = json.loads(marker.read_text())["source"] if marker.is_file() else None
        else:
            data_source = prepare_data(data_dir, args.fmnist_root, console)["source"]
    elif base0.data.dataset == "fashion_mnist" and args.fmnist_root and not user_root:
        data_over = [f"data.root={args.fmnist_root}"]
    if data_source is None and base0.data.dataset == "fashion_mnist":
        found = find_fashion_mnist(args.fmnist_root or base0.data.root)
        data_source = str(found.resolve()) if found else None
    elif data_source is None and not data_over:
        data_source = str(base0.data.root)
    schedule = schedule_overrides(base0, epochs, args.mixup_alpha)
    common = data_over + schedule + [f"train.threads={threads}", f"train.device={device}",
                                      f"train.eval_batch_size={EVAL_BATCH}"] + args.overrides

    def recipe_for(side: str, seed: int, lever_over: list[str]):
        return load_recipe(args.recipe, common + lever_over + [f"seed={seed}"])

    base = recipe_for("fast", seeds[0], [])
    if base.stage != 1 or base.data.sampler != "instance":
        raise BalpoeError("fidelity compares BalPoE stage-1 training with instance-balanced sampling "
                          f"(recipe stage {base.stage}, data.sampler {base.data.sampler})")
    levers, skipped = lever_specs(base, device, args.workers)
    lever_over = {lv["key"]: lv["overrides"] for lv in levers}
    sides = list(args.sides) + ([lv["key"] for lv in levers if lv["key"] not in args.sides] if args.levers else [])
    for s in sides:
        if s in LEVER_LABELS and s not in lever_over:
            reason = next((k["reason"] for k in skipped if k["key"] == s), "not a lever of this recipe")
            raise BalpoeError(f"side {s!r} does not apply here: {reason}")
    kept = [side for side in SIDE_LABELS if side in BASE_SIDES or side in lever_over or side in DIAGNOSTIC_LABELS]
    recipes = {(side, seed): recipe_for(side, seed, lever_over.get(side, [])) for side in kept for seed in seeds}
    fingerprints = {k: fingerprint(r, args.limit, data_source, device, k[0]) for k, r in recipes.items()}

    info = {"benchmark": "fidelity", "recipe_file": str(args.recipe), "recipe_name": base.name,
            "overrides": common, "epochs": base.optim.epochs, "recipe_epochs": base0.optim.epochs,
            "schedule": {"warmup_epochs": base.optim.warmup_epochs, "milestones": list(base.optim.milestones),
                         "schedule": base.optim.schedule, "mixup_alpha": base.train.mixup_alpha},
            "seeds": seeds, "sides": sides, "device": str(device), "device_name": device_name(device),
            "threads": threads, "workers": args.workers, "limit": args.limit or None, "torch": torch.__version__,
            "levers": {lv["key"]: {"label": lv["label"], "overrides": lv["overrides"]} for lv in levers},
            "levers_skipped": skipped}

    done: dict[tuple[str, int], dict] = {}
    if not args.report_only:
        console.print(f"{base.name} on {info['device_name']}: {base.optim.epochs} epochs (warmup "
                      f"{base.optim.warmup_epochs}, {base.optim.schedule} {list(base.optim.milestones)}), mixup alpha "
                      f"{base.train.mixup_alpha:g}, amp {base.train.amp}, channels_last {base.train.channels_last}; "
                      f"sides {', '.join(sides)}; seeds {' '.join(map(str, seeds))}; out {out}")
        bundle = limit_bundle(build_data(base.data, device, seed=base.seed), args.limit)
        counts = bundle.class_counts.tolist()
        console.print(f"LT split: {len(bundle.train):,} training images{' (--limit)' if args.limit else ''}, "
                      f"class counts {counts}; test: {len(bundle.test):,} images")
        info["data"] = {"source": data_source, "train_images": len(bundle.train), "class_counts": counts,
                        "test_images": len(bundle.test), "dataset": base.data.dataset}
        ctx = {"device": device, "evaluator": Evaluator(bundle, base, device), "workers": args.workers,
               "limit": args.limit, "full_train_labels": full_train_labels(base.data)
               if {"reference", "fast_official_mixup"} & set(sides) else None,
               "fingerprints": fingerprints}
        todo = [(side, seed) for seed in seeds for side in sides]
        for i, (side, seed) in enumerate(todo, 1):
            res = load_result(out, side, seed, fingerprints[(side, seed)])
            if res is not None:
                console.print(f"[{i}/{len(todo)}] {side} seed {seed}: reusing {result_path(out, side, seed)}")
                done[(side, seed)] = res
                continue
            run_dir = result_path(out, side, seed).parent
            if run_dir.exists() and not (side == "reference" and finished_reference(run_dir, recipes[(side, seed)])):
                console.print(f"{side} seed {seed}: discarding the unfinished run in {run_dir}")
                shutil.rmtree(run_dir)
            if run_dir.exists():
                console.print(f"[{i}/{len(todo)}] {side} seed {seed}: training had finished; evaluating "
                              f"{run_dir / 'model.pt'} ...")
            else:
                console.print(f"[{i}/{len(todo)}] {side} seed {seed}: training ...")
            res = run_side(side, recipes[(side, seed)], run_dir, ctx)
            write_json(res, result_path(out, side, seed))
            done[(side, seed)] = res
            m = res["metrics"]
            console.print(f"[{i}/{len(todo)}] {side} seed {seed} done: acc {m['acc']:.2f}, ECE {m['ece']:.2f}, "
                          f"NLL {m['nll']:.3f}, SADE-11 {m['sade_mean']:.2f}; wall {res['wall_s']:.0f} s "
                          f"(training epochs {res['epoch_time_s_sum']:.0f} s)")

    # Every finished side/seed of --out for these seeds (other chunks' too), in table order.
    runs: dict[str, dict[str, dict]] = {}
    missing = []
    for side in kept:
        for seed in seeds:
            res = done.get((side, seed)) or load_result(out, side, seed, fingerprints[(side, seed)])
            if res is not None:
                runs.setdefault(side, {})[str(seed)] = res
            elif side in sides:
                missing.append(f"{side}/seed{seed}")
    if "data" not in info:   # --report-only: what the runs were trained on
        any_run = next((r for by in runs.values() for r in by.values()), {})
        info["data"] = {"source": data_source, "train_images": any_run.get("train_images"),
                        "class_counts": any_run.get("class_counts"), "dataset": base.data.dataset}
    result = {**info, "metrics": list(METRICS), "test_distributions": list(TEST_DISTRIBUTIONS), "missing": missing,
              "complete": not missing, "runs": runs, **summarise(runs)}
    print_tables(result, console)
    text = json_text(result) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(text, out / "results.json")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(markdown_tables(result), Path(args.markdown))
    console.print(f"wrote {out / 'results.json'}" + "".join(f" and {p}" for p in (args.json, args.markdown) if p))
    return result


if __name__ == "__main__":
    run_reporting_errors(main)
