"""Model selection on validation data: best.pt by a validation metric, early stopping, the per-epoch
plain line and metrics.csv of batch jobs; the test set chooses nothing."""

from __future__ import annotations

import csv
import json

import pytest

from balpoe import recipe_from_dict, train
from balpoe.cli import main
from balpoe.errors import BalpoeError
from balpoe.runtime.checkpoint import load_checkpoint
from balpoe.training.trainer import epoch_line, metrics_csv


def _recipe(root, **train_keys) -> dict:
    return {
        "name": "val", "seed": 3,
        "data": {"dataset": "cifar10", "root": str(root), "imb_factor": 10, "many_threshold": 30,
                 "few_threshold": 10, "holdout_fraction": 0.2, "augment": {"crop_padding": 2, "rotation": 0}},
        "model": {"backbone": "small_cnn", "num_experts": 2, "split": "layer1", "kwargs": {"widths": [8, 16, 16]}},
        "loss": {"tau": [0.5, 1.5]},
        "optim": {"lr": 0.05, "batch_size": 32, "epochs": 4, "warmup_epochs": 0, "schedule": "cosine"},
        "train": {"mixup_alpha": 0.0, "checkpoint_every": 10, "eval_batch_size": 64, "val_every": 1, **train_keys},
    }


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_best_checkpoint_is_the_best_validation_epoch_and_eval_says_so(cifar_root, tmp_path, capsys):
    run = tmp_path / "run"
    train(recipe_from_dict(_recipe(cifar_root, select_metric="nll")), run, show_progress=False)
    rows = _rows(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and all("val_nll" in r and "test_acc" not in r for r in rows)
    best = min(rows, key=lambda r: r["val_nll"])
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt["epoch"] == best["epoch"] and ckpt["selection"]["value"] == best["val_nll"]
    assert ckpt["selection"]["metric"] == "val_nll"
    assert load_checkpoint(run / "last.pt")["epoch"] == 4
    # metrics.csv beside metrics.jsonl, the same rows
    with open(run / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in table] == [1, 2, 3, 4]
    assert [float(r["val_nll"]) for r in table] == pytest.approx([r["val_nll"] for r in rows])
    # not a terminal (pytest captures): one plain line per epoch, no progress bar
    err = capsys.readouterr().err
    assert err.count("epoch 1/4  loss ") == 1 and "val_balanced_acc" in err and "ETA" in err
    assert f"best.pt: epoch {best['epoch']}, val_nll" in err
    # balpoe eval says which checkpoint it scores and keeps last.pt's eval.json
    assert main(["eval", str(run / "best.pt"), "--no-report"]) == 0
    err = capsys.readouterr().err
    assert f"evaluating {run / 'best.pt'}: epoch {best['epoch']} of 4, the best by val_nll" in err
    assert json.loads((run / "eval_best.json").read_text())["epoch"] == best["epoch"]
    assert json.loads((run / "eval.json").read_text()).get("epoch") is None   # the training's own, untouched


def test_early_stopping_stops_after_patience_validations_without_improvement(cifar_root, tmp_path):
    run = tmp_path / "run"
    recipe = _recipe(cifar_root, early_stop_patience=1, val_every=1)
    recipe["optim"].update(epochs=12, lr=0.3)
    train(recipe_from_dict(recipe), run, show_progress=False)
    rows = _rows(run)
    accs = [r["val_balanced_acc"] for r in rows]
    # the first validation that is not better than every earlier one stops the run
    stop = next((i for i in range(1, len(accs)) if accs[i] <= max(accs[:i])), None)
    assert stop is not None, accs  # 12 epochs at lr 0.3 on 400 images never improve at every epoch
    assert len(rows) == stop + 1
    last, best = load_checkpoint(run / "last.pt"), load_checkpoint(run / "best.pt")
    assert last["epoch"] == stop + 1 and last["selection"]["stopped"] is True
    assert best["epoch"] == 1 + max(range(stop + 1), key=lambda i: (accs[i], -i))


def test_validation_needs_a_validation_split(cifar_root, tmp_path):
    recipe = _recipe(cifar_root)
    recipe["data"]["holdout_fraction"] = 0.0
    with pytest.raises(BalpoeError, match="^recipe key 'train.val_every' needs a validation split"):
        train(recipe_from_dict(recipe), tmp_path / "run", show_progress=False)
    with pytest.raises(BalpoeError, match="^recipe key 'train.early_stop_patience' needs train.val_every > 0"):
        recipe_from_dict({"train": {"early_stop_patience": 2}})


def test_epoch_line_and_csv_are_plain():
    row = {"epoch": 3, "loss": 1.23456, "lr": 0.05, "img_per_s": 1234.5, "epoch_time_s": 1.0,
           "val_balanced_acc": 81.234, "val_nll": 0.61234}
    assert epoch_line(row, 12, 125) == ("epoch 3/12  loss 1.2346  lr 0.05  1,234 img/s  ETA 2m05s  "
                                        "val_balanced_acc 81.23  val_nll 0.6123")
    assert metrics_csv([{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.0, "val_nll": 0.5}]) == \
        "epoch,loss,val_nll\n1,2.0,\n2,1.0,0.5\n"


def test_selection_files_count_as_run_files_of_the_output_folder(tmp_path):
    """eval_best.json is a result (never replaced by a new run); metrics.csv is written before the
    first checkpoint, like metrics.jsonl (a new start needs resume 'auto')."""
    from balpoe.errors import UnfinishedRun
    from balpoe.training.build import check_output_dir
    results, partial = tmp_path / "results", tmp_path / "partial"
    results.mkdir(), partial.mkdir()
    (results / "eval_best.json").write_text("{}")
    (partial / "metrics.csv").write_text("epoch,loss\n1,0.5\n")
    with pytest.raises(BalpoeError, match=r"holds results \(eval_best.json\) but no last.pt"):
        check_output_dir(results, "auto")
    with pytest.raises(UnfinishedRun, match="metrics.csv"):
        check_output_dir(partial, False)
    assert check_output_dir(partial, "auto") is None
