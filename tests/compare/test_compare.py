"""``balpoe compare``: the summary's arithmetic against closed forms, pooled reliability against the
reliability of the pooled logits, and the command end to end on tiny CIFAR files (two recipes x two
seeds, one run interrupted and continued, the others reused)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import balpoe.evaluate.logits as logits_module
import balpoe.training.trainer as trainer_module
from balpoe.compare.build import CompareOptions, compare
from balpoe.compare.page import pooled_reliability
from balpoe.compare.table import balanced_accuracy, mean_std, paired_difference, run_metrics, summarise
from balpoe.errors import BalpoeError
from balpoe.evaluate.reliability import reliability_data
from balpoe.runtime.checkpoint import load_checkpoint


def test_mean_std_and_paired_difference_are_the_closed_forms():
    assert mean_std([1.0, 2.0, 4.0]) == {"mean": pytest.approx(7 / 3), "std": pytest.approx(math.sqrt(7 / 3)),
                                         "n": 3}
    assert mean_std([3.0, None]) == {"mean": 3.0, "std": None, "n": 1}
    a, b = {1: 70.0, 2: 72.0, 3: 75.0, 4: 1.0}, {1: 68.0, 2: 71.0, 3: 70.0}
    d = np.array([2.0, 1.0, 5.0])            # seed 4 has no pair
    got = paired_difference(a, b)
    assert got["n"] == 3
    assert got["diff"] == pytest.approx(d.mean())
    assert got["se"] == pytest.approx(d.std(ddof=1) / math.sqrt(3))
    assert paired_difference({1: 2.0}, {1: 1.0}) == {"diff": 1.0, "se": None, "n": 1}


def test_summary_pairs_by_seed_and_leaves_the_baseline_out():
    runs = {"base": {1: {"bal_acc": 50.0}, 2: {"bal_acc": 60.0}},
            "new": {1: {"bal_acc": 53.0}, 2: {"bal_acc": 61.0}}}
    s = summarise(runs, ["bal_acc"], baseline="base")
    assert s["summary"]["new"]["bal_acc"]["mean"] == pytest.approx(57.0)
    assert s["summary"]["new"]["bal_acc"]["values"] == {"1": 53.0, "2": 61.0}
    assert list(s["paired"]) == ["new"]
    # unpaired, the std of each (5.66) hides the gain; paired, it is 2 +- 1
    assert s["paired"]["new"]["bal_acc"] == {"diff": pytest.approx(2.0), "se": pytest.approx(1.0), "n": 2}
    assert summarise(runs, ["bal_acc"], baseline=None)["paired"] == {}


def test_run_metrics_reads_eval_and_shift_results():
    evaluation = {"acc": 99.0, "many": 80.0, "medium": 60.0, "few": 40.0, "ece": 5.0, "nll": 0.5,
                  "analysis": {"per_class_acc": {"ensemble": [100.0, 50.0, None]}}}
    shift = {"none": {"distributions": {"forward5": {"acc": 70.0}, "uniform": {"acc": 60.0}}},
             "known": {"distributions": {"forward5": {"acc": 80.0}, "uniform": {"acc": None}}}}
    row = run_metrics(evaluation, shift)
    assert row == {"bal_acc": 75.0, "many": 80.0, "medium": 60.0, "few": 40.0, "ece": 5.0, "nll": 0.5,
                   "shift_none": 65.0, "shift_known": 80.0}
    assert balanced_accuracy([None, None]) is None


def test_pooled_reliability_is_the_reliability_of_the_pooled_logits():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(300, 5, generator=g) * 2, torch.randn(200, 5, generator=g) * 3
    y1, y2 = torch.randint(0, 5, (300,), generator=g), torch.randint(0, 5, (200,), generator=g)
    parts = [reliability_data(z, y).__dict__ for z, y in ((z1, y1), (z2, y2))]
    whole = reliability_data(torch.cat([z1, z2]), torch.cat([y1, y2]))
    pooled = pooled_reliability(parts)
    assert pooled["count"] == list(whole.count)
    for got, want in ((pooled["accuracy"], whole.accuracy), (pooled["confidence"], whole.confidence)):
        assert [g is None for g in got] == [w is None for w in want]
        assert [g for g in got if g is not None] == pytest.approx([w for w in want if w is not None])
    assert pooled["ece"] == pytest.approx(whole.ece)
    assert pooled["mce"] == pytest.approx(whole.mce)


@pytest.mark.parametrize("kwargs, message", [
    ({"seeds": [1, 1]}, "compare: seed 1 given twice"),
    ({"seeds": []}, "compare: give at least one seed"),
    ({"adapt": ["none", "sideways"]}, "sideways"),
    ({"test_dists": "sideways50"}, "sideways50"),
])
def test_options_are_checked_when_made(kwargs, message):
    with pytest.raises(BalpoeError, match=message):
        CompareOptions(**kwargs)


def _recipe(root: Path, name: str, taus: list[float]) -> dict:
    return {
        "name": name, "seed": 0,
        "data": {"dataset": "cifar10", "root": str(root), "imb_factor": 10, "many_threshold": 30,
                 "few_threshold": 10, "augment": {"crop_padding": 2}},
        "model": {"backbone": "small_cnn", "num_experts": len(taus), "split": "layer1",
                  "kwargs": {"widths": [8, 16, 16]}},
        "loss": {"tau": taus},
        "optim": {"lr": 0.05, "batch_size": 32, "epochs": 2, "warmup_epochs": 0, "schedule": "cosine"},
        "train": {"mixup_alpha": 0.0, "checkpoint_every": 1, "eval_batch_size": 64, "threads": 1},
    }


def _write(path: Path, recipe: dict) -> str:
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


@pytest.fixture
def two_recipes(cifar_root, tmp_path):
    return [_write(tmp_path / "ce.yaml", _recipe(cifar_root, "ce_like", [0.0])),
            _write(tmp_path / "poe.yaml", _recipe(cifar_root, "poe", [0.0, 2.0]))]


def test_compare_end_to_end_interrupted_and_continued(two_recipes, tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    options = CompareOptions(seeds=[3, 4], test_dists="forward10,uniform,backward10", adapt=["none", "known"],
                             baseline="ce_like", device="cpu")
    real_epoch, calls = trainer_module.train_one_epoch, []

    def interrupted(*args, **kwargs):   # the 6th epoch: run 3 of 4 (poe, seed 3), its second epoch
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)
    monkeypatch.setattr(trainer_module, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compare(two_recipes, options, out, show_progress=False)
    partial = json.loads((out / "compare.json").read_text())
    assert partial["complete"] is False
    assert list(partial["runs"]["ce_like"]) == ["3", "4"] and partial["runs"]["poe"] == {}
    assert "Incomplete" in (out / "compare.md").read_text()
    cut = out / "runs" / "poe" / "seed3"
    assert load_checkpoint(cut / "last.pt")["epoch"] == 1 and not (cut / "eval.json").exists()
    kept = {s: (out / "runs" / "ce_like" / f"seed{s}" / "last.pt").stat().st_mtime_ns for s in (3, 4)}

    monkeypatch.setattr(trainer_module, "train_one_epoch", real_epoch)
    forward_passes = []
    real_collect = logits_module.collect_logits
    monkeypatch.setattr(logits_module, "collect_logits", lambda *a, **k: forward_passes.append(1) or real_collect(*a, **k))
    result = compare(two_recipes, options, out, show_progress=False)

    assert result["complete"] is True
    # the finished runs were reused, the interrupted one continued from its epoch-1 checkpoint
    assert {s: (out / "runs" / "ce_like" / f"seed{s}" / "last.pt").stat().st_mtime_ns for s in (3, 4)} == kept
    resumed = load_checkpoint(cut / "last.pt")
    assert resumed["epoch"] == 2 and [r["epoch"] for r in resumed["resumed"]] == [1]
    assert [json.loads(x)["epoch"] for x in (cut / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # test logits: one forward pass per run evaluated now (poe's two), shared by both modes
    assert len(forward_passes) == 2
    assert all((out / "runs" / n / f"seed{s}" / "test_logits.safetensors").is_file()
               for n in ("ce_like", "poe") for s in (3, 4))
    # every number of the table is the runs' own files, summarised
    metrics = {}
    for name in ("ce_like", "poe"):
        for s in (3, 4):
            run = out / "runs" / name / f"seed{s}"
            ev = json.loads((run / "eval.json").read_text())
            assert load_checkpoint(run / "last.pt")["recipe"]["seed"] == s
            shift = {m: json.loads((run / "shift" / m / "shift_eval.json").read_text()) for m in ("none", "known")}
            assert list(shift["none"]["distributions"]) == ["forward10", "uniform", "backward10"]
            m = result["runs"][name][str(s)]["metrics"]
            assert m["bal_acc"] == pytest.approx(np.nanmean([np.nan if v is None else v for v in
                                                             ev["analysis"]["per_class_acc"]["ensemble"]]))
            assert m["ece"] == pytest.approx(ev["ece"])
            assert m["shift_known"] == pytest.approx(np.mean([r["acc"] for r in shift["known"]["distributions"].values()]))
            metrics[name, s] = m
    d = np.array([metrics["poe", s]["nll"] - metrics["ce_like", s]["nll"] for s in (3, 4)])
    assert result["paired"]["poe"]["nll"]["diff"] == pytest.approx(d.mean())
    assert result["paired"]["poe"]["nll"]["se"] == pytest.approx(d.std(ddof=1) / math.sqrt(2))
    saved = json.loads((out / "compare.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(result["summary"]))
    assert set(saved["figures"]) == {"curves", "per_class", "reliability"}
    page = (out / "compare.html").read_text()
    assert page.count("<img ") == 3 and "<script" not in page
    md = (out / "compare.md").read_text()
    assert "| poe | 2 |" in md and "Paired difference against ce_like" in md

    # other distributions: evaluated again from the cached logits, averaged over those asked for only
    only = compare(two_recipes, CompareOptions(seeds=[3, 4], test_dists="uniform", adapt=["none"], device="cpu"),
                   out, show_progress=False)
    for name in ("ce_like", "poe"):
        for s in (3, 4):
            rows = json.loads((out / "runs" / name / f"seed{s}" / "shift" / "none" / "shift_eval.json").read_text())
            assert list(rows["distributions"]) == ["uniform"]
            assert only["runs"][name][str(s)]["metrics"]["shift_none"] == rows["distributions"]["uniform"]["acc"]

    # a finished run is never silently reused for another recipe
    changed = _recipe(Path(yaml.safe_load(Path(two_recipes[1]).read_text())["data"]["root"]), "poe", [0.0, 2.0])
    changed["optim"]["lr"] = 0.01
    with pytest.raises(BalpoeError, match=r"holds a finished run with recipe key 'optim.lr' 0.05, not 0.01"):
        compare([two_recipes[0], _write(tmp_path / "poe2.yaml", changed)], options, out, show_progress=False)


def test_cli_names_a_bad_baseline_and_a_repeated_name_in_one_line(two_recipes, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "balpoe", "compare", *args, "--out", str(tmp_path / "o")],
                              capture_output=True, text=True)
    bad = run(*two_recipes, "--baseline", "nope")
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: compare: the baseline 'nope' is not a recipe of the comparison (names: ce_like, poe)"
    twice = run(two_recipes[0], two_recipes[0])
    assert twice.returncode == 2 and twice.stderr.count("\n") == 1
    assert "are both named 'ce_like'" in twice.stderr
    assert not (tmp_path / "o").exists()


def test_compare_on_an_image_folder_skips_only_what_needs_images_in_memory(tmp_path):
    """A user's own image folder compares like the built-in data; SADE's aggregation, which needs the
    test images in memory, is skipped for such runs with one warning each, not a failed comparison."""
    from PIL import Image
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for name, n in {"cat": 12, "dog": 6}.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    files = []
    for name, taus in (("one", [1.0]), ("two", [0.0, 2.0])):
        files.append(_write(tmp_path / f"{name}.yaml", {
            "name": name, "seed": 0,
            "data": {"dataset": "image_folder", "train_root": str(root), "test_fraction": 0.34, "num_workers": 0,
                     "image_size": 8, "in_memory": False, "many_threshold": 6, "few_threshold": 2},
            "model": {"backbone": "small_cnn", "num_experts": len(taus), "split": "layer1",
                      "kwargs": {"widths": [4, 8, 8]}},
            "loss": {"tau": taus}, "optim": {"lr": 0.05, "batch_size": 4, "epochs": 1, "warmup_epochs": 0},
            "train": {"eval_batch_size": 4, "threads": 1}}))
    options = CompareOptions(seeds=[0], test_dists="forward2,uniform", adapt=["none", "sade"], device="cpu")
    with pytest.warns(UserWarning, match=r"adaptation mode 'sade' skipped: adaptation mode 'sade' needs an "
                                         r"in-memory dataset") as caught:
        result = compare(files, options, tmp_path / "cmp", show_progress=False)
    assert sum("skipped" in str(w.message) for w in caught) == 1          # the one-expert run does not try
    assert result["complete"] is True
    for name in ("one", "two"):
        m = result["runs"][name]["0"]["metrics"]
        assert m["shift_sade"] is None and m["shift_none"] is not None and m["bal_acc"] is not None
    assert "| two | 1 |" in (tmp_path / "cmp" / "compare.md").read_text()


def test_a_diverged_run_is_recorded_and_the_comparison_goes_on(two_recipes, tmp_path, monkeypatch):
    import balpoe.compare.build as compare_build
    from balpoe.training.trainer import Diverged

    def diverge(recipe, folder, **kwargs):
        raise Diverged(0, 3)
    monkeypatch.setattr(compare_build, "train", diverge)
    out = tmp_path / "cmp"
    with pytest.warns(UserWarning, match=r"ce_like, seed 1: training diverged: non-finite loss in epoch 1 by step 3"):
        result = compare(two_recipes[:1], CompareOptions(seeds=[1], device="cpu"), out, show_progress=False)
    assert result["complete"] is True
    assert result["failed"] == {"ce_like": {"1": "training diverged: non-finite loss in epoch 1 by step 3"}}
    assert result["summary"]["ce_like"]["bal_acc"] == {"mean": None, "std": None, "n": 0, "values": {"1": None}}
    assert "Failed: ce_like, seed 1: training diverged" in (out / "compare.md").read_text()
