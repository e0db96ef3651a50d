#!/usr/bin/env python
# speed.py -- training speed of a recipe: seconds per epoch, images per second, CPU seconds per
# epoch and peak memory; the library's fast path vs the official-style reference, speed levers,
# and a torch.profiler breakdown of a step.
# How: warm-up epochs untimed, then timed epochs between device synchronisations, every mode in
# one process on the same data; --synthetic writes CIFAR-100-LT IR100 in the real pickle format
# (class prototypes + noise: speed only, never accuracy).
# Command (GPU, one run, every lever vs the reference, profiled):
#   python benchmarks/speed.py --synthetic --levers --reference --profile 20 --json levers.json
# Command (CPU demo recipe, fast vs reference, the README's performance table):
#   python benchmarks/speed.py recipes/balpoe/fashion_mnist_lt_ir100_cpu_demo.yaml --threads 2 \
#     --limit 4096 --reference --set train.channels_last=false
"""Training speed of a recipe: seconds per epoch, images per second and peak memory.

    # CIFAR-100-LT IR100 BalPoE (ResNet-32, 3 experts) on synthetic data, fast path only
    python benchmarks/speed.py --synthetic
    # fast path with every switch on, plus the official-style reference and the speed-up, one run
    python benchmarks/speed.py --synthetic --amp --channels-last --compile --reference --json speed.json
    # any recipe, e.g. the CPU demo, with a data-loader/model breakdown
    python benchmarks/speed.py recipes/balpoe/fashion_mnist_lt_ir100_cpu_demo.yaml --threads 2 --breakdown

Each mode trains ``--warmup-epochs`` (default 1, untimed: allocator, cuDNN autotuning,
``torch.compile``) then ``--epochs`` (default 2) timed epochs on the same data in the same
process.  CUDA timings are taken between ``torch.cuda.synchronize()`` calls.  Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA (reset per mode) and the process's resident-set
high-water mark (``VmHWM``, reset per mode through ``/proc/self/clear_refs``) on CPU; on CPU it
counts the main process only, not DataLoader workers.

* **fast**: the library's trainer pieces -- ``build_data`` / ``build_loader`` (the device-resident
  loader with batched augmentation for in-memory datasets), ``build_model``, ``build_criterion``,
  ``build_optimizer`` over ``model.param_groups`` and ``train_one_epoch`` (the loss read once per
  epoch, the non-finite-loss flag every 50 steps) -- with optional ``--amp`` (bf16 autocast where the trainer uses it),
  ``--channels-last``, ``--compile`` (``--compile-mode``).
* **reference** (``--reference``): ``reference_balpoe.py``, a plain-PyTorch re-implementation of
  the official BalPoE step (PIL/torchvision DataLoader with 4 workers, fp32, NCHW, no compile,
  global-RNG mixup, per-expert loss loop, ``.item()`` every step).

Tuning and explaining:

* ``--compile-mode {default,reduce-overhead,max-autotune,max-autotune-no-cudagraphs}``: the mode of
  ``--compile`` (a mode other than ``default`` implies ``--compile``; ``reduce-overhead`` = CUDA graphs);
* ``--levers``: the fast path several times in one process on the same data, switching speed levers
  on cumulatively -- eager fp32 NCHW, +bf16 autocast (where the trainer uses it), +channels_last,
  +batched experts (recipe key ``model.batched_experts``), +torch.compile, +compile mode
  reduce-overhead (CUDA) -- one table with s/epoch, img/s, peak memory and the speed-up vs the
  previous row, the first row and (``--reference``) the reference; ``--skip-levers
  compile,reduce-overhead`` leaves some out;
* ``--profile N``: after the timed epochs, N training steps under ``torch.profiler``
  (``profile_step.py``): the top ops/kernels by self device time (CUDA) or self CPU time (CPU), the
  time by category and, on CUDA, the GPU busy fraction and kernel launches per step; ``--trace
  PATH`` (``.json`` or ``.json.gz``) writes the chrome trace.  With ``--levers`` every lever is
  profiled and the fastest one's tables are printed;
* ``--write-synthetic DIR``: write the synthetic CIFAR-100-LT below and exit, for an end-to-end
  ``python -m balpoe train recipes/balpoe/cifar100_lt_ir100.yaml --set data.root=DIR --set
  data.download=false``.

``--synthetic`` writes CIFAR-100 in the real python-pickle layout (``cifar-100-python/{train,
test,meta}``) with exactly the CIFAR-100-LT counts of ``data.imb_factor`` (IR100: 10,847 training
images), so the library's reader and LT subsampling run unchanged; images are class prototypes
plus noise (:mod:`balpoe.data.synthetic`), NOT the real CIFAR-100: use it for speed, never for
accuracy.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from balpoe.data.build import build_data, build_loader
from balpoe.data.cifar import save_cifar
from balpoe.data.lt import lt_class_counts
from balpoe.data.synthetic import synthetic_split
from balpoe.errors import BalpoeError, run_reporting_errors
from balpoe.losses.build import build_criterion, expert_taus
from balpoe.models.build import build_model
from balpoe.recipe import apply_overrides, load_recipe, recipe_from_dict
from balpoe.runtime.device import device_name, resolve_device
from balpoe.runtime.precision import use_amp
from balpoe.training.build import build_optimizer, compile_enabled
from balpoe.training.trainer import train_one_epoch

# siblings in benchmarks/ (a script's own directory is importable)
from profile_step import print_profile, profile_steps  # isort: skip
from reference_balpoe import (official_cudnn_settings, reference_loader, reference_optimizer,  # isort: skip
                              reference_train_epoch)

DEFAULT_RECIPE = {  # CIFAR-100-LT IR100 BalPoE, standard training (the official code's CIFAR-100-LT config)
    "name": "cifar100_lt_ir100_balpoe",
    "seed": 0,
    "data": {"dataset": "cifar100", "imb_factor": 100, "augment": {"crop_padding": 4, "flip": True, "rotation": 15}},
    "model": {"backbone": "resnet32_cifar", "num_experts": 3, "split": "layer1", "head": "cosine", "scale": 30},
    "loss": {"tau": [0, 1, 2]},
    "optim": {"lr": 0.1, "batch_size": 128, "epochs": 200, "warmup_epochs": 5, "schedule": "multistep",
              "milestones": [160, 180], "weight_decay": 5e-4},
    "train": {"mixup_alpha": 0.4},
}
SYNTHETIC_NOTE = "SYNTHETIC data (class prototypes + noise in the real CIFAR-100 pickle format): speed only"


# ------------------------------------------------------------------------------------------------
# Synthetic CIFAR-100 in the real pickle layout


def write_synthetic_cifar100(root: Path, train_counts: list[int], test_per_class: int, seed: int = 0) -> Path:
    """``root/cifar-100-python/{train,test,meta}`` (:func:`balpoe.data.cifar.save_cifar`) holding
    :func:`balpoe.data.synthetic.synthetic_split` images, 3 x 32 x 32: ``train_counts[c]`` training
    and ``test_per_class`` test images of class ``c``.  Returns ``root``."""
    rng = np.random.default_rng(seed)
    num_classes = len(train_counts)
    train = synthetic_split(train_counts, 3, 32, rng)
    test = synthetic_split([test_per_class] * num_classes, 3, 32, rng)
    save_cifar(root, num_classes, train, test, class_names=[f"synthetic_{c:02d}" for c in range(num_classes)])
    return Path(root)


# ------------------------------------------------------------------------------------------------
# Timing and memory


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    gc.collect()  # the previous mode's model and optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux >= 4.0: "5" resets the VmHWM high-water mark to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024, "rss_high_water_mark"
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux (bytes on macOS)
    return rss / (2**20 if sys.platform == "darwin" else 1024), "rss_high_water_mark_process_lifetime"


def cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (DataLoader workers joined at epoch end)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def timed_epochs(run_epoch, warmup: int, epochs: int, device: torch.device,
                 warmup_seconds: list[float] | None = None) -> list[dict]:
    """Run ``warmup + epochs`` epochs; the timed ones give ``{'seconds', 'cpu_seconds', 'images', 'loss'}``
    (the warm-up epochs' wall seconds -- compilation included -- go to ``warmup_seconds``).

    ``cpu_seconds`` (all threads) hardly depends on other load on the machine: on a shared CPU,
    ``cpu_seconds / threads`` estimates the wall time the epoch would take on idle cores."""
    rows = []
    for epoch in range(warmup + epochs):
        sync(device)
        start, cpu_start = time.perf_counter(), cpu_seconds()
        stats = run_epoch(epoch)
        sync(device)
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
        if epoch < warmup and warmup_seconds is not None:
            warmup_seconds.append(seconds)
        if epoch >= warmup:
            rows.append({"seconds": seconds, "cpu_seconds": cpu, "images": int(stats["images"]),
                         "loss": float(stats["loss"])})
    return rows


def loader_seconds(loader, device: torch.device, epoch: int = 0) -> dict:
    """One epoch of the loader alone (reading, augmenting, normalising; no model): wall and CPU seconds."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    sync(device)
    start, cpu_start = time.perf_counter(), cpu_seconds()
    for x, _ in loader:
        x = x.to(device)
    sync(device)
    return {"loader_s_per_epoch": time.perf_counter() - start, "loader_cpu_s_per_epoch": cpu_seconds() - cpu_start}


def summarise(rows: list[dict], device: torch.device, extra: dict) -> dict:
    seconds = [r["seconds"] for r in rows]
    images = rows[0]["images"] if rows else 0
    peak, kind = peak_memory_mib(device)
    s = float(np.mean(seconds)) if seconds else float("nan")
    return {"s_per_epoch": s, "img_per_s": images / s if s > 0 else float("nan"), "images_per_epoch": images,
            "epoch_seconds": seconds, "cpu_s_per_epoch": float(np.mean([r["cpu_seconds"] for r in rows])),
            "peak_mem_mib": peak, "peak_mem_kind": kind,
            "final_loss": rows[-1]["loss"] if rows else float("nan"), **extra}


# ------------------------------------------------------------------------------------------------
# Recipe helpers


def with_overrides(recipe, overrides: list[str]):
    """A validated copy of ``recipe`` with ``key=value`` overrides applied."""
    if not overrides:
        return recipe
    return recipe_from_dict(apply_overrides(recipe.to_dict(), overrides))


# ------------------------------------------------------------------------------------------------
# The two modes


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
BATCHED_KEY = "model.batched_experts"


class FastSettings(NamedTuple):
    """The speed switches of one fast-mode run (``batched_experts=None``: the recipe's own)."""
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"
    foreach: str = "default"
    batched_experts: bool | None = None


class StepLoader:
    """The first ``steps`` batches of ``loader``, going on into the next epochs when it runs out."""

    def __init__(self, loader, steps: int, first_epoch: int):
        self.loader, self.steps, self.first_epoch = loader, steps, first_epoch

    def __iter__(self):
        done, epoch = 0, self.first_epoch
        while done < self.steps:
            self.loader.set_epoch(epoch)
            before = done
            for batch in self.loader:
                yield batch
                done += 1
                if done == self.steps:
                    return
            if done == before:  # an empty loader
                return
            epoch += 1


def run_fast(bundle, recipe, device, args, settings: FastSettings, trace: str | None = None) -> dict:
    """Time the library's training path with ``settings``; ``args.profile`` steps are profiled after it."""
    tc = recipe.train
    if settings.batched_experts is not None:
        recipe = with_overrides(recipe, [f"{BATCHED_KEY}={str(settings.batched_experts).lower()}"])
    amp = use_amp(device, settings.amp, warn=False)   # as the trainer
    channels_last, compile_ = settings.channels_last, settings.compile
    reset_peak_memory(device)
    torch.manual_seed(recipe.seed)
    loader = build_loader(bundle, "train", recipe.optim.batch_size, recipe.data, train=True, seed=recipe.seed,
                          channels_last=channels_last)
    model = build_model(recipe.model, bundle.num_classes, bundle.in_chans).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = build_criterion(recipe.loss, recipe.model.num_experts, bundle.class_counts,   # as the trainer
                                stage2=recipe.stage2 if recipe.stage == 2 else None).to(device)
    optimizer = build_optimizer(recipe.optim, model.param_groups(recipe.optim.lr, recipe.optim.weight_decay))
    if settings.foreach != "default":
        for group in optimizer.param_groups:
            group["foreach"] = settings.foreach == "on"
    if compile_:
        torch._dynamo.reset()  # a fresh cache per run: no stale guards, no recompile limit from earlier runs
        # as the trainer: static shapes (the last, smaller batch gets its own graph)
        train_model = torch.compile(model, mode=settings.compile_mode, dynamic=False)
    else:
        train_model = model

    def epoch_fn(epoch):
        loader.set_epoch(epoch)
        model.train()
        return train_one_epoch(train_model, loader, criterion, optimizer, epoch=epoch, seed=recipe.seed,
                               num_classes=bundle.num_classes, mixup_alpha=tc.mixup_alpha, amp=amp)

    warmup_seconds: list[float] = []
    rows = timed_epochs(epoch_fn, args.warmup_epochs, args.epochs, device, warmup_seconds)
    extra = {"warmup_epoch_seconds": warmup_seconds,
             "settings": {"loader": type(loader).__name__, "amp_bf16": amp, "channels_last": channels_last,
                          "compile": compile_, "compile_mode": settings.compile_mode if compile_ else None,
                          "foreach": settings.foreach,
                          "batched_experts": getattr(recipe.model, "batched_experts", None)}}
    if args.breakdown:
        extra.update(loader_seconds(loader, device))
    result = summarise(rows, device, extra)  # before profiling: the profiler's memory is not the run's
    result["steps_per_epoch"] = len(loader)
    if args.profile:
        next_epoch = args.warmup_epochs + args.epochs

        def run_steps(n: int) -> None:
            model.train()
            train_one_epoch(train_model, StepLoader(loader, n, next_epoch), criterion, optimizer, epoch=next_epoch,
                            seed=recipe.seed, num_classes=bundle.num_classes, mixup_alpha=tc.mixup_alpha, amp=amp)

        result["profile"] = profile_steps(run_steps, args.profile, device, top=args.profile_top,
                                          trace=trace)
    return result


def run_reference(bundle, recipe, device, args) -> dict:
    taus = expert_taus(recipe.loss, recipe.model.num_experts)
    reset_peak_memory(device)
    torch.manual_seed(recipe.seed)
    np.random.seed(recipe.seed)
    loader = reference_loader(bundle, recipe, recipe.optim.batch_size, args.ref_workers, recipe.seed,
                              pin_memory=device.type == "cuda")
    model = build_model(recipe.model, bundle.num_classes, bundle.in_chans).to(device)
    optimizer = reference_optimizer(model, recipe)
    counts = bundle.class_counts

    def epoch_fn(epoch):
        return reference_train_epoch(model, loader, counts, taus, optimizer, device, recipe.train.mixup_alpha)

    with official_cudnn_settings(device):
        rows = timed_epochs(epoch_fn, args.warmup_epochs, args.epochs, device)
    extra = {"settings": {"loader": f"DataLoader(PIL, workers={args.ref_workers})", "amp_bf16": False,
                          "channels_last": False, "compile": False, "foreach": "default"}}
    if args.breakdown:
        extra.update(loader_seconds(loader, device))
    return summarise(rows, device, extra)


# ------------------------------------------------------------------------------------------------
# Levers: the fast path with the speed switches turned on one after the other

#: (key for --skip-levers, row label, the switch it adds)
LEVERS: tuple[tuple[str, str, dict], ...] = (
    ("eager", "eager fp32 NCHW", {}),
    ("amp", "+bf16 autocast", {"amp": True}),
    ("channels_last", "+channels_last", {"channels_last": True}),
    ("batched_experts", "+batched experts", {"batched_experts": True}),
    ("compile", "+torch.compile", {"compile": True}),
    ("reduce-overhead", "+compile mode reduce-overhead", {"compile_mode": "reduce-overhead"}),
)
LEVER_KEYS = tuple(k for k, _, _ in LEVERS)


def lever_plan(recipe, device: torch.device, skip: set[str], foreach: str = "default"):
    """``([(key, label, FastSettings)], [{'lever', 'reason'}])``: the cumulative settings of every
    applicable lever, and the levers left out with the reason."""
    settings = FastSettings(foreach=foreach, batched_experts=False)
    plan, skipped = [], []
    for key, label, change in LEVERS:
        reason = None
        if key in skip:
            reason = "left out by --skip-levers"
        elif key == "amp" and not use_amp(device, True, warn=False):
            reason = f"no native bf16 on this {device.type} device (the trainer would run fp32)"
        elif key == "reduce-overhead" and device.type != "cuda":
            reason = "CUDA only (CUDA graphs)"
        elif key == "reduce-overhead" and not settings.compile:
            reason = "needs the torch.compile lever"
        if reason:
            skipped.append({"lever": label, "key": key, "reason": reason})
            continue
        settings = settings._replace(**change)
        plan.append((key, label, settings))
    return plan, skipped


def print_levers(result: dict, console) -> None:
    rows = result["levers"]
    data = result["data"]
    epochs = result["recipe_epochs"]
    profiled = any("profile" in r for r in rows)
    on_cuda = any(r["peak_mem_kind"] == "cuda_max_allocated" for r in rows)
    title = (f"speed levers, cumulative: {data['dataset']}, {data['images_per_epoch']:,} images/epoch on "
             f"{result['device']}" + (" [bold red](SYNTHETIC data)[/]" if data["synthetic"] else ""))
    table = Table(title=title)
    cols = ["lever", "s/epoch", "img/s", "peak mem (MiB)", "vs previous", "vs first"]
    if result["modes"].get("reference"):
        cols.append("vs reference")
    if profiled:
        cols += ["ms/step", "GPU busy", "kernels/step"] if on_cuda else ["ms/step", "op CPU/wall"]
    if data["limit"] is None:
        cols.append(f"{epochs} epochs")
    for col in cols:
        table.add_column(col, justify="left" if col == "lever" else "right")
    for r in rows:
        cells = [r["lever"], f"{r['s_per_epoch']:.3f}", f"{r['img_per_s']:,.0f}",
                 f"{r['peak_mem_mib']:,.0f}" + ("" if r["peak_mem_kind"] == "cuda_max_allocated" else " RSS"),
                 f"{r['speedup_vs_previous']:.2f}x", f"{r['speedup_vs_first']:.2f}x"]
        if "vs reference" in cols:
            cells.append(f"{r['speedup_vs_reference']:.2f}x")
        if profiled:
            p = r.get("profile") or {}
            cells.append(f"{p['wall_ms_per_step']:.2f}" if p else "-")
            if on_cuda:
                cells += [f"{p['gpu_busy_fraction']:.0%}" if p else "-", f"{p['kernels_per_step']:.0f}" if p else "-"]
            else:
                cells.append(f"{p['op_cpu_fraction']:.0%}" if p else "-")
        if data["limit"] is None:
            cells.append(f"{r['projected_run_s']:.0f} s")
        table.add_row(*cells)
    console.print(table)
    for s in result["levers_skipped"]:
        console.print(f"not in the table: {s['lever']} ({s['reason']})")


# ------------------------------------------------------------------------------------------------


def load_bench_recipe(args):
    overrides = list(args.overrides)
    if args.synthetic:
        overrides += ["data.dataset=cifar100"]
    if args.recipe:
        return load_recipe(args.recipe, overrides)
    return recipe_from_dict(apply_overrides(copy.deepcopy(DEFAULT_RECIPE), overrides))


def make_console():
    return Console() if sys.stdout.isatty() else Console(width=160)  # no wrapping when piped


def settings_text(st: dict) -> str:
    flags = [k for k in ("amp_bf16", "channels_last") if st.get(k)]
    if st.get("batched_experts"):
        flags.append("batched_experts")
    if st.get("compile"):
        mode = st.get("compile_mode") or "default"
        flags.append("compile" if mode == "default" else f"compile({mode})")
    return ", ".join([st["loader"]] + flags + ([f"foreach={st['foreach']}"] if st["foreach"] != "default" else []))


def print_results(result: dict, console=None) -> None:
    console = console or make_console()
    data = result["data"]
    title = (f"{result['recipe']}: {data['dataset']}, {data['images_per_epoch']:,} images/epoch on "
             f"{result['device']}" + (" [bold red](SYNTHETIC data)[/]" if data["synthetic"] else ""))
    table = Table(title=title)
    for col in ("mode", "settings", "s/epoch", "img/s", "CPU s/epoch", "peak mem (MiB)", "loader s/epoch",
                "final loss"):
        table.add_column(col, justify="left" if col in ("mode", "settings") else "right")
    for mode, r in result["modes"].items():
        loader_s = r.get("loader_s_per_epoch")
        table.add_row(mode + (f" (best lever: {r['lever']})" if r.get("lever") else ""), settings_text(r["settings"]),
                      f"{r['s_per_epoch']:.3f}", f"{r['img_per_s']:,.0f}", f"{r['cpu_s_per_epoch']:.2f}",
                      f"{r['peak_mem_mib']:,.0f}" + ("" if r["peak_mem_kind"] == "cuda_max_allocated" else " RSS"),
                      "-" if loader_s is None else f"{loader_s:.3f}", f"{r['final_loss']:.4f}")
    console.print(table)
    if data["synthetic"]:
        console.print(f"data: {SYNTHETIC_NOTE}")
    console.print(f"timed epochs: {result['epochs']} after {result['warmup_epochs']} warm-up epoch(s)")
    for mode, r in result["modes"].items():
        if r.get("projected_run_s") is not None:
            console.print(f"{mode}: {result['recipe_epochs']} epochs x {r['s_per_epoch']:.3f} s/epoch = "
                          f"{r['projected_run_s']:.1f} s ({r['projected_run_s'] / 60:.2f} min) of training steps")
    if result.get("speedup") is not None:
        console.print(f"speed-up (fast img/s / reference img/s): {result['speedup']:.2f}x")
        console.print(f"CPU-time ratio (reference / fast CPU s per epoch, robust to other load on a shared "
                      f"CPU): {result['cpu_time_ratio']:.2f}x")


def write_synthetic_main(args, recipe, console) -> dict:
    """``--write-synthetic DIR``: the synthetic CIFAR-100-LT of the recipe's imbalance, then exit."""
    counts = lt_class_counts(500, 100, recipe.data.imb_factor, recipe.data.imb_profile)
    root = write_synthetic_cifar100(Path(args.write_synthetic), counts, args.synthetic_test_per_class,
                                    seed=recipe.seed)
    result = {"benchmark": "speed", "written": str(root), "folder": str(root / "cifar-100-python"),
              "train_images": int(sum(counts)), "test_images": 100 * args.synthetic_test_per_class,
              "imb_factor": recipe.data.imb_factor, "class_counts": counts, "note": SYNTHETIC_NOTE}
    console.print(f"wrote {result['train_images']:,} training and {result['test_images']:,} test images "
                  f"(CIFAR-100-LT IR{recipe.data.imb_factor:g}, {SYNTHETIC_NOTE}) to {result['folder']}")
    console.print(f"train on it: python -m balpoe train recipes/balpoe/cifar100_lt_ir100.yaml "
                  f"--set data.root={root} --set data.download=false --out runs/synthetic")
    return result


def build_result(args, recipe, bundle, device, modes: dict, levers: list | None, skipped: list,
                 partial: bool = False) -> dict:
    """The JSON result (also written after every lever, ``partial: true``, so a killed run leaves data)."""
    if levers:
        modes = {"fast": max(levers, key=lambda r: r["img_per_s"]), **{k: v for k, v in modes.items() if k != "fast"}}
    for r in list(modes.values()) + (levers or []):
        r["projected_run_s"] = recipe.optim.epochs * r["s_per_epoch"] if not args.limit else None
    speedup = cpu_ratio = None
    if "fast" in modes and "reference" in modes:
        speedup = modes["fast"]["img_per_s"] / modes["reference"]["img_per_s"]
        cpu_ratio = modes["reference"]["cpu_s_per_epoch"] / modes["fast"]["cpu_s_per_epoch"]
    result = {
        "benchmark": "speed", "recipe": recipe.name, "device": device_name(device),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "data": {"dataset": recipe.data.dataset, "synthetic": bool(args.synthetic),
                 "note": SYNTHETIC_NOTE if args.synthetic else "real data",
                 "images_per_epoch": len(bundle.train), "limit": args.limit or None},
        "model": {"backbone": recipe.model.backbone, "num_experts": recipe.model.num_experts,
                  "split": recipe.model.split, "batch_size": recipe.optim.batch_size,
                  "batched_experts": getattr(recipe.model, "batched_experts", None)},
        "epochs": args.epochs, "warmup_epochs": args.warmup_epochs, "recipe_epochs": recipe.optim.epochs,
        "modes": modes, "speedup": speedup, "cpu_time_ratio": cpu_ratio,
    }
    if levers is not None:
        result.update(levers=levers, levers_skipped=skipped,
                      best_lever=modes["fast"]["lever"] if "fast" in modes else None)
    if partial:
        result["partial"] = True
    return result


def _skip_list(text: str) -> set[str]:
    keys = {k.strip() for k in text.split(",") if k.strip()}
    unknown = keys - set(LEVER_KEYS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown lever(s) {', '.join(sorted(unknown))}; "
                                         f"choose from {', '.join(LEVER_KEYS)}")
    return keys


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", nargs="?", help="YAML recipe (default: built-in CIFAR-100-LT IR100 BalPoE)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--synthetic", action="store_true", help="write and use synthetic CIFAR-100 (real pickle format)")
    ap.add_argument("--synthetic-test-per-class", type=int, default=10)
    ap.add_argument("--write-synthetic", metavar="DIR",
                    help="write the synthetic CIFAR-100-LT into DIR (DIR/cifar-100-python) and exit")
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per mode")
    ap.add_argument("--warmup-epochs", type=int, default=1, help="untimed epochs first")
    ap.add_argument("--limit", type=int, default=0, help="use only this many training images (smoke tests)")
    ap.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N (default: the recipe's)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: recipe / torch default)")
    ap.add_argument("--amp", action="store_true", help="fast mode: bf16 autocast (where the trainer uses it)")
    ap.add_argument("--channels-last", action="store_true", help="fast mode: channels_last model and batches")
    ap.add_argument("--compile", action="store_true", help="fast mode: torch.compile the model")
    ap.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                    help="torch.compile mode (reduce-overhead: CUDA graphs); a mode other than default implies "
                         "--compile")
    ap.add_argument("--foreach", choices=("default", "on", "off"), default="default",
                    help="fast mode: SGD foreach (multi-tensor) implementation")
    ap.add_argument("--no-fast", action="store_true", help="skip the fast mode")
    ap.add_argument("--levers", action="store_true",
                    help="fast mode once per speed lever, cumulatively (eager -> amp -> channels_last -> batched "
                         "experts -> compile -> reduce-overhead), one table")
    ap.add_argument("--skip-levers", type=_skip_list, default=set(), metavar="KEYS",
                    help=f"comma-separated levers to leave out of --levers ({', '.join(LEVER_KEYS)})")
    ap.add_argument("--reference", action="store_true", help="also run the official-style reference")
    ap.add_argument("--ref-workers", type=int, default=4, help="reference DataLoader workers")
    ap.add_argument("--breakdown", action="store_true", help="also time one epoch of the loader alone")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after the timed epochs, profile N training steps of the fast mode (torch.profiler)")
    ap.add_argument("--profile-top", type=int, default=15, metavar="K", help="ops/kernels listed by --profile")
    ap.add_argument("--trace", metavar="PATH", help="with --profile: write a chrome trace (.json or .json.gz)")
    ap.add_argument("--json", help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.profile < 0 or args.epochs < 1 or args.warmup_epochs < 0:
        ap.error("--profile and --warmup-epochs must be >= 0, --epochs >= 1")
    if args.trace and not args.profile:
        ap.error("--trace needs --profile N")
    if args.levers and args.no_fast:
        ap.error("--levers runs the fast path; drop --no-fast")

    console = make_console()
    recipe = load_bench_recipe(args)
    if args.write_synthetic:
        result = write_synthetic_main(args, recipe, console)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return result
    threads = args.threads or recipe.train.threads
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(args.device or recipe.train.device)

    tmp = None
    if args.synthetic:
        tmp = tempfile.TemporaryDirectory(prefix="balpoe-synthetic-")
        counts = lt_class_counts(500, 100, recipe.data.imb_factor, recipe.data.imb_profile)
        root = write_synthetic_cifar100(Path(tmp.name), counts, args.synthetic_test_per_class, seed=recipe.seed)
        recipe.data.root = str(root)
    try:
        bundle = build_data(recipe.data, device, seed=recipe.seed)
    finally:
        if tmp is not None:
            tmp.cleanup()
    if not bundle.in_memory and (args.reference or args.limit):
        raise BalpoeError(f"--reference and --limit need an in-memory dataset (CIFAR, Fashion-MNIST), "
                          f"not {bundle.name}")
    if args.limit and args.limit < len(bundle.train):
        keep = torch.randperm(len(bundle.train), generator=torch.Generator().manual_seed(recipe.seed))[:args.limit]
        bundle.train = bundle.train.subset(keep.sort().values)
        bundle.class_counts = torch.bincount(bundle.train.labels.cpu(), minlength=bundle.num_classes)

    tc = recipe.train
    # With --levers the trace (if any) is the fastest lever's: each lever writes its own, the best one is kept.
    trace_dir = tempfile.TemporaryDirectory(prefix="balpoe-trace-") if (args.trace and args.levers) else None
    modes, levers, skipped = {}, None, []
    if args.reference:  # first, so that the lever rows can be compared with it
        modes["reference"] = run_reference(bundle, recipe, device, args)
    try:
        if args.levers:
            levers = []
            plan, skipped = lever_plan(recipe, device, args.skip_levers, args.foreach)
            for s in skipped:
                console.print(f"lever {s['lever']!r} skipped: {s['reason']}")
            if not plan:
                raise BalpoeError("--levers: every lever is skipped; leave fewer out with --skip-levers")
            for i, (key, label, settings) in enumerate(plan, 1):
                console.print(f"lever {i}/{len(plan)}: {label}")
                trace = (str(Path(trace_dir.name) / f"{i}{''.join(Path(args.trace).suffixes)}")
                         if trace_dir is not None else None)
                r = run_fast(bundle, recipe, device, args, settings, trace)
                prev, first = (levers[-1] if levers else r), (levers[0] if levers else r)
                r.update({"lever": label, "lever_key": key,
                          "speedup_vs_previous": r["img_per_s"] / prev["img_per_s"],
                          "speedup_vs_first": r["img_per_s"] / first["img_per_s"],
                          "speedup_vs_reference": (r["img_per_s"] / modes["reference"]["img_per_s"]
                                                   if "reference" in modes else None)})
                levers.append(r)
                console.print(f"lever {i}/{len(plan)}: {label}: {r['s_per_epoch']:.3f} s/epoch, "
                              f"{r['img_per_s']:,.0f} img/s ({r['speedup_vs_previous']:.2f}x vs previous), "
                              f"warm-up {', '.join(f'{w:.1f}' for w in r['warmup_epoch_seconds']) or '-'} s")
                if args.json and i < len(plan):
                    partial = build_result(args, recipe, bundle, device, modes, levers, skipped, partial=True)
                    Path(args.json).write_text(json.dumps(partial, indent=2) + "\n")
            best = max(levers, key=lambda r: r["img_per_s"])
            if trace_dir is not None:
                Path(args.trace).parent.mkdir(parents=True, exist_ok=True)
                shutil.move(best["profile"]["trace"], args.trace)  # tmp may be another file system
                for r in levers:
                    r["profile"]["trace"] = args.trace if r is best else None
        elif not args.no_fast:
            settings = FastSettings(amp=args.amp or tc.amp, channels_last=args.channels_last or tc.channels_last,
                                    compile=(args.compile or compile_enabled(tc.compile, device)
                                             or args.compile_mode != "default"),
                                    compile_mode=args.compile_mode if args.compile_mode != "default"
                                    else tc.compile_mode, foreach=args.foreach)
            modes = {"fast": run_fast(bundle, recipe, device, args, settings, args.trace), **modes}
    finally:
        if trace_dir is not None:
            trace_dir.cleanup()

    result = build_result(args, recipe, bundle, device, modes, levers, skipped)
    modes = result["modes"]
    if levers is not None:
        print_levers(result, console)
    print_results(result, console)
    if args.profile and "fast" in modes:
        label = f"{modes['fast']['lever']}: " if levers is not None else "fast: "
        print_profile(modes["fast"]["profile"], console, title=label)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    run_reporting_errors(main)
