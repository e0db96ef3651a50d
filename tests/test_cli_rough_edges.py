"""Small command-line promises: --version, --print-recipe, eval --help, 80-column result tables,
the recipe reference being up to date, the empty-group hint, weights file permissions."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console

import balpoe
from balpoe.cli import main
from balpoe.data.lt import empty_group_hint
from balpoe.evaluate.report import REPORT_COLUMNS
from balpoe.recipe import load_recipe, reference_markdown
from balpoe.runtime.checkpoint import load_safetensors, save_safetensors
from balpoe.runtime.console import metrics_table
from balpoe.shift.render import print_shift_report

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "balpoe" / "fashion_mnist_lt_ir100_cpu_demo.yaml"


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"balpoe {balpoe.__version__}\n"


def test_print_recipe_prints_the_resolved_recipe_and_exits(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(DEMO), "--set", "optim.lr=0.05", "--print-recipe"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == load_recipe(DEMO, ["optim.lr=0.05"]).to_dict() and printed["optim"]["lr"] == 0.05
    assert not (tmp_path / "runs").exists()


def test_eval_help_documents_every_argument():
    out = subprocess.run([sys.executable, "-m", "balpoe", "eval", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for words in ("checkpoint to evaluate", "best.pt", "--device DEVICE", "cuda:N", "--batch-size BATCH_SIZE",
                  "train.eval_batch_size"):
        assert words in " ".join(out.split()), words


def test_result_table_fits_80_columns():
    report = {"n": 10000, "acc": 78.94, "many": 84.97, "medium": 63.1, "few": 86.73, "ece": 8.69, "mce": 20.12,
              "nll": 0.6543, "brier": 0.3123}
    console = Console(width=80, record=True, file=open(os.devnull, "w"))
    console.print(metrics_table("a long run name (epoch 12): balanced test set", {"ensemble": report}, REPORT_COLUMNS))
    text = console.export_text()
    assert "…" not in text and max(map(len, text.splitlines())) <= 80
    assert "ensemble" in text and "medium" in text and "0.6543" in text and "10000" in text


@pytest.mark.parametrize("adapt", ["none", "unlabelled"])
def test_label_shift_table_fits_80_columns(adapt):
    row = {"n": 10000, "acc": 78.94, "many": 84.97, "medium": 63.1, "few": 86.73, "ece": 8.69, "nll": 0.6543}
    if adapt != "none":
        row.update(acc_before=75.11, ece_before=10.25, tau=1.234, tau_star=1.301, temperature=1.118)
    names = ["forward50", "forward25", "uniform", "backward25", "backward50"]
    report = {"recipe": "balpoe_fashion_mnist_lt_ir100_cpu_demo", "epoch": 12, "adapt": adapt,
              "distributions": {n: dict(row) for n in names}, "calibration": "bcts", "estimator": "1d",
              "source": {"n": 1000, "note": "held-out slice", "kind": "holdout"}, "n_test": 10000,
              "forward_seconds": 1.0, "derive_seconds": 0.1, "logit_prior_exponent": 0.0}
    console = Console(width=80, record=True, file=open(os.devnull, "w"))
    print_shift_report(report, console)
    table = console.export_text().split("acc0 /")[0]
    assert "…" not in table and max(map(len, table.splitlines())) <= 80
    assert "backward50" in table and "78.94" in table and ("1.301" in table) == (adapt != "none")


def test_recipe_reference_is_up_to_date():
    doc = (ROOT / "docs" / "recipe.md").read_text()
    assert doc == reference_markdown(), ("docs/recipe.md is stale: regenerate it with python -c \"from balpoe.recipe "
                                         "import reference_markdown as r; print(r(), end='')\" > docs/recipe.md")
    assert "| `data.augment.crop_scale` |" in doc and "| `train.val_every` |" in doc


def test_empty_group_hint_names_the_keys():
    assert empty_group_hint([500, 120, 50, 30], 100, 20) == (
        "hint: the few group is empty with data.many_threshold 100 and data.few_threshold 20 (many: > "
        "many_threshold training images, few: < few_threshold; the classes have 30..500); set data.many_threshold / "
        "data.few_threshold for this dataset (e.g. --set data.many_threshold=N)")
    assert empty_group_hint([6000, 600], 100, 20).startswith("hint: the medium and few groups are empty")
    assert empty_group_hint([500, 50, 5], 100, 20) is None


def test_safetensors_weights_get_the_permissions_of_other_outputs(tmp_path):
    import torch
    ckpt = {"model": {"w": torch.ones(2)}, "recipe": {}, "num_classes": 2, "in_chans": 1}
    old = os.umask(0o022)
    try:
        path = save_safetensors(ckpt, tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert torch.equal(load_safetensors(path)["model"]["w"], torch.ones(2))


def test_auto_threads_leaves_the_busy_cores_alone():
    from balpoe.runtime.device import auto_threads
    assert auto_threads(default=2, cores=2, load=0.2) == (2, "")
    n, why = auto_threads(default=2, cores=2, load=1.1)
    assert n == 1 and why == ("threads: 1 of 2 (the 1-minute load average is 1.1 on 2 cores: other processes keep "
                              "the rest busy; train.threads sets the count)")
    assert auto_threads(default=2, cores=2, load=7.0)[0] == 1          # never fewer than one
    assert auto_threads(default=8, cores=16, load=9.0) == (7, auto_threads(default=8, cores=16, load=9.0)[1])
    assert auto_threads(default=8, cores=16, load=3.0) == (8, "")      # torch's default is the most
