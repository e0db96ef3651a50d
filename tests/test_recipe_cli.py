"""Recipe validation, overrides, shipped recipes, CLI error handling, LR schedule."""

import dataclasses
import os
import re
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import torch

from balpoe.errors import BalpoeError
from balpoe.recipe import (AugmentConfig, DataConfig, LossConfig, ModelConfig, OptimConfig, Recipe, Stage2Config,
                           TrainConfig, load_recipe, recipe_from_dict)
from balpoe.errors import shown
from balpoe.losses.build import check_loss, expert_taus
from balpoe.models.build import build_model
from balpoe.training.build import build_scheduler, check_names, compile_enabled, train

RECIPES = sorted(Path(__file__).resolve().parents[1].glob("recipes/**/*.yaml"))


@pytest.mark.parametrize("raw,message", [
    ({"optim": {"lrr": 0.1}}, "unknown recipe key 'optim.lrr'"),
    ({"name": "../../x"}, "recipe key 'name' must be a plain name"),
    ({"name": "runs/x"}, "recipe key 'name' must be a plain name"),
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
    ({"train": {"compile": "cuda"}}, "recipe key 'train.compile' must be one of false, true, auto; got 'cuda'"),
    ({"data": {"augment": {"interpolation": "bicubic"}}},
     "recipe key 'data.augment.interpolation' must be one of null, nearest, bilinear; got 'bicubic'"),
])
def test_bad_recipes_name_the_key(raw, message):
    with pytest.raises(BalpoeError) as e:
        recipe_from_dict(raw)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("section, message", [
    ({"data": {"dataset": "mnist"}}, "recipe key 'data.dataset' is unknown: 'mnist' (known: cifar10, cifar100,"),
    ({"loss": {"name": "florp"}}, "recipe key 'loss.name' is unknown: 'florp' (known: logit_adjusted, ce, focal"),
    ({"model": {"backbone": "resnet_9000"}}, "model.backbone 'resnet_9000' is not a timm model name"),
])
def test_unregistered_names_stop_before_anything_is_written(tmp_path, section, message):
    with pytest.raises(BalpoeError) as e:
        train(recipe_from_dict(section), tmp_path / "run", show_progress=False, report=False)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_overrides_and_defaults(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\nmodel: {num_experts: 4}\nloss: {tau_min: -1, tau_max: 3}\n")
    r = load_recipe(p, ["optim.lr=0.05", "train.mixup_alpha=0", "data.augment.rotation=0"])
    assert r.optim.lr == 0.05 and r.train.mixup_alpha == 0.0 and r.data.augment.rotation == 0.0
    assert expert_taus(r.loss, r.model.num_experts) == pytest.approx([-1.0, 1 / 3, 5 / 3, 3.0])
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
    check_loss(r)  # its loss keys apply to its loss.name, and the loss's rules on the model hold


@pytest.mark.parametrize("written,cpu,cuda", [("auto", False, True), ("true", True, True), ("yes", True, True),
                                               ("false", False, False)])
def test_train_compile_auto_compiles_on_cuda_only(written, cpu, cuda):
    r = load_recipe(RECIPES[0], [f"train.compile={written}"])
    assert compile_enabled(r.train.compile, torch.device("cpu")) is cpu
    assert compile_enabled(r.train.compile, torch.device("cuda", 0)) is cuda
    assert recipe_from_dict(r.to_dict()).train.compile == r.train.compile


def test_gpu_size_balpoe_recipes_ship_the_gpu_speed_settings():
    """The CIFAR and GPU-size Fashion-MNIST BalPoE recipes compile with CUDA graphs on CUDA only and
    batch the expert branches; the CPU demo recipe does neither (README "Performance")."""
    folder = Path(__file__).resolve().parents[1] / "recipes" / "balpoe"
    for path in sorted(folder.glob("cifar*.yaml")) + [folder / "fashion_mnist_lt_ir100.yaml"]:
        r = load_recipe(path)
        assert (r.train.compile, r.train.compile_mode, r.model.batched_experts) == ("auto", "reduce-overhead", True)
    demo = load_recipe(folder / "fashion_mnist_lt_ir100_cpu_demo.yaml")
    assert (demo.train.compile, demo.model.batched_experts) == (False, False)


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


# ------------------------------------------------------------------------------------------------
# Recipe files, numbers, bounded messages

def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(BalpoeError) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert msg and "\n" not in msg and len(msg) <= 300, msg
    return msg


def test_unreadable_recipe_files_are_one_line_errors(tmp_path, monkeypatch):
    assert _error(load_recipe, tmp_path) == f"recipe file '{tmp_path}' is a directory, not a YAML file"
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"name: caf\xe9\n")
    assert _error(load_recipe, latin1) == f"recipe file '{latin1}' is not UTF-8 text (byte 0xe9 at offset 9)"
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    assert _error(load_recipe, fifo) == f"recipe file '{fifo}' is not a regular file"  # not opened: no hang
    big = tmp_path / "big.yaml"
    big.write_text("name: x\n" + "#" * (1 << 20) + "\n")
    assert "is 1048585 bytes; a recipe is at most 1048576 bytes" in _error(load_recipe, big)
    assert _error(load_recipe, tmp_path / ("x" * 300)).endswith("cannot be read (File name too long)")
    assert "embedded null byte" in _error(load_recipe, "a\0b.yaml")
    nul = tmp_path / "nul.yaml"
    nul.write_text("name: a\0b\n")
    assert _error(load_recipe, nul) == (f"recipe file '{nul}' is not valid YAML (character U+0000 at offset 7 is "
                                        "not allowed)")
    deep = tmp_path / "deep.yaml"
    deep.write_text("name: " + "[" * 50_000 + "\n")
    assert _error(load_recipe, deep).endswith("is not valid YAML (nested too deeply)")
    (tmp_path / "list.yaml").write_text("- 1\n")
    assert _error(load_recipe, tmp_path / "list.yaml").endswith("must hold a mapping of sections")

    ok = tmp_path / "ok.yaml"
    ok.write_text("name: x\n")
    if os.geteuid() != 0:  # a real refusal (root reads anything)
        ok.chmod(0)
        assert _error(load_recipe, ok) == f"recipe file '{ok}' cannot be read (Permission denied)"
        ok.chmod(0o644)
    # Permission denied, simulated (the tests may run as root).
    real_open = os.open

    def refuse(path, *args, **kwargs):
        if str(path) == str(ok):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(os, "open", refuse)
    assert _error(load_recipe, ok) == f"recipe file '{ok}' cannot be read (Permission denied)"


