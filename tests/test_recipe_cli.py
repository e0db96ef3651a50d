"""Recipe validation, overrides, shipped recipes, CLI error handling, LR schedule."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from balpoe.errors import BalpoeError
from balpoe.recipe import load_recipe, recipe_from_dict
from balpoe.losses.build import expert_taus
from balpoe.training.build import build_scheduler, train

RECIPES = sorted(Path(__file__).resolve().parents[1].glob("recipes/**/*.yaml"))


@pytest.mark.parametrize("raw,message", [
    ({"optim": {"lrr": 0.1}}, "unknown recipe key 'optim.lrr'"),
    ({"colour": 1}, "unknown recipe key 'colour'"),
    ({"optim": {"lr": "fast"}}, "recipe key 'optim.lr' must be a number, got 'fast'"),
    ({"optim": {"lr": -0.1}}, "recipe key 'optim.lr' must be > 0"),
    ({"optim": {"epochs": 2.5}}, "recipe key 'optim.epochs' must be an integer"),
    ({"model": {"num_experts": 0}}, "recipe key 'model.num_experts' must be >= 1"),
    ({"data": {"augment": {"flip": "yes"}}}, "recipe key 'data.augment.flip' must be true or false"),
    ({"loss": {"tau": [0, 1]}}, "'loss.tau' has 2 values but model.num_experts is 3"),
    ({"loss": {"tau": [0, "a", 2]}}, "recipe key 'loss.tau[1]' must be a number"),
    ({"optim": {"epochs": 5, "warmup_epochs": 5}}, "'optim.warmup_epochs' (5) must be smaller"),
    ({"stage": 2}, "'stage2.init_checkpoint' is required"),
    ({"train": {"mixup_alpha": -1}}, "recipe key 'train.mixup_alpha' must be >= 0"),
])
def test_bad_recipes_name_the_key(raw, message):
    with pytest.raises(BalpoeError) as e:
        recipe_from_dict(raw)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("section, message", [
    ({"data": {"dataset": "mnist"}}, "recipe key 'data.dataset' is unknown: 'mnist' (known: cifar10, cifar100,"),
    ({"loss": {"name": "focal"}}, "recipe key 'loss.name' is unknown: 'focal' (known: logit_adjusted"),
    ({"model": {"backbone": "resnet_9000"}}, "model.backbone 'resnet_9000' is not a timm model name"),
])
def test_unregistered_names_stop_before_anything_is_written(tmp_path, section, message):
    with pytest.raises(BalpoeError) as e:
        train(recipe_from_dict(section), tmp_path / "run", show_progress=False)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_overrides_and_defaults(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\nmodel: {num_experts: 4}\nloss: {tau_min: -1, tau_max: 3}\n")
    r = load_recipe(p, ["optim.lr=0.05", "train.mixup_alpha=0", "data.augment.rotation=0"])
    assert r.optim.lr == 0.05 and r.train.mixup_alpha == 0.0 and r.data.augment.rotation == 0.0
    assert expert_taus(r) == pytest.approx([-1.0, 1 / 3, 5 / 3, 3.0])
    with pytest.raises(BalpoeError, match="unknown recipe key 'optim.nope'"):
        load_recipe(p, ["optim.nope=1"])
    with pytest.raises(BalpoeError, match="recipe file '.*missing.yaml' not found"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("optim: {lr: [\n")
    with pytest.raises(BalpoeError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_shipped_recipes_validate(path):
    r = load_recipe(path)
    assert r.name
    assert recipe_from_dict(r.to_dict()) == r  # the resolved recipe round-trips


def _epoch_lrs(optim: dict) -> list[float]:
    """The learning rate of each epoch under the recipe's schedule (stepped once per epoch)."""
    r = recipe_from_dict({"optim": optim})
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=r.optim.lr)
    sched = build_scheduler(r.optim, opt)
    lrs = []
    for _ in range(r.optim.epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_balpoe_warmup_then_multistep_schedule_matches_official():
    lrs = _epoch_lrs({"lr": 0.1, "epochs": 200, "warmup_epochs": 5, "milestones": [160, 180]})
    expected = [0.1 * (e + 1) / 5 if e < 5 else 0.1 * (0.1 if e >= 160 else 1) * (0.1 if e >= 180 else 1)
                for e in range(200)]
    assert lrs == pytest.approx(expected, rel=1e-9)


def test_cosine_schedule_without_warmup():
    lrs = _epoch_lrs({"lr": 0.2, "epochs": 10, "warmup_epochs": 0, "schedule": "cosine"})
    import math
    assert lrs == pytest.approx([0.1 * (1 + math.cos(math.pi * e / 10)) for e in range(10)], rel=1e-6)


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    from balpoe.cli import main
    p = tmp_path / "r.yaml"
    p.write_text("optim: {lr: fast}\n")
    # One real process: exit status and stderr exactly as a user sees them, no traceback.
    res = subprocess.run([sys.executable, "-m", "balpoe.cli", "train", str(p), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip() == "error: recipe key 'optim.lr' must be a number, got 'fast'"
    assert not (tmp_path / "o").exists()

    def run(*args):
        code = main(list(args))
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err
        return code, err

    code, err = run("train", str(tmp_path / "nope.yaml"))
    assert code == 2 and err.startswith("error: recipe file") and "nope.yaml" in err
    code, err = run("eval", str(tmp_path / "missing.pt"))
    assert code == 2 and "checkpoint" in err and "missing.pt" in err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    code, err = run("eval", str(tmp_path / "junk.pt"))
    assert code == 2 and "junk.pt" in err
    code, err = run("train", str(p), "--set", "optim")
    assert code == 2 and "argument --set: expected KEY=VALUE, got 'optim'" in err
