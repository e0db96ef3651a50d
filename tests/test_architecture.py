"""The package's architecture as a specification.

* Dependencies run one way (the import-linter contract in pyproject.toml):
  cli -> training | shift -> evaluate -> models | losses | data -> recipe -> runtime -> errors.
* No function-local imports of ``balpoe.*``; only ``build`` modules (and the CLI) import the recipe;
  no library error or warning names a command-line flag (only ``cli.py`` knows them).
* One place to extend each kind of thing: a dataset, a backbone, a loss, an adaptation mode --
  a toy entry of each is registered here and a run trains and evaluates through all four.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d
from timm.models import register_model

from balpoe import recipe_from_dict, train
from balpoe.data.bundle import ArraySplit
from balpoe.data.registry import DATASETS, DatasetSpec, register_dataset
from balpoe.losses.build import LOSSES, register_loss
from balpoe.runtime.checkpoint import load_checkpoint
from balpoe.shift.build import ShiftOptions, evaluate_shift
from balpoe.shift.selector import ADAPT_MODES, SelectorResult, register_adapt_mode

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "balpoe"
MODULES = sorted(PACKAGE.rglob("*.py"))


def test_import_contract_is_kept(capsys):
    """import-linter's layers contract (pyproject.toml), run through the installed package (no
    ``lint-imports`` on PATH needed)."""
    from importlinter.cli import lint_imports
    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True)
    out = capsys.readouterr().out
    assert code == 0 and "0 broken" in out, out[-3000:]


def test_help_does_not_load_torch():
    """``balpoe --help`` (and a command's failure to parse) answer without importing torch, timm or
    matplotlib; ``balpoe eval --help`` lists the registered adaptation modes, so it imports them."""
    code = ("import sys, contextlib, io\n"
            "from balpoe.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try:\n        main(['--help'])\n    except SystemExit as e:\n        assert e.code == 0, e.code\n"
            "assert 'train' in out.getvalue() and 'export' in out.getvalue()\n"
            "assert main(['nope']) == 2 and main(['train']) == 2\n"
            "print(sorted(m for m in ('torch', 'timm', 'matplotlib', 'torchvision') if m in sys.modules))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"
    assert "unknown command" not in res.stderr and res.stderr.count("error: ") == 2


def _imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node, node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name


@pytest.mark.parametrize("path", [p for p in MODULES if p.name != "cli.py"], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_function_local_imports_of_the_package(path):
    """Only ``cli.py`` imports inside functions: a command's implementation after its arguments are
    parsed (``test_help_does_not_load_torch``)."""
    tree = ast.parse(path.read_text())
    for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
        for node, module in _imports(fn):
            assert not module.startswith("balpoe"), f"{path.name}:{node.lineno} imports {module} inside {fn.name}()"


def test_only_build_modules_and_the_cli_import_the_recipe():
    allowed = {"build.py", "cli.py", "__init__.py"}
    readers = {p.relative_to(ROOT).as_posix() for p in MODULES
               for _, m in _imports(ast.parse(p.read_text())) if m == "balpoe.recipe"}
    assert readers and all(Path(r).name in allowed for r in readers), sorted(readers)


def test_the_recipe_parser_never_imports_the_schema():
    """``balpoe/recipe/_parse.py`` reads any schema dataclass generically; the schema
    (``balpoe/recipe/__init__.py``) imports the parser, never the reverse."""
    tree = ast.parse((PACKAGE / "recipe" / "_parse.py").read_text())
    relative = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level]
    schema = [m for _, m in _imports(tree) if m == "balpoe.recipe" or m.startswith("balpoe.recipe.")]
    assert not relative and not schema, (relative, schema)
    assert "balpoe.recipe._parse" in {m for _, m in _imports(ast.parse((PACKAGE / "recipe" / "__init__.py").read_text()))}


FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*\b")


def _strings(node: ast.AST) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


@pytest.mark.parametrize("path", [p for p in MODULES if p.name != "cli.py"], ids=lambda p: str(p.relative_to(ROOT)))
def test_library_errors_and_warnings_name_no_cli_flag(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        texts = []
        if isinstance(node, ast.Raise) and node.exc is not None:
            texts = _strings(node.exc)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "warn":
            texts = _strings(node)
        for text in texts:
            assert not FLAG.search(text), f"{path.name}:{node.lineno} names a flag: {text!r}"


# ------------------------------------------------------------------------------------------------
# One place to extend: a toy dataset, backbone, loss and adaptation mode, trained and evaluated


def _toy_reader(cfg, split: str) -> ArraySplit:
    """4 classes of 1x12x12 images: class c is bright in quadrant c (training: 40 per class)."""
    rng = np.random.default_rng(0 if split == "train" else 1)
    n = 40 if split == "train" else 10
    labels = np.repeat(np.arange(4), n)
    images = rng.integers(0, 60, size=(len(labels), 1, 12, 12)).astype(np.uint8)
    for i, c in enumerate(labels):
        images[i, 0, (c // 2) * 6:(c // 2) * 6 + 6, (c % 2) * 6:(c % 2) * 6 + 6] += 150
    return ArraySplit(images, labels, [f"quadrant{c}" for c in range(4)])


class ToyNet(nn.Module):
    """A timm-style backbone whose top-level children run in forward order."""

    def __init__(self, num_classes: int = 4, in_chans: int = 1, **_):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.global_pool = SelectAdaptivePool2d(pool_type="avg", flatten=True)
        self.num_features = 16
        self.fc = nn.Linear(16, num_classes) if num_classes else nn.Identity()

    def forward(self, x):
        return self.fc(self.global_pool(self.body(self.stem(x))))


@register_model
def toy_architecture_net(pretrained: bool = False, **kwargs) -> ToyNet:
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(k, None)
    return ToyNet(**kwargs)


#: what the toy loss's builder was called with: (the recipe's loss section, class counts, taus)
BUILT: list = []


class MeanLogitCE(nn.Module):
    """A toy loss: cross-entropy of the mean expert logits; counts its calls and the epochs it is told."""
    calls = 0
    epochs: list = []

    def set_epoch(self, epoch: int) -> None:
        MeanLogitCE.epochs.append(epoch)

    def forward(self, logits, target):
        MeanLogitCE.calls += 1
        logp = F.log_softmax(logits.float().mean(0), -1)
        return -(target * logp).sum(-1).mean() if target.dim() == 2 else F.nll_loss(logp, target)


@pytest.fixture
def toy_entries():
    register_dataset("toy_quadrants", DatasetSpec(_toy_reader, mean=(0.3,), std=(0.3,)))
    BUILT.clear()
    MeanLogitCE.calls, MeanLogitCE.epochs = 0, []
    register_loss("toy_mean_ce", lambda loss, counts, taus: BUILT.append((loss, counts, taus)) or MeanLogitCE())

    @register_adapt_mode("toy_double", "toy: logits times two (argmax unchanged)")
    def _double(selector, logits, labels, **_):
        return SelectorResult(logits * 2, "toy_double", 1.0, torch.full((4,), 0.25, dtype=torch.float64), 0.5), None
    yield
    DATASETS.pop("toy_quadrants"), LOSSES.pop("toy_mean_ce"), ADAPT_MODES.pop("toy_double")


def test_a_toy_dataset_backbone_loss_and_adaptation_mode_train_and_evaluate(toy_entries, tmp_path):
    recipe = recipe_from_dict({
        "name": "toy", "seed": 0,
        "data": {"dataset": "toy_quadrants", "imb_factor": 4, "many_threshold": 30, "few_threshold": 15,
                 "augment": {"crop_padding": 0, "flip": False, "rotation": 0}},
        "model": {"backbone": "toy_architecture_net", "num_experts": 2, "split": "stem", "head": "linear"},
        "loss": {"name": "toy_mean_ce", "tau": [0.5, 1.5]},
        "optim": {"lr": 0.1, "batch_size": 16, "epochs": 5, "warmup_epochs": 0, "schedule": "constant"},
        "train": {"mixup_alpha": 0.0, "eval_batch_size": 64}})
    report = train(recipe, tmp_path / "run", show_progress=False, report=False)
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["class_names"] == [f"quadrant{c}" for c in range(4)] and ckpt["in_chans"] == 1
    assert ckpt["class_counts"] == [40, 25, 15, 10]          # the LT split of the toy reader: 40 * (1/4)^(i/3)
    assert MeanLogitCE.calls == 5 * 6                         # 90 images, batch 16: 6 steps per epoch
    assert MeanLogitCE.epochs == [0, 1, 2, 3, 4]              # a loss with set_epoch is told each epoch
    (loss, counts, taus), = BUILT                             # the builder gets the recipe's loss section
    assert loss == recipe.loss and counts.tolist() == [40, 25, 15, 10] and taus == [0.5, 1.5]
    assert report["n"] == 40 and report["acc"] > 40           # learnable: chance is 25
    assert timm.is_model("toy_architecture_net")
    options = ShiftOptions(test_dists="forward2,uniform", adapt="toy_double")
    shift = evaluate_shift(tmp_path / "run" / "last.pt", options, device="cpu", plots=False, quiet=True)
    for row in shift["distributions"].values():
        assert row["acc"] == row["acc_before"] and row["temperature"] == 0.5
    assert shift["adapt"] == "toy_double"
