"""``balpoe eval CKPT --test-dists ... --adapt sade``: SADE's test-time aggregation per target set.

The weights are learnt on each target set's images (the model runs again); the set is then scored
on its cached per-expert logits, weighted (``aggregate_logits``), exactly as the other modes are
scored.  Every other mode works on the logits computed once.
"""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from balpoe.cli import main
from balpoe.data.build import build_loader
from balpoe.errors import BalpoeError
from balpoe.evaluate.build import load_for_eval
from balpoe.evaluate.logits import collect_logits
from balpoe.evaluate.metrics import classification_report
from balpoe.models.multi_expert import MultiExpertNet
from balpoe.shift.aggregation import aggregate_logits
from balpoe.shift.build import ShiftOptions, evaluate_shift, sade_settings
from balpoe.shift.distributions import TEST_DISTRIBUTIONS
from balpoe.shift.targets import target_sets


def _cached(ckpt):
    model, recipe, _, bundle, dev = load_for_eval(ckpt, "cpu")
    logits, labels = collect_logits(model, build_loader(bundle, "test", 64, recipe.data, train=False), dev)
    return logits, labels, bundle.class_counts


def test_cli_sade_on_every_protocol_distribution(balpoe_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["eval", str(balpoe_ckpt), "--device", "cpu", "--test-dists", "all", "--adapt", "sade",
               "--sade-epochs", "2", "--out", str(out)])
    assert rc == 0
    err = capsys.readouterr().err
    assert "adapt = sade" in err and "backward50" in err and "weights" in err
    report = json.loads((out / "shift_eval.json").read_text())
    assert report["adapt"] == "sade" and list(report["distributions"]) == list(TEST_DISTRIBUTIONS)
    # no official SADE config for Fashion-MNIST: CIFAR-100-LT's SGD; views: the recipe's pad-crop 2 and flip
    assert report["sade"] == {"epochs": 2, "batch_size": 128, "lr": 0.1, "weight_decay": 5e-4, "padding": 2,
                              "flip": True, "momentum": 0.9, "nesterov": True, "min_weight": 0.05,
                              "sgd_config": "official cifar100 (no official config for fashion_mnist)"}
    logits, labels, counts = _cached(balpoe_ckpt)
    targets = target_sets(labels, counts, list(TEST_DISTRIBUTIONS), {})
    for name, row in report["distributions"].items():
        w = torch.tensor(row["weights"], dtype=torch.float32)
        assert w.shape == (3,) and bool((w > 0).all()) and math.isclose(float(w.sum()), 1.0, abs_tol=1e-6)
        assert 1 <= len(row["objective"]) == row["epochs"] <= 2
        assert all(-1 <= o <= 1 + 1e-6 for o in row["objective"])
        # scored as every mode: the metrics of the weighted expert logits of the set's images
        idx = targets[name].indices
        expected = classification_report(aggregate_logits(logits[:, idx], w), labels[idx], counts, 30, 10)
        for key in ("n", "acc", "many", "medium", "few", "ece", "nll"):
            if isinstance(expected[key], float) and math.isnan(expected[key]):  # a group without images: null
                assert row[key] is None, (name, key)
            else:
                assert row[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), (name, key)
        before = classification_report(MultiExpertNet.ensemble(logits[:, idx]), labels[idx], counts, 30, 10)
        assert row["acc_before"] == pytest.approx(before["acc"]) and row["tau"] is None
    # the report's plot: SADE beside the modes that run on cached logits, the same accuracies as the rows
    assert report["curves"]["modes"]["sade"] == [report["distributions"][n]["acc"] for n in TEST_DISTRIBUTIONS]
    assert report["curves"]["labels"]["sade"] == "SADE aggregation (learnt per target set)"
    assert {"none", "known", "labelled", "unlabelled"} <= set(report["curves"]["modes"])
    md = (out / "shift_eval.md").read_text()
    assert "SADE test-time aggregation" in md and "| weights |" in md
    assert (out / "reliability_uniform_sade.png").read_bytes()[:4] == b"\x89PNG"


