"""Own data vs built-in data: does a PNG class folder train as well and as fast as the built-in split?

Writes Fashion-MNIST-LT IR100 as a PNG class folder (``--folder``, default
``/tmp/fmnist_lt_ir100_png``: the 14,886 training images the built-in long-tailed split keeps,
Cao et al. 2019 construction, and the full 10,000-image test set; one sub-folder per class,
``<label>_<name>``, so that the folder order is the label order), then trains the CPU demo recipe
(``recipes/balpoe/fashion_mnist_lt_ir100_cpu_demo.yaml``: same model, schedule and augmentation keys)
on both, one training at a time:

* ``builtin``: ``data.dataset: fashion_mnist`` (IDX files, in memory, device augmentation);
* ``folder``: ``data.dataset: image_folder`` on the PNGs with every pipeline key automatic
  (``data.in_memory: auto``: 28x28 grey images -> one channel, pad-and-crop, the training split's own
  mean / std, decoded once and augmented on the device);
* ``folder_files`` (``--sides``): the same folder read from disk every epoch (``data.in_memory: false``).

Prints (and writes ``--out``/results.md) balanced test accuracy, many / medium / few, ECE and the
training images per second (median over the epochs) per run, and the mean per side.  On a shared
machine the training runs' speeds drift with the other load; ``--speed N`` then also times the
sides with ``benchmarks/speed.py`` (one untimed and one timed epoch, same threads), alternating
builtin / folder N times, and reports each side's median and the ratio.

    python benchmarks/own_data.py                       # seeds 0 1, 1 thread, sides builtin,folder
    python benchmarks/own_data.py --sides builtin,folder,folder_files --seeds 0
    python benchmarks/own_data.py --speed-only --speed 3   # speed alone, alternating the sides
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from balpoe.data.fashion_mnist import CLASS_NAMES, load_fashion_mnist
from balpoe.data.lt import lt_class_counts, lt_subsample_indices

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "balpoe" / "fashion_mnist_lt_ir100_cpu_demo.yaml"
SIDES = {
    "builtin": [],
    "folder": ["data.dataset=image_folder", "data.train_root={folder}/train", "data.test_root={folder}/test"],
    "folder_files": ["data.dataset=image_folder", "data.train_root={folder}/train", "data.test_root={folder}/test",
                     "data.in_memory=false", "data.num_workers=0"],
}


def class_folder(label: int) -> str:
    return f"{label}_{CLASS_NAMES[label].replace('/', '_')}"


def write_folder(folder: Path, imb_factor: float = 100.0) -> Path:
    """The Fashion-MNIST-LT training split (the images the built-in split keeps) and the test set as PNGs."""
    if (folder / "done").is_file():
        return folder
    for split, train in (("train", True), ("test", False)):
        images, labels, _ = load_fashion_mnist(None, train=train)
        idx = np.arange(len(labels))
        if train:
            idx = lt_subsample_indices(labels, lt_class_counts(int(np.bincount(labels).max()), 10, imb_factor, "exp"))
        for i in idx:
            d = folder / split / class_folder(int(labels[i]))
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i, 0]).save(d / f"{i:05d}.png")
    (folder / "done").write_text("ok\n")
    return folder


def train(side: str, seed: int, folder: Path, out: Path, threads: int) -> dict:
    run = out / f"{side}_s{seed}"
    if not (run / "eval.json").is_file():
        sets = [s.format(folder=folder) for s in SIDES[side]] + [f"seed={seed}", f"train.threads={threads}",
                                                                 f"name={side}_s{seed}"]
        cmd = [sys.executable, "-m", "balpoe", "train", str(RECIPE), "--out", str(run), "--no-report"]
        for s in sets:
            cmd += ["--set", s]
        subprocess.run(cmd, check=True)
    ev = json.loads((run / "eval.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"side": side, "seed": seed, "acc": ev["acc"], "many": ev["many"], "medium": ev["medium"],
            "few": ev["few"], "ece": ev["ece"], "img_per_s": statistics.median(r["img_per_s"] for r in rows)}


def speed(side: str, folder: Path, threads: int) -> float:
    """Training images/s of one timed epoch of ``side`` (``benchmarks/speed.py``, a fresh process)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "speed.json"
        cmd = [sys.executable, str(Path(__file__).with_name("speed.py")), str(RECIPE), "--threads", str(threads),
               "--epochs", "1", "--json", str(out)]
        for s in SIDES[side]:
            cmd += ["--set", s.format(folder=folder)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())["modes"]["fast"]["img_per_s"]


def speed_table(folder: Path, threads: int, repeats: int, sides: list[str]) -> str:
    times: dict[str, list[float]] = {s: [] for s in sides}
    for _ in range(repeats):
        for side in sides:
            times[side].append(speed(side, folder, threads))
    med = {s: statistics.median(v) for s, v in times.items()}
    lines = ["| side | img/s, each run | median | vs builtin |", "|---|---|---:|---:|"]
    for s, v in times.items():
        ratio = f"{med[s] / med['builtin']:.2f}x" if "builtin" in med else ""
        lines.append(f"| {s} | {', '.join(f'{x:,.0f}' for x in v)} | {med[s]:,.0f} | {ratio} |")
    return "\n".join(lines)


def table(results: list[dict]) -> str:
    keys = ("acc", "many", "medium", "few", "ece", "img_per_s")
    lines = ["| run | balanced acc | many | medium | few | ECE | img/s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['side']} seed {r['seed']} | " + " | ".join(
            f"{r[k]:,.0f}" if k == "img_per_s" else f"{r[k]:.2f}" for k in keys) + " |")
    for side in dict.fromkeys(r["side"] for r in results):
        rs = [r for r in results if r["side"] == side]
        lines.append(f"| **{side}, mean of {len(rs)}** | " + " | ".join(
            f"{statistics.mean(r[k] for r in rs):,.0f}" if k == "img_per_s" else
            f"{statistics.mean(r[k] for r in rs):.2f}" for k in keys) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", default="/tmp/fmnist_lt_ir100_png", help="where the PNG folder is written (reused)")
    ap.add_argument("--out", default="runs/own_data", help="run folders and results.md")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--sides", default="builtin,folder", help=f"comma-separated, of {', '.join(SIDES)}")
    ap.add_argument("--threads", type=int, default=1, help="train.threads of every run (default 1)")
    ap.add_argument("--write-only", action="store_true", help="write the folder and stop")
    ap.add_argument("--speed", type=int, default=0, metavar="N",
                    help="also time the sides with benchmarks/speed.py, alternating, N times each")
    ap.add_argument("--speed-only", action="store_true", help="only the --speed timing (no training runs)")
    args = ap.parse_args()
    folder = write_folder(Path(args.folder))
    if args.write_only:
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sides = args.sides.split(",")
    text = ""
    if not args.speed_only:
        results = [train(side, seed, folder, out, args.threads) for seed in args.seeds for side in sides]
        text = table(results)
    if args.speed:
        text += ("\n\n" if text else "") + speed_table(folder, args.threads, args.speed, sides)
    (out / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
