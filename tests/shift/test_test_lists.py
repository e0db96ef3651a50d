"""Published test-distribution list files (``path label`` lines naming a subset of the test split) as
target sets: matched to the test images by path, evaluated from the logits computed once."""

from __future__ import annotations

import json
import random

import pytest
import torch
from formats import write_image_list

from balpoe import recipe_from_dict, train
from balpoe.cli import main
from balpoe.data.bundle import ImageArrays
from balpoe.errors import BalpoeError
from balpoe.evaluate import logits as logits_module
from balpoe.shift.build import ShiftOptions, evaluate_shift
from balpoe.shift.distributions import protocol_subset_indices
from balpoe.shift.targets import list_target_sets

METRICS = ("n", "acc", "many", "medium", "few", "ece", "mce", "nll", "brier")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 1-epoch BalPoE checkpoint on a tiny ImageNet-LT-format dataset, and its test list lines."""
    tmp = tmp_path_factory.mktemp("lists")
    root = write_image_list(tmp / "data", "imagenet_lt", 4, [12, 8, 5, 3], 6, size=16)
    recipe = recipe_from_dict({
        "name": "lists", "data": {"dataset": "imagenet_lt", "root": str(root), "image_size": 16, "num_workers": 0,
                                  "many_threshold": 10, "few_threshold": 4},
        "model": {"backbone": "resnet20_cifar", "num_experts": 2, "split": "head", "head": "linear"},
        "loss": {"tau": [0.5, 1.5]},
        "optim": {"epochs": 1, "warmup_epochs": 0, "batch_size": 8, "schedule": "constant", "lr": 0.05},
        "train": {"mixup_alpha": 0.0, "eval_batch_size": 7}})
    train(recipe, tmp / "run", show_progress=False, report=False)
    lines = (root / "ImageNet_LT_test.txt").read_text().splitlines()
    return tmp, tmp / "run" / "last.pt", lines


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_list_of_a_protocol_subset_scores_exactly_as_the_generated_subset(run, monkeypatch):
    tmp, ckpt, lines = run
    labels = torch.tensor([int(x.rsplit(" ", 1)[1]) for x in lines])
    idx = protocol_subset_indices(labels, [12, 8, 5, 3], "backward5")
    official = _write(tmp / "ImageNet_LT_backward5.txt", [lines[i] for i in idx.tolist()])
    shuffled = [lines[i] for i in idx.tolist()]
    random.Random(0).shuffle(shuffled)
    _write(tmp / "shuffled.txt", shuffled)
    calls = []
    real = logits_module.collect_logits   # the test forward pass of evaluate_shift (cached_logits)
    monkeypatch.setattr(logits_module, "collect_logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    for adapt in ("none", "known"):
        rep = evaluate_shift(ckpt, ShiftOptions(test_dists="backward5", test_lists=[official, tmp / "shuffled.txt"],
                                          adapt=adapt), out=tmp / f"out_{adapt}", plots=False, quiet=True, device="cpu")
        rows = rep["distributions"]
        assert list(rows) == ["backward5", "ImageNet_LT_backward5", "shuffled"]
        for k in METRICS:
            assert rows["ImageNet_LT_backward5"][k] == rows["backward5"][k], k
            assert rows["shuffled"][k] == pytest.approx(rows["backward5"][k], rel=1e-9, abs=1e-12), k
        assert rep["n_test"] == 24 and rep["test_lists"]["ImageNet_LT_backward5"] == {"file": str(official),
                                                                                      "n": len(idx)}
    assert len(calls) == 2  # the test logits once per evaluation, whatever the number of target sets
    md = (tmp / "out_known" / "shift_eval.md").read_text()
    assert "ImageNet_LT_backward5" in md and str(official) in md


def test_list_errors_are_one_line_naming_the_first_bad_image(run):
    tmp, ckpt, lines = run
    train_line = (tmp / "data" / "ImageNet_LT_train.txt").read_text().splitlines()[5]
    _write(tmp / "outside.txt", lines[:3] + [train_line] + lines[3:4])
    with pytest.raises(BalpoeError) as e:
        evaluate_shift(ckpt, ShiftOptions(test_lists=[tmp / "outside.txt"]), out=tmp / "o1", plots=False, quiet=True,
                       device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and train_line.rsplit(" ", 1)[0] in msg and "line 4" in msg and "not in the test set" in msg
    path, label = lines[0].rsplit(" ", 1)
    _write(tmp / "relabelled.txt", [f"{path} {(int(label) + 1) % 4}"])
    with pytest.raises(BalpoeError, match="has label .* the test split says"):
        evaluate_shift(ckpt, ShiftOptions(test_lists=[tmp / "relabelled.txt"]), out=tmp / "o2", plots=False, quiet=True,
                       device="cpu")
    _write(tmp / "forward5.txt", lines[:4])
    with pytest.raises(BalpoeError, match="named 'forward5'"):
        evaluate_shift(ckpt, ShiftOptions(test_dists="forward5", test_lists=[tmp / "forward5.txt"]), out=tmp / "o3",
                       plots=False, quiet=True, device="cpu")
    with pytest.raises(BalpoeError, match="image list file not found"):
        evaluate_shift(ckpt, ShiftOptions(test_lists=[tmp / "missing.txt"]), out=tmp / "o4", plots=False, quiet=True,
                       device="cpu")
    arrays = ImageArrays(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]))
    with pytest.raises(BalpoeError, match="held in memory"):
        list_target_sets(arrays, [tmp / "forward5.txt"])


def test_recipe_test_lists_and_the_cli_flag(run):
    tmp, ckpt, lines = run
    _write(tmp / "data" / "head_only.txt", [x for x in lines if x.endswith(" 0")])
    out = tmp / "recipe_lists"
    rep = evaluate_shift(ckpt, overrides=["data.test_lists=[head_only.txt]"], out=out, plots=False, quiet=True,
                         device="cpu")   # found under data.root; the only target set when nothing else is asked
    assert list(rep["distributions"]) == ["head_only"] and rep["distributions"]["head_only"]["n"] == 6
    _write(tmp / "two.txt", lines[:2])
    cli_out = tmp / "cli"
    assert main(["eval", str(ckpt), "--test-list", str(tmp / "two.txt"), "--test-list", str(tmp / "ImageNet_LT_"
                 "backward5.txt"), "--device", "cpu", "--out", str(cli_out), "--no-plots"]) == 0
    report = json.loads((cli_out / "shift_eval.json").read_text())
    assert list(report["distributions"]) == ["two", "ImageNet_LT_backward5"]
    assert report["class_names"] == ["0", "1", "2", "3"]
