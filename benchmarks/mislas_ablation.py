# mislas_ablation.py -- MiSLAS (Zhong et al., CVPR 2021) on real Fashion-MNIST-LT IR100 at CPU-demo
# size: the paper's Table 2 ablation (stage 2, + shifted BN, + label-aware smoothing), cRT and LWS
# (Kang et al., ICLR 2020), and BalPoE's 3-expert model with the same stage 2.
# How: every run is `balpoe train` of a shipped recipe plus overrides, one seed; balanced top-1,
# many/medium/few, ECE, NLL and mean confidence on the balanced 10,000-image test set.
# Command (the README's MiSLAS table: 5.2 min on 2 idle CPU cores, longer on busy ones):
#   python benchmarks/mislas_ablation.py          # -> runs/mislas_ablation/results.json
"""MiSLAS on real Fashion-MNIST-LT (imbalance ratio 100) at CPU-demo size: the paper's Table 2
ablation, cRT / LWS, and BalPoE's 3-expert model with the same stage 2.

One command reproduces the table (about 5 minutes on 2 idle CPU cores, up to 10 on shared ones)::

    python benchmarks/mislas_ablation.py                    # -> runs/mislas_ablation/results.json

Runs (every one through ``balpoe.training.build.train``, i.e. ``balpoe train``, with a shipped
recipe plus ``--set``-style overrides):

* MiSLAS stage 1 once: ``recipes/mislas/fashion_mnist_lt_ir100_cpu_demo_stage1.yaml`` (small_cnn,
  E = 1, linear head, cross-entropy + mixup alpha 1).
* Stage 2 from it with ``recipes/mislas/fashion_mnist_lt_ir100_cpu_demo_stage2.yaml``:
  cRT, LWS (both as Kang et al.: cross-entropy, no shifted BN) and the Table 2 steps
  stage 2 (LWS + dW, CE, BN frozen) -> + shifted BN -> + LAS (= full MiSLAS).
* BalPoE: ``recipes/balpoe/fashion_mnist_lt_ir100_cpu_demo.yaml`` (3 experts, tau 0/1/2), then the
  same stage 2 (per-expert LWS + dW, shifted BN) with cross-entropy, with LAS (= the full MiSLAS
  stage 2) using the default per-expert offsets ``tau_k - mean tau``, and with LAS and offsets
  ``tau_k`` for comparison (``stage2.expert_adjust``; see
  ``balpoe.losses.priors.stage2_expert_offsets``).

Accuracy is top-1 on the balanced Fashion-MNIST test set (10,000 images, 1,000 per class), i.e.
balanced accuracy; ECE is 15-bin top-label ECE in %; "conf" is the mean top-1 probability in %
(above the accuracy: over-confident, below: under-confident).  A completed run (its ``eval.json``) is reused
unless ``--fresh``; one seed, so differences of a few tenths of a point are within noise.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from balpoe.data.build import build_data, build_loader
from balpoe.evaluate.build import load_model
from balpoe.evaluate.logits import collect_logits
from balpoe.models.multi_expert import MultiExpertNet
from balpoe.recipe import load_recipe
from balpoe.runtime.console import console
from balpoe.training.build import train

REPO = Path(__file__).resolve().parents[1]

MISLAS_S1 = REPO / "recipes/mislas/fashion_mnist_lt_ir100_cpu_demo_stage1.yaml"
MISLAS_S2 = REPO / "recipes/mislas/fashion_mnist_lt_ir100_cpu_demo_stage2.yaml"
BALPOE_S1 = REPO / "recipes/balpoe/fashion_mnist_lt_ir100_cpu_demo.yaml"

CE = ["stage2.eps_1=0", "stage2.eps_k=0"]
NO_SBN = ["stage2.shifted_bn=false"]

#: key, label, recipe, stage-1 run it starts from (None: a stage-1 run), overrides, compared with
RUNS = [
    ("mislas_s1", "stage 1 only (CE + mixup)", MISLAS_S1, None, [], None),
    # cRT re-trains a fresh classifier (Eq. 4 with a = 0, s = 1): at the full stage-2 lr, as Kang et al.
    ("crt", "cRT (CE, BN frozen)", MISLAS_S2, "mislas_s1",
     ["stage2.classifier=crt", "stage2.delta_lr_factor=1", *CE, *NO_SBN], "mislas_s1"),
    ("lws", "LWS (CE, BN frozen)", MISLAS_S2, "mislas_s1", ["stage2.classifier=lws", *CE, *NO_SBN], "mislas_s1"),
    ("abl_stage2", "+ stage 2: LWS+dW, CE, BN frozen", MISLAS_S2, "mislas_s1", [*CE, *NO_SBN], "mislas_s1"),
    ("abl_shifted_bn", "+ shifted BN", MISLAS_S2, "mislas_s1", CE, "abl_stage2"),
    ("mislas", "+ LAS = MiSLAS", MISLAS_S2, "mislas_s1", [], "abl_shifted_bn"),
    # float32 like the MiSLAS rows (the demo recipe itself trains in bf16 where the CPU has it)
    ("balpoe_s1", "BalPoE stage 1 (3 experts, tau 0/1/2)", BALPOE_S1, None, ["train.amp=false"], None),
    ("balpoe_stage2_ce", "+ stage 2: LWS+dW per expert, shifted BN, CE", MISLAS_S2, "balpoe_s1", CE, "balpoe_s1"),
    ("balpoe_mislas", "+ LAS = MiSLAS stage 2 (offsets tau_k - mean tau)", MISLAS_S2, "balpoe_s1", [],
     "balpoe_stage2_ce"),
    ("balpoe_mislas_abs", "MiSLAS stage 2 with offsets tau_k instead", MISLAS_S2, "balpoe_s1",
     ["stage2.expert_adjust=absolute"], "balpoe_mislas"),
]
SECTIONS = {"mislas_s1": "MiSLAS (E = 1): decoupling classifiers and the Table 2 ablation",
            "balpoe_s1": "BalPoE (E = 3) + the same stage 2"}


def run_one(key: str, recipe_path: Path, init: str | None, overrides: list[str], out: Path, fresh: bool,
            progress: bool) -> dict:
    run_dir = out / key
    if init is not None:
        overrides = [f"stage2.init_checkpoint={out / init / 'last.pt'}", *overrides]
    done = run_dir / "eval.json"
    if done.is_file() and not fresh:
        console.print(f"[dim]{key}: reusing {done}[/dim]")
        saved = json.loads((run_dir / "benchmark_run.json").read_text()) if (run_dir / "benchmark_run.json").is_file() \
            else {}
        return {"report": json.loads(done.read_text()), "seconds": saved.get("seconds"), "overrides": overrides,
                "recipe": str(recipe_path.relative_to(REPO)), "reused": True}
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished run of this script
    recipe = load_recipe(recipe_path, overrides)
    console.rule(f"{key}: {recipe.name} {' '.join(overrides)}")
    start = time.perf_counter()
    report = train(recipe, run_dir, show_progress=progress)
    seconds = time.perf_counter() - start
    (run_dir / "benchmark_run.json").write_text(json.dumps({"seconds": seconds, "overrides": overrides}) + "\n")
    return {"report": report, "seconds": seconds, "overrides": overrides,
            "recipe": str(recipe_path.relative_to(REPO)), "reused": False}


class TestSet:
    """The balanced test set, loaded once: mean top-1 confidence of a checkpoint's ensemble (its
    sign against accuracy says over- or under-confidence, which ECE alone does not)."""

    def __init__(self):
        self.loader = None

    def mean_confidence(self, checkpoint: Path) -> float:
        model, recipe, _ = load_model(checkpoint, "cpu")
        if self.loader is None:
            bundle = build_data(recipe.data, "cpu", seed=recipe.seed)
            self.loader = build_loader(bundle, "test", recipe.train.eval_batch_size, recipe.data, train=False)
        logits, _ = collect_logits(model, self.loader, torch.device("cpu"))
        return 100.0 * torch.softmax(MultiExpertNet.ensemble(logits), -1).max(-1).values.mean().item()


def _signed(x: float) -> str:
    return f"{x:+.2f}"


def findings(results: dict) -> dict:
    """Yes/no answers with the numbers behind them (accuracy up? ECE down?)."""
    def delta(a: str, b: str) -> dict:
        ra, rb = results[a]["report"], results[b]["report"]
        return {"d_acc": ra["acc"] - rb["acc"], "d_ece": ra["ece"] - rb["ece"],
                "acc_up": ra["acc"] > rb["acc"], "ece_down": ra["ece"] < rb["ece"],
                "confidence_minus_acc": [results[b]["mean_confidence"] - rb["acc"],
                                         results[a]["mean_confidence"] - ra["acc"]]}
    return {
        "stage2_helps (LWS+dW vs stage 1)": delta("abl_stage2", "mislas_s1"),
        "shifted_bn_helps": delta("abl_shifted_bn", "abl_stage2"),
        "las_helps": delta("mislas", "abl_shifted_bn"),
        "mislas_vs_stage1": delta("mislas", "mislas_s1"),
        "mislas_vs_crt": delta("mislas", "crt"),
        "mislas_vs_lws": delta("mislas", "lws"),
        "balpoe: stage 2 (CE) vs stage 1": delta("balpoe_stage2_ce", "balpoe_s1"),
        "balpoe: LAS in stage 2": delta("balpoe_mislas", "balpoe_stage2_ce"),
        "balpoe: MiSLAS stage 2 vs stage 1": delta("balpoe_mislas", "balpoe_s1"),
        "balpoe: offsets tau_k vs tau_k - mean tau": delta("balpoe_mislas_abs", "balpoe_mislas"),
        "balpoe + MiSLAS stage 2 vs MiSLAS": delta("balpoe_mislas", "mislas"),
    }


def results_table(results: dict):
    t = Table(title="MiSLAS / BalPoE stage 2 on Fashion-MNIST-LT IR100 (CPU demo, balanced test set)")
    for c in ("run", "acc", "many", "medium", "few", "ECE", "conf", "NLL", "vs", "d acc", "d ECE", "s"):
        t.add_column(c, justify="left" if c in ("run", "vs") else "right")
    for key, label, _, _, _, ref in RUNS:
        if key in SECTIONS:
            t.add_section()
            t.add_row(f"[bold]{SECTIONS[key]}[/bold]")
        r = results[key]["report"]
        vs, da, de = "", "", ""
        if ref is not None:
            rr = results[ref]["report"]
            vs, da, de = ref, _signed(r["acc"] - rr["acc"]), _signed(r["ece"] - rr["ece"])
        secs = results[key]["seconds"]
        t.add_row(label, f"{r['acc']:.2f}", f"{r['many']:.2f}", f"{r['medium']:.2f}", f"{r['few']:.2f}",
                  f"{r['ece']:.2f}", f"{results[key]['mean_confidence']:.2f}", f"{r['nll']:.3f}", vs, da, de,
                  "" if secs is None else f"{secs:.0f}")
    return t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "runs" / "mislas_ablation"), help="run directories")
    p.add_argument("--json", default=None, help="results JSON (default: OUT/results.json)")
    p.add_argument("--fresh", action="store_true", help="retrain runs that already finished")
    p.add_argument("--progress", action="store_true", help="show the per-run progress bars")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = {}
    for key, label, recipe, init, overrides, ref in RUNS:
        results[key] = {"label": label, "compared_with": ref,
                        **run_one(key, recipe, init, overrides, out, args.fresh, args.progress)}
    test_set = TestSet()
    for key in results:
        results[key]["mean_confidence"] = test_set.mean_confidence(out / key / "last.pt")
    table = results_table(results)
    Console(stderr=True, width=max(console.width, 150)).print(table)  # readable in a log file too
    found = findings(results)
    for name, f in found.items():
        gap_before, gap_after = f["confidence_minus_acc"]
        console.print(f"{name}: accuracy {_signed(f['d_acc'])} ({'up' if f['acc_up'] else 'not up'}), "
                      f"ECE {_signed(f['d_ece'])} ({'down' if f['ece_down'] else 'not down'}); "
                      f"confidence - accuracy {_signed(gap_before)} -> {_signed(gap_after)}")
    payload = {
        "command": "python benchmarks/mislas_ablation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "dataset": "Fashion-MNIST-LT, imbalance ratio 100 (real IDX files), balanced 10,000-image test set",
        "metrics": "acc/many/medium/few: top-1 %; ece: 15-bin top-label ECE %; mean_confidence: mean top-1 "
                   "softmax probability % (above acc: over-confident, below: under-confident); nll: mean NLL",
        "host": {"python": platform.python_version(), "torch": torch.__version__,
                 "threads": torch.get_num_threads(), "machine": platform.machine()},
        "total_seconds": time.perf_counter() - started,
        "runs": results,
        "findings": found,
    }
    json_path = Path(args.json) if args.json else out / "results.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    console.print(f"saved {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