def test_sade_is_deterministic_for_a_seed(balpoe_ckpt, tmp_path):
    def run(seed):
        opt = ShiftOptions(test_dists="forward10,uniform", adapt="sade", sade_epochs=2, sade_batch_size=32, seed=seed)
        rows = evaluate_shift(balpoe_ckpt, opt, device="cpu", out=tmp_path, plots=False, quiet=True)["distributions"]
        return {n: (r["weights"], r["objective"]) for n, r in rows.items()}
    first = run(3)
    assert run(3) == first
    other = run(4)
    assert all(other[n][1] != first[n][1] for n in first)  # other views, other objective


@pytest.mark.parametrize("mode", ["none", "known", "labelled", "unlabelled", "sade"])
def test_only_sade_runs_the_model_again(balpoe_ckpt, tmp_path, monkeypatch, mode):
    """Forward passes counted: every mode but sade makes exactly those of ``--adapt none`` (the
    test set once, and the held-out slice); sade adds one per batch (both views in one pass) per
    epoch per target set."""
    calls = []
    forward = MultiExpertNet.forward
    monkeypatch.setattr(MultiExpertNet, "forward", lambda self, x: calls.append(len(x)) or forward(self, x))

    def count(adapt):
        calls.clear()
        opt = ShiftOptions(test_dists="forward5,uniform,backward5", adapt=adapt, sade_epochs=2, sade_batch_size=64)
        evaluate_shift(balpoe_ckpt, opt, device="cpu", out=tmp_path, plots=False, quiet=True)
        return list(calls)
    base, got = count("none"), count(mode)
    if mode != "sade":
        assert got == base
    else:
        sizes = [149, 300, 149]  # images of forward5, uniform, backward5 (each viewed twice per batch)
        extra = [2 * min(64, n - i) for n in sizes for _ in range(2) for i in range(0, n, 64)]
        assert got == base + extra


def test_sade_on_a_single_expert_checkpoint_is_a_one_line_error(single_ckpt, tmp_path, capsys):
    rc = main(["eval", str(single_ckpt), "--device", "cpu", "--test-dists", "uniform", "--adapt", "sade",
               "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err == (f"error: adaptation mode 'sade' learns weights of at least 2 experts; checkpoint '{single_ckpt}' "
                   "has num_experts 1\n")
    assert not (tmp_path / "shift_eval.json").exists()


def _settings(dataset, in_memory=True, **options):
    recipe = SimpleNamespace(model=SimpleNamespace(num_experts=3), data=SimpleNamespace(dataset=dataset))
    bundle = SimpleNamespace(in_memory=in_memory, name=dataset, pipeline=SimpleNamespace(padding=4, flip=True))
    return sade_settings(recipe, bundle, ShiftOptions(adapt="sade", **options), "x.pt")


def test_official_sgd_by_dataset_and_overrides():
    assert _settings("cifar100")["learn"] == {"epochs": 5, "batch_size": 128, "lr": 0.1, "weight_decay": 5e-4,
                                              "padding": 4, "flip": True}
    s = _settings("imagenet_lt")
    assert (s["learn"]["lr"], s["learn"]["weight_decay"], s["report"]["sgd_config"]) == (0.025, 5e-4,
                                                                                          "official imagenet_lt")
    s = _settings("inat", sade_lr=0.5, sade_epochs=1, sade_batch_size=16)["learn"]
    assert (s["lr"], s["weight_decay"], s["epochs"], s["batch_size"]) == (0.5, 2e-4, 1, 16)
    with pytest.raises(BalpoeError, match=r"^adaptation mode 'sade' needs an in-memory dataset \(its views are made "
                       r"from the test images in memory\); imagenet_lt is read from image files$"):
        _settings("imagenet_lt", in_memory=False)


@pytest.mark.parametrize("bad, message", [
    ({"sade_epochs": 0}, "sade epochs must be an integer >= 1, got 0"),
    ({"sade_batch_size": 2.5}, "sade batch size must be an integer >= 1, got 2.5"),
    ({"sade_lr": 0}, "sade lr must be a finite number > 0, got 0"),
    ({"sade_lr": float("inf")}, "sade lr must be a finite number > 0, got inf"),
])
def test_bad_sade_options_are_one_line_errors(bad, message):
    with pytest.raises(BalpoeError) as info:
        ShiftOptions(**bad)
    assert str(info.value) == message
