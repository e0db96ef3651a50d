"""End to end on tiny files in the real formats: train -> checkpoint -> resume -> eval."""

import json
import subprocess
import sys

import pytest
import yaml
from formats import write_fashion_mnist

from balpoe import evaluate_checkpoint, load_recipe, recipe_from_dict, train
from balpoe.cli import main
from balpoe.evaluate.build import ensemble_prior
from balpoe.runtime.checkpoint import load_checkpoint
from balpoe.errors import BalpoeError


def _cifar_recipe(root, **optim):
    return {
        "name": "tiny", "seed": 3,
        "data": {"dataset": "cifar10", "root": str(root), "imb_factor": 10, "many_threshold": 30,
                 "few_threshold": 10},
        "model": {"backbone": "resnet20_cifar", "num_experts": 2, "split": "layer2", "head": "cosine"},
        "loss": {"tau": [0.5, 1.5]},
        "optim": {"lr": 0.05, "batch_size": 32, "epochs": 2, "warmup_epochs": 0, "milestones": [1],
                  **optim},
        "train": {"mixup_alpha": 0.4, "checkpoint_every": 1, "eval_batch_size": 64},
    }


def test_train_resume_and_eval_from_the_checkpoint(cifar_root, tmp_path):
    """A run stopped after epoch 1 and resumed to 2 epochs: one metrics row per epoch, the resolved
    recipe saved, the LT counts, and ``balpoe eval`` reproducing the training-time evaluation.  (That
    a resumed run is bit-identical to an uninterrupted one, also after ``kill -9``, is
    tests/training/test_resume_and_faults.py's.)"""
    full = recipe_from_dict(_cifar_recipe(cifar_root))
    first = recipe_from_dict(_cifar_recipe(cifar_root, epochs=1))
    train(first, tmp_path / "run", show_progress=False, report=False)
    with pytest.warns(UserWarning, match="changed recipe keys: optim.epochs 1 -> 2"):
        report = train(full, tmp_path / "run", resume=True, show_progress=False, report=False)
    a = load_checkpoint(tmp_path / "run" / "last.pt")
    assert a["epoch"] == 2
    # metrics.jsonl: one line per epoch; the resumed run appended epoch 2 after epoch 1.
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]
    assert set(lines[0]) >= {"loss", "lr", "img_per_s", "epoch_time_s"}
    # The saved recipe is the resolved one (the recipe in effect) and reloads to the same Recipe.
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert recipe_from_dict(saved) == full
    # Final report: LT counts for CIFAR-10 IR10 with 40 images/class, balanced test set of 80 images.
    assert a["class_counts"] == [int(40 * 0.1 ** (i / 9)) for i in range(10)]
    assert report["n"] == 80 and 0 <= report["acc"] <= 100 and len(report["expert_acc"]) == 2
    # balpoe eval reproduces the training-time evaluation from the checkpoint alone.
    again = evaluate_checkpoint(tmp_path / "run" / "last.pt", device="cpu", out=tmp_path / "e.json", report=False)
    for key in ("acc", "many", "medium", "few", "ece", "nll"):
        assert again[key] == pytest.approx(report[key], abs=1e-6), key
    assert json.loads((tmp_path / "e.json").read_text())["acc"] == pytest.approx(report["acc"])


def test_existing_run_is_never_overwritten(cifar_root, tmp_path):
    r = recipe_from_dict(_cifar_recipe(cifar_root, epochs=1))
    train(r, tmp_path / "run", show_progress=False, report=False)
    before = (tmp_path / "run" / "last.pt").read_bytes()
    with pytest.raises(BalpoeError, match="already holds a run"):
        train(r, tmp_path / "run", show_progress=False, report=False)
    assert (tmp_path / "run" / "last.pt").read_bytes() == before
    with pytest.raises(BalpoeError, match="no checkpoint to resume"):
        train(r, tmp_path / "empty", resume=True, show_progress=False, report=False)


def test_cli_trains_fashion_mnist_idx_and_evaluates(tmp_path, capsys):
    root = write_fashion_mnist(tmp_path / "fm", 30, 10, seed=1)
    recipe = tmp_path / "fm.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "fm", "data": {"dataset": "fashion_mnist", "root": str(root), "imb_factor": 10,
                               "augment": {"crop_padding": 2, "rotation": 15}},
        "model": {"backbone": "small_cnn", "num_experts": 3, "split": "layer1", "kwargs": {"widths": [8, 16, 16]}},
        "optim": {"epochs": 2, "warmup_epochs": 1, "batch_size": 16, "schedule": "cosine"},
        "train": {"mixup_alpha": 0.4}}))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "balpoe.cli"]
    res = subprocess.run(cmd + ["train", str(recipe), "--out", str(out), "--set", "loss.tau=[0, 1, 2]"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "balanced test set" in res.stderr and "img/s" in res.stderr
    ckpt = load_checkpoint(out / "last.pt")
    assert ensemble_prior(recipe_from_dict(ckpt["recipe"]))[0] == [0.0, 1.0, 2.0] and ckpt["in_chans"] == 1
    assert "taus" not in ckpt   # the recipe is the one source of the taus
    assert load_recipe(out / "recipe.yaml").loss.tau == [0.0, 1.0, 2.0]
    res = subprocess.run(cmd + ["eval", str(out / "last.pt"), "--device", "cpu"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "eval.json").read_text())
    assert report["n"] == 100 and report["epoch"] == 2 and set(report) >= {"acc", "many", "few", "ece", "nll"}
    # A second train into the same directory without --resume is refused with exit code 2.
    assert main(["train", str(recipe), "--out", str(out)]) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
