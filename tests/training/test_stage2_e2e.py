"""MiSLAS stage 2 end to end on tiny files in the real formats: stage 1 -> stage 2 through the public
API and the CLI, what stage 2 may and may not change in the network, evaluation of a stage-2
checkpoint, one-line errors, and BalPoE's multi-expert model with the same stage 2."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml

from balpoe import evaluate_checkpoint, load_recipe, recipe_from_dict, train
from balpoe.data.build import build_data
from balpoe.runtime.checkpoint import atomic_save, load_checkpoint
from balpoe.errors import BalpoeError
from balpoe.losses.las import LabelAwareSmoothingLoss
from balpoe.models.lws import LWSDeltaHead
from balpoe.evaluate.build import ensemble_prior, load_model
from balpoe.losses.build import build_stage2_criterion
from balpoe.losses.priors import stage2_expert_offsets
from balpoe.training.build import build_plan, load_init_checkpoint
from balpoe.training.stage2 import adopt_stage1_sections

SMALL = {"backbone": "small_cnn", "kwargs": {"widths": [8, 16, 16]}}


def _data(root, dataset="cifar10", **extra):
    return {"dataset": dataset, "root": str(root), "imb_factor": 10, "many_threshold": 30, "few_threshold": 10,
            **extra}


def _stage1(root, name, model, tau, dataset="cifar10"):
    """A stage-1 recipe dict (MiSLAS when ``model`` has one expert and tau is [0])."""
    return {"name": name, "seed": 0, "data": _data(root, dataset),
            "model": {**SMALL, **model}, "loss": {"tau": tau},
            "optim": {"lr": 0.05, "batch_size": 32, "epochs": 2, "warmup_epochs": 0, "schedule": "cosine",
                      "nesterov": False},
            "train": {"mixup_alpha": 1.0, "eval_batch_size": 64, "device": "cpu"}}


def _stage2(root, init, name="s2", dataset="cifar10", **stage2):
    """A stage-2 recipe dict: no model/loss sections (they come from the checkpoint)."""
    return {"name": name, "seed": 0, "stage": 2, "data": _data(root, dataset, sampler="class_balanced"),
            "optim": {"lr": 0.1, "batch_size": 32, "epochs": 2, "warmup_epochs": 0, "schedule": "cosine",
                      "nesterov": False},
            "train": {"mixup_alpha": 0, "eval_batch_size": 64, "device": "cpu"},
            "stage2": {"init_checkpoint": str(init), "classifier": "mislas", "shifted_bn": True,
                       "delta_lr_factor": 0.5, "eps_1": 0.3, "eps_k": 0.0, **stage2}}


@pytest.fixture(scope="module")
def fm_root(fm_small_root):
    return fm_small_root


@pytest.fixture(scope="module")
def mislas_stage1(cifar_root, tmp_path_factory):
    """Stage 1 of MiSLAS (E = 1, linear head, tau 0 = CE, mixup): the run directory."""
    out = tmp_path_factory.mktemp("runs") / "mislas_s1"
    train(recipe_from_dict(_stage1(cifar_root, "mislas_s1", {"num_experts": 1, "split": "head", "head": "linear"},
                                   [0])), out, show_progress=False)
    return out


@pytest.fixture(scope="module")
def balpoe_stage1(fm_root, tmp_path_factory):
    """Stage 1 of BalPoE on Fashion-MNIST IDX files (3 experts sharing stem + layer1, each with its
    own layer2 and cosine head, tau 0/1/2)."""
    out = tmp_path_factory.mktemp("runs") / "balpoe_s1"
    train(recipe_from_dict(_stage1(fm_root, "balpoe_s1", {"num_experts": 3, "split": "layer1", "head": "cosine"},
                                   [0, 1, 2], dataset="fashion_mnist")), out, show_progress=False)
    return out


def _is_bn_stat(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def _split_state(s1: dict, s2: dict) -> tuple[list[str], list[str]]:
    """Keys of the stage-1 state dict: (BN running statistics, everything else)."""
    stats = [k for k in s1 if _is_bn_stat(k)]
    return stats, [k for k in s1 if not _is_bn_stat(k)]


def test_mislas_stage1_to_stage2_api_eval_and_what_stage2_changes(mislas_stage1, cifar_root, tmp_path):
    s1_path = mislas_stage1 / "last.pt"
    recipe = recipe_from_dict(_stage2(cifar_root, s1_path))
    report = train(recipe, tmp_path / "s2", show_progress=False)
    s1, s2 = load_checkpoint(s1_path), load_checkpoint(tmp_path / "s2" / "last.pt")

    # The stage-2 checkpoint is self-contained: model/loss sections from stage 1, taus [0].
    assert s2["recipe"]["stage"] == 2 and s2["recipe"]["model"] == s1["recipe"]["model"]
    assert s2["recipe"]["loss"] == s1["recipe"]["loss"] and ensemble_prior(recipe_from_dict(s2["recipe"]))[0] == [0.0]
    assert load_recipe(tmp_path / "s2" / "recipe.yaml").model.num_experts == 1

    # Shifted BN: running statistics re-estimated in every BN layer; everything else of stage 1
    # (conv weights, BN affine parameters, the head's W and b) bit-identical.
    stats, frozen = _split_state(s1["model"], s2["model"])
    assert stats and any(k.endswith("bn1.weight") for k in frozen) and "heads.0.weight" in frozen
    for k in frozen:
        assert torch.equal(s1["model"][k], s2["model"][k]), k
    for k in stats:
        assert not torch.equal(s1["model"][k], s2["model"][k]), k
    # The Eq. 4 tensors were learnt: s moved from 1, dW (and db) from 0.
    new = set(s2["model"]) - set(s1["model"])
    assert new == {"heads.0.class_scale", "heads.0.delta_weight", "heads.0.delta_bias"}
    assert not torch.equal(s2["model"]["heads.0.class_scale"], torch.ones(10))
    assert s2["model"]["heads.0.delta_weight"].abs().sum() > 0

    # balpoe eval rebuilds the LWS heads from the stage-2 checkpoint alone (stage-1 file gone) and
    # reproduces the training-time report.
    s1_path.rename(s1_path.with_name("moved.pt"))
    try:
        again = evaluate_checkpoint(tmp_path / "s2" / "last.pt", device="cpu", out=tmp_path / "e.json")
    finally:
        s1_path.with_name("moved.pt").rename(s1_path)
    for key in ("acc", "many", "medium", "few", "ece", "mce", "nll", "brier"):
        assert again[key] == pytest.approx(report[key], abs=1e-9), key
    assert again["epoch"] == 2
    # A stage-2 checkpoint cannot start another stage 2.
    with pytest.raises(BalpoeError, match="is a stage-2 checkpoint; point it at a stage-1 run"):
        load_init_checkpoint(str(tmp_path / "s2" / "last.pt"))


def test_official_mislas_stage2_and_checkpoints_from_before_the_keys(mislas_stage1, cifar_root, tmp_path):
    # A stage-1 checkpoint written before model.head_init, data.images_per_class_visit and
    # stage2.las_target existed: its recipe lacks them and must still load (with the defaults).
    old = load_checkpoint(mislas_stage1 / "last.pt")
    del old["recipe"]["model"]["head_init"], old["recipe"]["data"]["images_per_class_visit"]
    del old["recipe"]["stage2"]["las_target"]
    atomic_save(old, tmp_path / "old.pt")
    _, stage1 = load_init_checkpoint(str(tmp_path / "old.pt"))
    assert stage1.model.head_init == "default" and stage1.stage2.las_target == "paper"
    assert evaluate_checkpoint(tmp_path / "old.pt", device="cpu", out=tmp_path / "e1.json")["n"] == 80

    # Stage 2 as the official code: class-aware sampler (ceil(n/B) + 1 batches), official LAS target.
    raw = _stage2(cifar_root, tmp_path / "old.pt", las_target="official")
    raw["data"].update(sampler="class_aware", images_per_class_visit=4)
    recipe = recipe_from_dict(raw)
    bundle = build_data(recipe.data, "cpu")
    plan = build_plan(recipe, bundle, torch.device("cpu"))
    n = int(bundle.class_counts.sum())
    assert len(plan.loader) == math.ceil(n / 32) + 1 and plan.loader.num_samples == 32 * len(plan.loader)
    assert plan.criterion.target == "official" and plan.criterion.spread == 10
    assert ensemble_prior(recipe)[1] == ensemble_prior(recipe_from_dict(_stage2(cifar_root, "x.pt")))[1] == 0.0
    report = train(recipe, tmp_path / "s2", show_progress=False)
    saved = load_recipe(tmp_path / "s2" / "recipe.yaml")
    assert saved.data.sampler == "class_aware" and saved.stage2.las_target == "official"
    assert saved.model.head_init == "default"  # adopted from the old checkpoint, default filled in
    again = evaluate_checkpoint(tmp_path / "s2" / "last.pt", device="cpu", out=tmp_path / "e2.json")
    assert again["acc"] == pytest.approx(report["acc"]) and again["ece"] == pytest.approx(report["ece"])


def test_stage2_without_shifted_bn_changes_only_the_eq4_tensors(mislas_stage1, cifar_root, tmp_path):
    recipe = recipe_from_dict(_stage2(cifar_root, mislas_stage1 / "last.pt", shifted_bn=False, eps_1=0.0))
    train(recipe, tmp_path / "s2", show_progress=False)
    s1 = load_checkpoint(mislas_stage1 / "last.pt")["model"]
    s2 = load_checkpoint(tmp_path / "s2" / "last.pt")["model"]
    for k in s1:  # BN statistics included
        assert torch.equal(s1[k], s2[k]), k


@pytest.mark.parametrize("classifier", ["lws", "crt"])
def test_crt_and_lws_stage2(mislas_stage1, cifar_root, tmp_path, classifier):
    recipe = recipe_from_dict(_stage2(cifar_root, mislas_stage1 / "last.pt", classifier=classifier))
    recipe.optim.epochs = 1
    report = train(recipe, tmp_path / "s2", show_progress=False)
    s1 = load_checkpoint(mislas_stage1 / "last.pt")["model"]
    s2 = load_checkpoint(tmp_path / "s2" / "last.pt")["model"]
    assert torch.equal(s1["heads.0.weight"], s2["heads.0.weight"])
    scale = s2["heads.0.class_scale"]
    if classifier == "lws":  # s learnt, no dW
        assert set(s2) - set(s1) == {"heads.0.class_scale"} and not torch.equal(scale, torch.ones(10))
    else:  # s fixed to 1, a fresh classifier dW (and db)
        assert set(s2) - set(s1) == {"heads.0.class_scale", "heads.0.delta_weight", "heads.0.delta_bias"}
        assert torch.equal(scale, torch.ones(10))
    again = evaluate_checkpoint(tmp_path / "s2" / "last.pt", device="cpu", out=tmp_path / "e.json")
    assert again["acc"] == pytest.approx(report["acc"]) and again["ece"] == pytest.approx(report["ece"])


def test_cli_stage1_then_stage2_eval_and_missing_init_checkpoint(cifar_root, tmp_path, capsys):
    from balpoe.cli import main
    # Stage 1 through the CLI's entry point (in process: one interpreter start is enough).
    s1 = tmp_path / "s1.yaml"
    s1.write_text(yaml.safe_dump(_stage1(cifar_root, "cli_s1", {"num_experts": 1, "split": "head", "head": "linear"},
                                         [0])))
    assert main(["train", str(s1), "--out", str(tmp_path / "s1"), "--no-progress"]) == 0
    # The stage-2 recipe names a checkpoint that does not exist: exit 2 with one line.
    s2 = tmp_path / "s2.yaml"
    s2.write_text(yaml.safe_dump(_stage2(cifar_root, "runs/nowhere/last.pt")))
    capsys.readouterr()
    assert main(["train", str(s2), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.strip().count("\n") == 0
    assert "stage2.init_checkpoint" in err and "runs/nowhere/last.pt" in err
    # `balpoe train STAGE2_RECIPE --set stage2.init_checkpoint=...` in a real process.
    init = tmp_path / "s1" / "last.pt"
    res = subprocess.run([sys.executable, "-m", "balpoe.cli", "train", str(s2), "--out", str(tmp_path / "s2"),
                          "--no-progress", "--set", f"stage2.init_checkpoint={init}"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "taken from the stage-1 checkpoint" in res.stderr and "balanced test set" in res.stderr
    trained = json.loads((tmp_path / "s2" / "eval.json").read_text())
    assert load_recipe(tmp_path / "s2" / "recipe.yaml").stage2.init_checkpoint == str(init)
    # `balpoe eval` on the stage-2 checkpoint matches the training-time report.
    assert main(["eval", str(tmp_path / "s2" / "last.pt"), "--device", "cpu", "--out", str(tmp_path / "e.json")]) == 0
    evaluated = json.loads((tmp_path / "e.json").read_text())
    assert evaluated["n"] == 80 and evaluated["epoch"] == 2
    for key in ("acc", "many", "few", "ece", "nll"):
        assert evaluated[key] == pytest.approx(trained[key], abs=1e-9), key


def test_stage2_recipe_errors_are_one_line(mislas_stage1, cifar_root, tmp_path):
    init = mislas_stage1 / "last.pt"
    missing = tmp_path / "missing.pt"
    cases = [
        (_stage2(cifar_root, missing), f"'stage2.init_checkpoint': checkpoint '{missing}'"),
        ({**_stage2(cifar_root, init), "model": {"backbone": "resnet20_cifar"}}, "recipe key 'model.backbone'"),
        ({**_stage2(cifar_root, init), "loss": {"tau": [1.0]}}, "recipe key 'loss.tau'"),
        ({**_stage2(cifar_root, init), "data": _data(cifar_root)}, "recipe key 'data.sampler'"),
        ({**_stage2(cifar_root, init), "data": _data(cifar_root, imb_factor=5, sampler="class_balanced")},
         "class counts differ"),
    ]
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    cases.append((_stage2(cifar_root, tmp_path / "junk.pt"), "'stage2.init_checkpoint': checkpoint"))
    for i, (raw, message) in enumerate(cases):
        with pytest.raises(BalpoeError) as e:
            train(recipe_from_dict(raw), tmp_path / f"run{i}", show_progress=False)
        assert message in str(e.value) and "\n" not in str(e.value), (i, str(e.value))
    # A stage-2 recipe that repeats the stage-1 sections exactly is accepted as is; one that leaves
    # them out gets them copied.
    stage1 = load_checkpoint(init)["recipe"]
    same = recipe_from_dict({**_stage2(cifar_root, init), "model": stage1["model"], "loss": stage1["loss"]})
    assert adopt_stage1_sections(same, recipe_from_dict(stage1), str(init)) == (same, [])
    bare = recipe_from_dict(_stage2(cifar_root, init))
    adopted, taken = adopt_stage1_sections(bare, recipe_from_dict(stage1), str(init))
    assert taken == ["model", "loss"] and adopted.model == same.model and adopted.loss == same.loss
    assert bare == recipe_from_dict(_stage2(cifar_root, init))  # the recipe passed in is not changed


def test_balpoe_three_experts_stage2(balpoe_stage1, fm_root, tmp_path):
    s1_path = balpoe_stage1 / "last.pt"
    recipe = recipe_from_dict(_stage2(fm_root, s1_path, dataset="fashion_mnist", eps_1=0.3, eps_k=0.1))
    report = train(recipe, tmp_path / "s2", show_progress=False)
    s1, s2 = load_checkpoint(s1_path), load_checkpoint(tmp_path / "s2" / "last.pt")
    assert ensemble_prior(recipe_from_dict(s2["recipe"]))[0] == [0.0, 1.0, 2.0] and len(report["expert_acc"]) == 3
    assert s2["recipe"]["model"]["num_experts"] == 3
    # Per-expert LWS + dW on every head; shifted BN in the shared trunk and in each expert's branch.
    stats, frozen = _split_state(s1["model"], s2["model"])
    for k in frozen:
        assert torch.equal(s1["model"][k], s2["model"][k]), k
    for k in stats:
        assert not torch.equal(s1["model"][k], s2["model"][k]), k
    assert {f"branches.{e}.layer2.1.running_var" for e in range(3)} <= set(stats)
    assert {f"heads.{e}.delta_weight" for e in range(3)} <= set(s2["model"])
    again = evaluate_checkpoint(tmp_path / "s2" / "last.pt", device="cpu", out=tmp_path / "e.json")
    assert again["acc"] == pytest.approx(report["acc"]) and again["expert_acc"] == pytest.approx(report["expert_acc"])

    model, _, _ = load_model(tmp_path / "s2" / "last.pt")
    assert sum(isinstance(m, LWSDeltaHead) for m in model.modules()) == 3
    # Each expert keeps its stage-1 target: offsets tau_k - mean tau.
    loss = build_stage2_criterion(recipe.stage2, recipe.loss, recipe.model.num_experts, s2["class_counts"])
    assert loss.expert_offsets.tolist() == [-1.0, 0.0, 1.0]


def test_stage2_loss_is_las_for_one_expert_and_adjusts_experts():
    counts = torch.tensor([50, 20, 8, 3])
    logits = torch.randn(1, 7, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    r = recipe_from_dict({"model": {"num_experts": 1}, "loss": {"tau": [0]},
                          "stage2": {"eps_1": 0.4, "eps_k": 0.1}})
    las = LabelAwareSmoothingLoss(counts, 0.4, 0.1)
    for mode in ("relative", "absolute", "none"):
        r.stage2.expert_adjust = mode
        assert torch.equal(build_stage2_criterion(r.stage2, r.loss, r.model.num_experts, counts)(logits, y), las(logits[0], y))
    # One expert with tau 1 (logit-adjusted stage 1): 'relative' is still exactly LAS.
    r.loss.tau, r.stage2.expert_adjust = [1.0], "relative"
    assert torch.equal(build_stage2_criterion(r.stage2, r.loss, r.model.num_experts, counts)(logits, y), las(logits[0], y))
    # stage2.las_target picks the target distribution (paper Eq. 1 by default, or official methods.py)
    r.stage2.las_target = "official"
    official = LabelAwareSmoothingLoss(counts, 0.4, 0.1, target="official")
    assert torch.equal(build_stage2_criterion(r.stage2, r.loss, r.model.num_experts, counts)(logits, y), official(logits[0], y))
    assert not torch.equal(official(logits[0], y), las(logits[0], y))
    # eps 0: cross-entropy.  Three experts: LAS of f_k + delta_k log pi, delta = tau_k - mean tau.
    r = recipe_from_dict({"model": {"num_experts": 3}, "loss": {"tau": [0, 1, 2]}})
    logits3 = torch.randn(3, 7, 4, generator=torch.Generator().manual_seed(1))
    log_pi = torch.log(counts.double() / counts.sum() + 1e-9).float()
    want = torch.stack([F.cross_entropy(logits3[k] + (k - 1) * log_pi, y) for k in range(3)]).mean()
    assert torch.allclose(build_stage2_criterion(r.stage2, r.loss, r.model.num_experts, counts)(logits3, y), want, atol=1e-6)
    assert stage2_expert_offsets([0, 1, 2], "absolute") == [0.0, 1.0, 2.0]
    assert stage2_expert_offsets([0.5, 1.5], "none") == [0.0, 0.0]
