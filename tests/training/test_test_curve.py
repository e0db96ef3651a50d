"""``train.eval_every``: the per-epoch test curve and its best epoch on the test set, labelled
optimistic, never the headline (the official logs' "Best Prec@1": ``is_best = acc1 > best_acc1``,
dvlab-research/MiSLAS ``train_stage1.py`` lines 248-252)."""

import json

from balpoe import recipe_from_dict, train
from balpoe.evaluate.curve import BEST_LABEL, summarize_test_curve
from balpoe.evaluate.run_report import report_sections, write_html_report


def test_best_epoch_is_the_first_maximum_and_last_is_last():
    rows = [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "test_acc": 40.0, "test_many": 60.0, "test_few": 5.0},
            {"epoch": 3, "test_acc": 55.5, "test_many": 70.0, "test_medium": 50.0, "test_few": 20.0, "test_ece": 9.0},
            {"epoch": 4, "test_acc": float("nan")}, {"epoch": 5, "test_acc": 55.5}, {"epoch": 6, "test_acc": 51.0}]
    c = summarize_test_curve(rows, every=1)
    assert (c["best_epoch"], c["best_acc"], c["last_epoch"], c["last_acc"]) == (3, 55.5, 6, 51.0)
    assert c["epochs"] == [2, 3, 5, 6] and c["acc"] == [40.0, 55.5, 55.5, 51.0]
    assert c["best"] == {"acc": 55.5, "many": 70.0, "medium": 50.0, "few": 20.0, "ece": 9.0}
    assert c["label"] == BEST_LABEL and "optimistic" in BEST_LABEL
    assert summarize_test_curve([{"epoch": 1, "loss": 1.0}]) is None


def _raw(cifar_root, every):
    return {"name": "curve", "seed": 1,
            "data": {"dataset": "cifar10", "root": str(cifar_root), "imb_factor": 10, "many_threshold": 30,
                     "few_threshold": 10},
            "model": {"backbone": "small_cnn", "num_experts": 2, "split": "layer1", "kwargs": {"widths": [8, 16, 16]}},
            "loss": {"tau": [0.5, 1.5]},
            "optim": {"lr": 0.05, "batch_size": 32, "epochs": 3, "warmup_epochs": 0, "schedule": "cosine"},
            "train": {"eval_every": every, "eval_batch_size": 64}}


def test_training_records_the_curve_and_keeps_the_last_epoch_as_headline(cifar_root, tmp_path):
    out = tmp_path / "run"
    report = train(recipe_from_dict(_raw(cifar_root, 1)), out, show_progress=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and all("test_acc" in r and "test_many" in r for r in rows)
    assert rows[-1]["test_acc"] == report["acc"]  # the final evaluation completes the curve
    curve = report["test_curve"]
    accs = [r["test_acc"] for r in rows]
    assert curve["best_acc"] == max(accs) and curve["best_epoch"] == accs.index(max(accs)) + 1
    assert curve["last_epoch"] == 3 and curve["last_acc"] == report["acc"]
    saved = json.loads((out / "eval.json").read_text())
    assert saved["acc"] == report["acc"] and saved["test_curve"]["best_epoch"] == curve["best_epoch"]
    sections = report_sections(out)
    assert sections["header"]["acc"] == report["acc"]  # the headline card: the last epoch
    assert sections["training"]["test_curve"]["best_epoch"] == curve["best_epoch"]
    html = write_html_report(out).read_text()
    assert "Best epoch on the test set (as the official logs report; optimistic)" in html


def test_no_curve_without_eval_every(cifar_root, tmp_path):
    out = tmp_path / "run"
    raw = _raw(cifar_root, 0)
    raw["optim"]["epochs"] = 1
    report = train(recipe_from_dict(raw), out, show_progress=False)
    assert "test_curve" not in report
    assert "test_acc" not in json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