def test_yaml_syntax_errors_say_where(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\noptim: {lr: [\n")
    assert _error(load_recipe, p) == (f"recipe file '{p}' is not valid YAML (line 3: expected the node content, but "
                                      "found '<stream end>')")
    p.write_text("name: !!python/object:os.system x\n")
    assert "could not determine a constructor" in _error(load_recipe, p)


FLOAT_KEYS = [f"{section}.{f.name}" if section else f.name
              for section, cls in [("data", DataConfig), ("data.augment", AugmentConfig), ("model", ModelConfig),
                                   ("loss", LossConfig), ("optim", OptimConfig), ("train", TrainConfig),
                                   ("stage2", Stage2Config)]
              for f in dataclasses.fields(cls)
              if typing.get_type_hints(cls)[f.name] in (float, typing.Optional[float])]
INT_KEYS = [f"{section}.{f.name}" if section else f.name
            for section, cls in [("", Recipe), ("data", DataConfig), ("data.augment", AugmentConfig),
                                 ("model", ModelConfig), ("optim", OptimConfig), ("train", TrainConfig)]
            for f in dataclasses.fields(cls) if typing.get_type_hints(cls)[f.name] is int and f.name != "stage"]


def _nested(key: str, value) -> dict:
    *sections, last = key.split(".")
    raw = {last: value}
    for s in reversed(sections):
        raw = {s: raw}
    return raw


def test_every_float_key_refuses_non_finite_numbers(tmp_path):
    assert len(FLOAT_KEYS) >= 16 and "loss.tau_min" in FLOAT_KEYS and "stage2.las_power" in FLOAT_KEYS
    p = tmp_path / "r.yaml"
    p.write_text("name: x\n")
    for key in FLOAT_KEYS:
        for text, got in ((".nan", "nan"), (".inf", "inf"), ("-.inf", "-inf"), ("1e999", "'1e999'")):
            msg = _error(load_recipe, p, [f"{key}={text}"])
            assert msg == f"recipe key '{key}' must be a finite number, got {got}"
        msg = _error(recipe_from_dict, _nested(key, 10 ** 400))
        assert msg.startswith(f"recipe key '{key}' must be a finite number")
    assert _error(recipe_from_dict, {"loss": {"tau": [0, float("nan"), 1]}}) == \
        "recipe key 'loss.tau[1]' must be a finite number, got nan"


@pytest.mark.parametrize("key,largest", [
    ("seed", 2 ** 32 - 1), ("train.threads", 1024), ("data.augment.crop_padding", 256), ("model.num_experts", 64),
    ("optim.batch_size", 2 ** 20), ("optim.epochs", 100_000), ("train.checkpoint_every", 100_000),
    ("train.eval_every", 100_000), ("data.num_workers", 256), ("data.image_size", 4096),
    ("train.eval_batch_size", 2 ** 20)])
def test_integer_keys_have_sane_upper_bounds(key, largest):
    raw = _nested(key, largest)
    if key == "model.num_experts":
        raw["loss"] = {"tau": [0.0] * largest}
    recipe_from_dict(raw)  # the largest value is fine
    assert _error(recipe_from_dict, _nested(key, largest + 1)) == \
        f"recipe key '{key}' must be <= {largest}, got {largest + 1}"


def test_every_integer_key_bounds_huge_values_without_overflow():
    assert len(INT_KEYS) >= 14
    for key in INT_KEYS:
        for value, shown in ((10 ** 30, str(10 ** 30)), ("1e30", "'1e30'"), ("1e99999", "'1e99999'")):
            assert re.fullmatch(rf"recipe key '{re.escape(key)}' must be <= \d+, got {re.escape(shown)}",
                                _error(recipe_from_dict, _nested(key, value)))
    assert _error(recipe_from_dict, {"optim": {"milestones": [10 ** 30]}}) == \
        f"recipe key 'optim.milestones[0]' must be <= 100000, got {10 ** 30}"


@pytest.mark.parametrize("raw,message", [
    ({"optim": {"milestones": [-5, 100]}}, "recipe key 'optim.milestones[0]' must be >= 1, got -5"),
    ({"optim": {"milestones": [0]}}, "recipe key 'optim.milestones[0]' must be >= 1, got 0"),
    ({"optim": {"warmup_epochs": 5, "milestones": [3, 100]}},
     "recipe key 'optim.milestones' has 3 inside the warmup: milestones must be >= optim.warmup_epochs (5)"),
    ({"optim": {"milestones": [180, 160]}}, "recipe key 'optim.milestones' must be increasing, got [180, 160]"),
    ({"loss": {"tau_min": 2.5, "tau_max": 1}}, "recipe key 'loss.tau_min' (2.5) must not exceed loss.tau_max (1.0)"),
    ({"optim": {"lr": 0.01, "min_lr": 0.1}}, "recipe key 'optim.min_lr' (0.1) must not exceed optim.lr (0.01)"),
    ({"model": {"kwargs": {"num_classes": 5}}},
     "recipe key 'model.kwargs' must not set 'num_classes' (the number of classes comes from the dataset)"),
    ({"model": {"kwargs": {"drop rate": 0.1}}},
     "recipe key 'model.kwargs' must map keyword-argument names to values, got the key 'drop rate'"),
    ({"name": "a\nb"}, "recipe key 'name' must not contain control characters ('\\n'), got 'a\\nb'"),
    ({"data": {"root": "/data\x00"}}, "recipe key 'data.root' must not contain control characters"),
    ({"model": {"backbone": "r" * 201}}, "recipe key 'model.backbone' must be at most 200 characters long, got 201"),
    ({"data": {"root": "/" * 4097}}, "recipe key 'data.root' must be at most 4096 characters long, got 4097"),
])
def test_cross_key_and_range_checks(raw, message):
    assert message in _error(recipe_from_dict, raw)


def test_milestones_beyond_the_epochs_are_accepted():
    # A shortened run of a multistep recipe (--set optim.epochs=20 on a 200-epoch recipe) is a documented use.
    r = recipe_from_dict({"optim": {"epochs": 20, "milestones": [160, 180]}})
    assert r.optim.milestones == [160, 180]
    recipe_from_dict({"optim": {"epochs": 20, "schedule": "cosine", "milestones": [1]}})  # unused: not checked


def test_numbers_as_python_writes_them(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("optim: {lr: 1e-3, weight_decay: 5e-4, epochs: 1e3, batch_size: 1_024}\n")
    r = load_recipe(p)
    assert (r.optim.lr, r.optim.weight_decay, r.optim.epochs, r.optim.batch_size) == (1e-3, 5e-4, 1000, 1024)
    assert type(r.optim.epochs) is int and type(r.optim.lr) is float
    cases = {"optim.lr=1e-3": 1e-3, "optim.lr=5e-4": 5e-4, "optim.lr=1E-3": 1e-3, "optim.lr=.5": 0.5,
             "optim.lr=+2": 2.0, "optim.lr=1e+1": 10.0, "optim.lr=-.5e-1": None, "optim.lr=1_000.5": 1000.5,
             "data.imb_factor=1e6": 1e6, "optim.epochs=1e3": 1000, "optim.epochs=1_000": 1000,
             "optim.epochs=+20": 20, "optim.batch_size=2.5e2": 250, "seed=4.294967295e9": 2 ** 32 - 1}
    for text, expected in cases.items():
        key, _ = text.split("=")
        if expected is None:  # parsed (-0.05) and then refused by the range, not as "not a number"
            assert _error(load_recipe, p, [text]) == "recipe key 'optim.lr' must be > 0, got '-.5e-1'"
            continue
        r = load_recipe(p, [text])
        value = r
        for part in key.split("."):
            value = getattr(value, part)
        assert value == expected and type(value) is type(expected), text
    for text, message in {"optim.lr=fast": "recipe key 'optim.lr' must be a number, got 'fast'",
                          "optim.lr=1e": "recipe key 'optim.lr' must be a number, got '1e'",
                          "optim.lr=nan": "recipe key 'optim.lr' must be a number, got 'nan'",
                          "optim.lr=0x1p-3": "recipe key 'optim.lr' must be a number, got '0x1p-3'",
                          "optim.epochs=2.5e0": "recipe key 'optim.epochs' must be an integer, got '2.5e0'",
                          "optim.epochs=2.0": "recipe key 'optim.epochs' must be an integer, got 2.0",
                          "optim.epochs=1e-3": "recipe key 'optim.epochs' must be an integer, got '1e-3'",
                          "optim.epochs=1e6": "recipe key 'optim.epochs' must be <= 100000, got '1e6'"}.items():
        assert _error(load_recipe, p, [text]) == message


def _alias_chain(levels: int = 9, width: int = 9) -> str:
    """A YAML list whose last element expands to width ** levels strings ("billion laughs")."""
    items = ["&a0 [" + ", ".join(["lol"] * width) + "]"]
    items += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels + 1)]
    return "[" + ", ".join(items) + "]"


@pytest.mark.parametrize("where", ["name", "data", "loss.tau", "optim.milestones", "model.backbone",
                                   "model.kwargs.layers", "model.kwargs", "unknown_key"])
def test_alias_bombs_are_refused_fast_with_a_short_line(tmp_path, where):
    p = tmp_path / "bomb.yaml"
    *sections, last = where.split(".")
    text = "".join(f"{'  ' * i}{s}:\n" for i, s in enumerate(sections))
    text += f"{'  ' * len(sections)}{last}: {_alias_chain()}\n"
    p.write_text(text)
    assert len(text) < 1500
    start = time.perf_counter()
    msg = _error(load_recipe, p)
    assert time.perf_counter() - start < 10.0   # expanding the 9**9 strings would take minutes and GBs
    expected = {"name": "recipe key 'name' must be a string, got [['lol', 'lol', 'lol', 'lol', ...], [[...], ",
                "data": "recipe section 'data' must be a mapping, got [['lol', 'lol', 'lol', 'lol', ...], [[...], ",
                "loss.tau": "recipe key 'loss.tau[0]' must be a number, got ['lol', 'lol', 'lol', 'lol', ...]",
                "optim.milestones": "recipe key 'optim.milestones[0]' must be an integer, got ['lol', 'lol', ",
                "model.backbone": "recipe key 'model.backbone' must be a string, got [['lol', 'lol', 'lol', 'lol', ",
                "model.kwargs.layers": "recipe key 'model.kwargs' holds more than 10000 values (each use of a YAML ",
                "model.kwargs": "recipe key 'model.kwargs' must be a mapping, got [['lol', 'lol', 'lol', 'lol', ...], ",
                "unknown_key": "unknown recipe key 'unknown_key' (known in 'recipe': name, seed, stage, data, "}
    assert msg.startswith(expected[where]), msg


def test_kwargs_size_is_bounded_everywhere():
    bomb = ["lol"] * 10
    for _ in range(8):
        bomb = [bomb] * 10  # 10**9 strings through shared references
    assert _error(recipe_from_dict, {"model": {"kwargs": {"layers": bomb}}}) == \
        "recipe key 'model.kwargs' holds more than 10000 values (each use of a YAML alias counts)"
    deep: list = []
    for _ in range(40):
        deep = [deep]
    assert _error(recipe_from_dict, {"model": {"kwargs": {"layers": deep}}}) == \
        "recipe key 'model.kwargs' is nested more than 32 levels deep"
    r = recipe_from_dict({})
    r.model.kwargs = {"layers": bomb}  # set behind validation's back: to_dict / to_yaml still refuse to expand it
    start = time.perf_counter()
    _error(r.to_dict)
    _error(r.to_yaml)
    assert time.perf_counter() - start < 10.0   # expanding 10**9 strings would take minutes and GBs
    ok = recipe_from_dict({"model": {"kwargs": {"widths": [8, 16, 32], "global_pool": "avg"}}})
    assert recipe_from_dict(ok.to_dict()) == ok


def test_error_values_are_shown_bounded(tmp_path):
    msg = _error(recipe_from_dict, {"data": {"dataset": 7 * ["x" * 5000]}})
    assert msg.startswith("recipe key 'data.dataset' must be a string, got ['xxxxx") and len(msg) <= 250
    msg = _error(recipe_from_dict, {"optim": {"x" * 5000: 1}})
    assert msg.startswith("unknown recipe key 'optim.xxx") and len(msg) <= 300
    assert shown(10 ** 100).count("0") < 45 and shown("a\nb") == "'a\\nb'"
    p = tmp_path / "r.yaml"
    p.write_text("optim: {lr: 0.1}\n")
    msg = _error(load_recipe, p, ["x" * 10_000])
    assert msg.startswith("override expects key=value, got 'xxx") and len(msg) <= 250
    assert _error(load_recipe, p, [".lr=1"]) == "override '.lr=1': the key must be dotted names such as optim.lr"
    assert _error(load_recipe, p, ["optim.lr.x=1"]) == "override 'optim.lr.x=1': 'lr' is not a section"


NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "fashion_mnist": 10, "imagenet_lt": 1000, "places_lt": 365,
               "inat": 8142}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_shipped_recipe_builds_its_model(path):
    """The network each shipped recipe asks for (stage 1 and stage 2 architectures), with the
    dataset's class count; weights are not loaded (``pretrained=False``), so no file is needed."""
    r = load_recipe(path)
    in_chans = 1 if r.data.dataset == "fashion_mnist" else 3
    stage2 = r.stage2.classifier if r.stage == 2 else None
    model = build_model(r.model, NUM_CLASSES[r.data.dataset], in_chans, stage2_classifier=stage2, pretrained=False)
    assert model.num_experts == r.model.num_experts
    assert all(h.out_features == NUM_CLASSES[r.data.dataset] for h in model.heads)
    check_names(r)
