#!/usr/bin/env python
"""Strong augmentation on the device path: the demo-size BalPoE with and without a policy, same epochs.

What it measures: balanced test accuracy, many/medium/few and ECE of the CPU demo recipe
(``recipes/balpoe/fashion_mnist_lt_ir100_cpu_demo.yaml``: BalPoE, 3 experts, small CNN, real
Fashion-MNIST-LT IR100, 12 epochs) trained with ``data.augment.policy: none`` (crop + flip) and with a
strong policy (default ``autoaugment_cifar10``, batched per sample on the device), for each seed;
then mean ± std per policy and the paired difference.  Wall time per run is printed too.

    python benchmarks/augment_ablation.py                         # none vs autoaugment_cifar10, seeds 0 1
    python benchmarks/augment_ablation.py --policies none randaugment trivialaugment --seeds 0 1 2
    python benchmarks/augment_ablation.py --policies autoaugment_cifar10_official autoaugment_cifar10

Results: see README "Strong augmentation".
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from rich.table import Table

from balpoe.errors import run_reporting_errors
from balpoe.recipe import load_recipe
from balpoe.runtime.checkpoint import write_json
from balpoe.runtime.console import console
from balpoe.training.build import train

HERE = Path(__file__).resolve().parent
METRICS = ("acc", "many", "medium", "few", "ece")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", nargs="?", default=str(HERE.parent / "recipes/balpoe/fashion_mnist_lt_ir100_cpu_demo.yaml"))
    ap.add_argument("--policies", nargs="+", default=["none", "autoaugment_cifar10"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="runs/augment_ablation")
    args = ap.parse_args(argv)
    out = Path(args.out)
    rows: dict[str, list[dict]] = {p: [] for p in args.policies}
    for policy in args.policies:
        for seed in args.seeds:
            run = out / f"{policy}_seed{seed}"
            recipe = load_recipe(args.recipe, [*args.overrides, f"seed={seed}", f"data.augment.policy={policy}"])
            start = time.perf_counter()
            quiet, console.quiet = console.quiet, True
            try:
                report = train(recipe, run, resume="auto", show_progress=False, report=False)
            finally:
                console.quiet = quiet
            seconds = time.perf_counter() - start
            rows[policy].append({"seed": seed, "seconds": seconds, **{m: report[m] for m in METRICS}})
            console.print(f"{policy:>20} seed {seed}: acc {report['acc']:.2f}  ECE {report['ece']:.2f}  ({seconds:.0f} s)")
    table = Table(title=f"{Path(args.recipe).name}: strong augmentation, seeds {args.seeds}")
    table.add_column("policy")
    for m in METRICS:
        table.add_column(m, justify="right")
    table.add_column("s/run", justify="right")
    summary = {}
    for policy, rs in rows.items():
        stats = {m: (statistics.mean(r[m] for r in rs), statistics.stdev(r[m] for r in rs) if len(rs) > 1 else 0.0)
                 for m in METRICS}
        summary[policy] = {m: {"mean": a, "std": s} for m, (a, s) in stats.items()}
        table.add_row(policy, *[f"{a:.2f} ± {s:.2f}" for a, s in stats.values()],
                      f"{statistics.mean(r['seconds'] for r in rs):.0f}")
    console.print(table)
    base = args.policies[0]
    for policy in args.policies[1:]:
        diffs = [b["acc"] - a["acc"] for a, b in zip(rows[base], rows[policy])]
        sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        console.print(f"{policy} - {base}: balanced accuracy {statistics.mean(diffs):+.2f} ± {sd:.2f} (paired, "
                      f"{len(diffs)} seeds)")
    result = {"recipe": args.recipe, "seeds": args.seeds, "runs": rows, "summary": summary}
    write_json(result, out / "results.json")
    return result


if __name__ == "__main__":
    run_reporting_errors(main)
