#!/usr/bin/env python
"""Training speed of a recipe: seconds per epoch, images per second and peak memory.

    # CIFAR-100-LT IR100 BalPoE (ResNet-32, 3 experts) on synthetic data, fast path only
    python benchmarks/train_speed.py --synthetic
    # fast path with every switch on, plus the official-style reference and the speed-up, one run
    python benchmarks/train_speed.py --synthetic --amp --channels-last --compile --reference --json speed.json
    # any recipe, e.g. the CPU demo, with a data-loader/model breakdown
    python benchmarks/train_speed.py recipes/balpoe/fashion_mnist_lt_ir100_cpu_demo.yaml --threads 2 --breakdown

Each mode trains ``--warmup-epochs`` (default 1, untimed: allocator, cuDNN autotuning,
``torch.compile``) then ``--epochs`` (default 2) timed epochs on the same data in the same
process.  CUDA timings are taken between ``torch.cuda.synchronize()`` calls.  Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA (reset per mode) and the process's resident-set
high-water mark (``VmHWM``, reset per mode through ``/proc/self/clear_refs``) on CPU; on CPU it
counts the main process only, not DataLoader workers.

* **fast**: the library's trainer pieces -- ``build_data`` / ``build_loader`` (the device-resident
  loader with batched augmentation for in-memory datasets), ``build_model``, ``BalPoELoss``,
  ``build_optimizer`` and ``train_one_epoch`` (one host sync per epoch) -- with optional
  ``--amp`` (bf16 autocast, CUDA only, as the trainer), ``--channels-last``, ``--compile``.
* **reference** (``--reference``): ``reference_balpoe.py``, a plain-PyTorch re-implementation of
  the official BalPoE step (PIL/torchvision DataLoader with 4 workers, fp32, NCHW, no compile,
  global-RNG mixup, per-expert loss loop, ``.item()`` every step).

``--synthetic`` writes CIFAR-100 in the real python-pickle layout (``cifar-100-python/{train,
test,meta}``) with exactly the CIFAR-100-LT counts of ``data.imb_factor`` (IR100: 10,847 training
images), so the library's reader and LT subsampling run unchanged; images are class prototypes
plus noise, NOT the real CIFAR-100: use it for speed, never for accuracy.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in (str(HERE.parent), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from balpoe.data.cifar import save_cifar  # noqa: E402

DEFAULT_RECIPE = {  # CIFAR-100-LT IR100 BalPoE, standard training (official config; balpoe-notes.md §3)
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
    """``root/cifar-100-python/{train,test,meta}``: pickled dicts (protocol 2, bytes keys) with
    ``b'data'`` uint8 ``[N, 3072]`` (R, G, B planes), ``b'fine_labels'``, ``b'coarse_labels'``,
    ``b'filenames'``, ``b'batch_label'``; ``meta`` holds the label names.  Returns ``root``."""
    rng = np.random.default_rng(seed)
    num_classes = len(train_counts)
    # One coarse 4x4 colour pattern per class (upsampled x8) around a class brightness.
    coarse = rng.integers(-50, 51, size=(num_classes, 3, 4, 4))
    base = np.linspace(70, 185, num_classes).reshape(-1, 1, 1, 1)
    protos = (base + coarse.repeat(8, axis=2).repeat(8, axis=3)).astype(np.int16)

    def split(counts):
        labels = np.repeat(np.arange(num_classes), counts)
        rng.shuffle(labels)
        x = protos[labels] + rng.integers(-25, 26, size=(len(labels), 3, 32, 32), dtype=np.int16)
        return np.clip(x, 0, 255).astype(np.uint8), labels

    data = [split(counts) for counts in (train_counts, [test_per_class] * num_classes)]
    save_cifar(root, num_classes, *data, class_names=[f"synthetic_{c:02d}" for c in range(num_classes)])
    return root


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


def timed_epochs(run_epoch, warmup: int, epochs: int, device: torch.device) -> list[dict]:
    """Run ``warmup + epochs`` epochs; the timed ones give ``{'seconds', 'cpu_seconds', 'images', 'loss'}``.

    ``cpu_seconds`` (all threads) hardly depends on other load on the machine: on a shared CPU,
    ``cpu_seconds / threads`` estimates the wall time the epoch would take on idle cores."""
    rows = []
    for epoch in range(warmup + epochs):
        sync(device)
        start, cpu_start = time.perf_counter(), cpu_seconds()
        stats = run_epoch(epoch)
        sync(device)
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
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
# The two modes


def run_fast(bundle, recipe, device, args) -> dict:
    from balpoe.data.build import build_loader
    from balpoe.losses import BalPoELoss
    from balpoe.trainer import build_model, build_optimizer, expert_taus, train_one_epoch

    tc = recipe.train
    amp = (args.amp or tc.amp) and device.type == "cuda"   # as the trainer: bf16 autocast on CUDA only
    channels_last = args.channels_last or tc.channels_last
    compile_ = args.compile or tc.compile
    reset_peak_memory(device)
    torch.manual_seed(recipe.seed)
    loader = build_loader(bundle, "train", recipe.optim.batch_size, recipe.data, train=True, seed=recipe.seed,
                          channels_last=channels_last)
    model = build_model(recipe, bundle.num_classes, bundle.in_chans).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = BalPoELoss(bundle.class_counts, expert_taus(recipe)).to(device)
    optimizer = build_optimizer(recipe, model.parameters())
    if args.foreach != "default":
        for group in optimizer.param_groups:
            group["foreach"] = args.foreach == "on"
    train_model = torch.compile(model) if compile_ else model

    def epoch_fn(epoch):
        loader.set_epoch(epoch)
        model.train()
        return train_one_epoch(train_model, loader, criterion, optimizer, bundle.num_classes, tc.mixup_alpha,
                               recipe.seed, epoch, amp)

    rows = timed_epochs(epoch_fn, args.warmup_epochs, args.epochs, device)
    extra = {"settings": {"loader": type(loader).__name__, "amp_bf16": amp, "channels_last": channels_last,
                          "compile": compile_, "foreach": args.foreach}}
    if args.breakdown:
        extra.update(loader_seconds(loader, device))
    return summarise(rows, device, extra)


def run_reference(bundle, recipe, device, args) -> dict:
    from reference_balpoe import (official_cudnn_settings, reference_loader, reference_optimizer,
                                  reference_train_epoch)

    from balpoe.trainer import build_model, expert_taus

    taus = expert_taus(recipe)
    reset_peak_memory(device)
    torch.manual_seed(recipe.seed)
    np.random.seed(recipe.seed)
    loader = reference_loader(bundle, recipe, recipe.optim.batch_size, args.ref_workers, recipe.seed,
                              pin_memory=device.type == "cuda")
    model = build_model(recipe, bundle.num_classes, bundle.in_chans).to(device)
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


def load_bench_recipe(args):
    from balpoe.recipe import apply_overrides, load_recipe, recipe_from_dict
    overrides = list(args.overrides)
    if args.synthetic:
        overrides += ["data.dataset=cifar100"]
    if args.recipe:
        return load_recipe(args.recipe, overrides)
    import copy
    return recipe_from_dict(apply_overrides(copy.deepcopy(DEFAULT_RECIPE), overrides))


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def print_results(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    console = Console() if sys.stdout.isatty() else Console(width=160)  # no wrapping when piped
    data = result["data"]
    title = (f"{result['recipe']}: {data['dataset']}, {data['images_per_epoch']:,} images/epoch on "
             f"{result['device']}" + (" [bold red](SYNTHETIC data)[/]" if data["synthetic"] else ""))
    table = Table(title=title)
    for col in ("mode", "settings", "s/epoch", "img/s", "CPU s/epoch", "peak mem (MiB)", "loader s/epoch",
                "final loss"):
        table.add_column(col, justify="left" if col in ("mode", "settings") else "right")
    for mode, r in result["modes"].items():
        st = r["settings"]
        settings = ", ".join([st["loader"]] + [k for k in ("amp_bf16", "channels_last", "compile") if st[k]]
                             + ([f"foreach={st['foreach']}"] if st["foreach"] != "default" else []))
        loader_s = r.get("loader_s_per_epoch")
        table.add_row(mode, settings, f"{r['s_per_epoch']:.3f}", f"{r['img_per_s']:,.0f}",
                      f"{r['cpu_s_per_epoch']:.2f}",
                      f"{r['peak_mem_mib']:,.0f}" + ("" if r["peak_mem_kind"] == "cuda_max_allocated" else " RSS"),
                      "-" if loader_s is None else f"{loader_s:.3f}", f"{r['final_loss']:.4f}")
    console.print(table)
    if data["synthetic"]:
        console.print(f"data: {SYNTHETIC_NOTE}")
    console.print(f"timed epochs: {result['epochs']} after {result['warmup_epochs']} warm-up epoch(s)")
    if result.get("speedup") is not None:
        console.print(f"speed-up (fast img/s / reference img/s): {result['speedup']:.2f}x")
        console.print(f"CPU-time ratio (reference / fast CPU s per epoch, robust to other load on a shared "
                      f"CPU): {result['cpu_time_ratio']:.2f}x")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", nargs="?", help="YAML recipe (default: built-in CIFAR-100-LT IR100 BalPoE)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--synthetic", action="store_true", help="write and use synthetic CIFAR-100 (real pickle format)")
    ap.add_argument("--synthetic-test-per-class", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per mode")
    ap.add_argument("--warmup-epochs", type=int, default=1, help="untimed epochs first")
    ap.add_argument("--limit", type=int, default=0, help="use only this many training images (smoke tests)")
    ap.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N (default: the recipe's)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: recipe / torch default)")
    ap.add_argument("--amp", action="store_true", help="fast mode: bf16 autocast (CUDA)")
    ap.add_argument("--channels-last", action="store_true", help="fast mode: channels_last model and batches")
    ap.add_argument("--compile", action="store_true", help="fast mode: torch.compile the model")
    ap.add_argument("--foreach", choices=("default", "on", "off"), default="default",
                    help="fast mode: SGD foreach (multi-tensor) implementation")
    ap.add_argument("--no-fast", action="store_true", help="skip the fast mode")
    ap.add_argument("--reference", action="store_true", help="also run the official-style reference")
    ap.add_argument("--ref-workers", type=int, default=4, help="reference DataLoader workers")
    ap.add_argument("--breakdown", action="store_true", help="also time one epoch of the loader alone")
    ap.add_argument("--json", help="write the results as JSON here")
    args = ap.parse_args(argv)

    from balpoe.data.build import build_data
    from balpoe.data.lt import lt_class_counts
    from balpoe.errors import BalpoeError
    from balpoe.trainer import resolve_device

    recipe = load_bench_recipe(args)
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

    modes = {}
    if not args.no_fast:
        modes["fast"] = run_fast(bundle, recipe, device, args)
    if args.reference:
        modes["reference"] = run_reference(bundle, recipe, device, args)
    speedup = cpu_ratio = None
    if "fast" in modes and "reference" in modes:
        speedup = modes["fast"]["img_per_s"] / modes["reference"]["img_per_s"]
        cpu_ratio = modes["reference"]["cpu_s_per_epoch"] / modes["fast"]["cpu_s_per_epoch"]
    result = {
        "benchmark": "train_speed", "recipe": recipe.name, "device": device_description(device),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "data": {"dataset": recipe.data.dataset, "synthetic": bool(args.synthetic),
                 "note": SYNTHETIC_NOTE if args.synthetic else "real data",
                 "images_per_epoch": len(bundle.train), "limit": args.limit or None},
        "model": {"backbone": recipe.model.backbone, "num_experts": recipe.model.num_experts,
                  "split": recipe.model.split, "batch_size": recipe.optim.batch_size},
        "epochs": args.epochs, "warmup_epochs": args.warmup_epochs, "modes": modes, "speedup": speedup,
        "cpu_time_ratio": cpu_ratio,
    }
    print_results(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    from balpoe.errors import run_reporting_errors
    run_reporting_errors(main)
