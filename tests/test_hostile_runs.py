"""Hostile run folders and files: a corpus of tampered runs, hostile checkpoint fields, symbolic
links, output-path collisions, concurrent runs and killed lock holders, each through the CLI.

Every refused case must exit with status 2 after exactly one line ``error: ...`` (no traceback)
and leave every file it could touch as it was: the run folder, the planted links' targets and the
files next to them are hashed (content, mtime, kind) before and after.  The CLI runs in-process
(``balpoe.cli.main``); subprocesses only where a second process is the point (the lock).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from balpoe import recipe_from_dict, train
from balpoe.cli import main
from balpoe.runtime.checkpoint import load_checkpoint  # noqa: E402
from balpoe.runtime.checkpoint import atomic_write_text
from balpoe.runtime.files import (LOCK_NAME, RunInUse, RunLock, parse_yaml,
                                  remove_stale_temporaries)
from balpoe.errors import BalpoeError

#: how many refused cases the corpus below runs (checked, so that a silently shrinking corpus fails)
EXPECTED_CASES = 149


def _recipe(root, **optim) -> dict:
    return {
        "name": "hostile", "seed": 3,
        "data": {"dataset": "cifar10", "root": str(root), "imb_factor": 10, "many_threshold": 30,
                 "few_threshold": 10, "augment": {"crop_padding": 2, "rotation": 10}},
        "model": {"backbone": "small_cnn", "num_experts": 2, "split": "layer1", "kwargs": {"widths": [8, 16, 16]}},
        "loss": {"tau": [0.5, 1.5]},
        "optim": {"lr": 0.05, "batch_size": 32, "epochs": 1, "warmup_epochs": 0, "schedule": "cosine", **optim},
        "train": {"mixup_alpha": 0.0, "checkpoint_every": 1, "eval_batch_size": 64},
    }


@pytest.fixture(scope="module")
def finished(cifar_root, tmp_path_factory) -> Path:
    """A finished one-epoch run (last.pt, recipe.yaml, metrics.jsonl, eval.json, report.html)."""
    out = tmp_path_factory.mktemp("hostile") / "run"
    train(recipe_from_dict(_recipe(cifar_root)), out, show_progress=False)
    return out


@dataclass
class World:
    """A private copy of the finished run (``run``), a second run folder (``other``), an image,
    a recipe file, the data root and a file outside every run (``secret``)."""
    tmp: Path
    run: Path
    other: Path
    image: Path
    recipe: Path
    data: Path
    secret: Path


@pytest.fixture
def world(finished, cifar_root, tmp_path) -> World:
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    other = Path(shutil.copytree(finished, tmp_path / "other"))
    image = tmp_path / "img.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(image)
    recipe = tmp_path / "recipe_in.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(cifar_root)))
    secret = tmp_path / "secret.txt"
    secret.write_text("do not publish\n")
    return World(tmp_path, run, other, image, recipe, Path(cifar_root), secret)


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: kind, content hash, mtime (links: their target, not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            if p.is_symlink():
                out[str(p.relative_to(root))] = ("link", os.readlink(p))
            elif p.is_dir():
                out[str(p.relative_to(root))] = ("dir",)
            else:
                out[str(p.relative_to(root))] = ("file", hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mtime_ns)
    return out


def _refused(argv: list[str], capsys, root: Path, *, contains: str | tuple = ()) -> str:
    """Run the CLI in-process: exit 2, exactly one ``error:`` line, no traceback, nothing under
    ``root`` created, changed or removed.  Returns the line."""
    before = _snapshot(root)
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    err = captured.err
    assert code == 2, (argv, err, captured.out[-2000:])
    assert err.startswith("error: ") and err.count("\n") == 1 and err.endswith("\n"), (argv, err)
    assert "Traceback" not in err + captured.out
    for text in (contains,) if isinstance(contains, str) else contains:
        assert text in err, (argv, err)
    assert _snapshot(root) == before, argv
    return err


# ------------------------------------------------------------------------------------------------
# The corpus: each case prepares the world (plants links, tampers files) and names the command


@dataclass(frozen=True)
class Case:
    name: str
    setup: Callable[[World], list[str]]          # -> argv (after the world is prepared)
    contains: tuple[str, ...] = ()
    extra: tuple = field(default=())


CASES: list[Case] = []


def case(name: str, *contains: str):
    def register(fn):
        CASES.append(Case(name, fn, contains))
        return fn
    return register


# ---- output paths that would destroy a run or an input ------------------------------------------

_COLLISIONS = [
    ("eval-out-is-the-checkpoint", lambda w: ["eval", f"{w.run}/last.pt", "--device", "cpu", "--out", f"{w.run}/last.pt"],
     "is a file this command reads"),
    ("eval-out-metrics", lambda w: ["eval", f"{w.run}/last.pt", "--device", "cpu", "--out", f"{w.run}/metrics.jsonl"],
     "run's own metrics.jsonl"),
    ("eval-out-recipe", lambda w: ["eval", f"{w.run}/last.pt", "--device", "cpu", "--out", f"{w.run}/recipe.yaml"],
     "run's own recipe.yaml"),
    ("eval-out-report", lambda w: ["eval", f"{w.run}/last.pt", "--device", "cpu", "--out", f"{w.run}/report.html"],
     "run's own report.html"),
    ("eval-out-best", lambda w: ["eval", f"{w.run}/last.pt", "--device", "cpu", "--out", f"{w.run}/best.pt"],
     "run's own best.pt"),
    ("eval-into-another-runs-eval-json",
     lambda w: ["eval", f"{w.run}/last.pt", "--device", "cpu", "--out", f"{w.other}/eval.json"], "run's own eval.json"),
    ("shift-eval-into-another-run",
     lambda w: ["eval", f"{w.run}/last.pt", "--device", "cpu", "--test-dists", "uniform", "--out", str(w.other)],
     "run's own shift_eval.json"),
    ("predict-out-is-the-checkpoint",
     lambda w: ["predict", f"{w.run}/last.pt", str(w.image), "--device", "cpu", "--out", f"{w.run}/last.pt"],
     "is a file this command reads"),
    ("predict-out-is-an-input-image",
     lambda w: ["predict", f"{w.run}/last.pt", str(w.image), "--device", "cpu", "--out", str(w.image)],
     "is a file this command reads"),
    ("predict-out-eval-json",
     lambda w: ["predict", f"{w.run}/last.pt", str(w.image), "--device", "cpu", "--out", f"{w.run}/eval.json"],
     "run's own eval.json"),
    ("predict-out-other-runs-checkpoint",
     lambda w: ["predict", f"{w.run}/last.pt", str(w.image), "--device", "cpu", "--out", f"{w.other}/last.pt"],
     "run's own last.pt"),
    ("predict-out-is-the-prior-file",
     lambda w: (w.tmp / "prior.txt").write_text("1\n" * 10) and
     ["predict", f"{w.run}/last.pt", str(w.image), "--device", "cpu", "--prior", str(w.tmp / "prior.txt"),
      "--out", str(w.tmp / "prior.txt")], "is a file this command reads"),
    ("report-out-checkpoint", lambda w: ["report", str(w.run), "--out", f"{w.run}/last.pt"], "run's own last.pt"),
    ("report-out-metrics", lambda w: ["report", str(w.run), "--out", f"{w.run}/metrics.jsonl"], "is a file this command reads"),
    ("report-out-eval-json", lambda w: ["report", str(w.run), "--out", f"{w.run}/eval.json"], "is a file this command reads"),
    ("report-out-other-runs-report", lambda w: ["report", str(w.run), "--out", f"{w.other}/report.html"],
     "run's own report.html"),
    ("report-png-recipe", lambda w: ["report", str(w.run), "--png", f"{w.run}/recipe.yaml"], "is a file this command reads"),
    ("report-png-checkpoint", lambda w: ["report", str(w.run), "--png", f"{w.run}/last.pt"], "run's own last.pt"),
    ("report-png-is-the-page", lambda w: ["report", str(w.run), "--png", f"{w.run}/report.html"],
     "is a file this command reads"),
    ("export-out-checkpoint",
     lambda w: ["export", f"{w.run}/last.pt", "--format", "safetensors", "--out", f"{w.run}/last.pt"],
     "is a file this command reads"),
    ("export-out-best", lambda w: ["export", f"{w.run}/last.pt", "--format", "torchscript", "--out", f"{w.run}/best.pt"],
     "run's own best.pt"),
    ("export-out-recipe", lambda w: ["export", f"{w.run}/last.pt", "--format", "safetensors", "--out",
                                     f"{w.run}/recipe.yaml"], "run's own recipe.yaml"),
    ("eval-out-name-too-long",
     lambda w: ["eval", f"{w.run}/last.pt", "--device", "cpu", "--out", str(w.tmp / ("x" * 300) / "e.json")],
     "longer than 255 bytes"),
]
for _name, _argv, _msg in _COLLISIONS:
    CASES.append(Case(_name, _argv, (_msg,)))


# ---- symbolic links at destinations and at run files that are read -------------------------------

def _link(at: Path, to: Path) -> None:
    if at.exists() or at.is_symlink():
        at.unlink()
    at.symlink_to(to)


@case("report-html-is-a-link", "symbolic link")
def _(w):
    _link(w.run / "report.html", w.secret)
    return ["report", str(w.run)]


@case("report-png-is-a-link", "symbolic link")
def _(w):
    _link(w.tmp / "shot.png", w.secret)
    return ["report", str(w.run), "--png", str(w.tmp / "shot.png")]


@case("predict-out-is-a-link", "symbolic link")
def _(w):
    _link(w.tmp / "pred.jsonl", w.secret)
    return ["predict", f"{w.run}/last.pt", str(w.image), "--device", "cpu", "--out", str(w.tmp / "pred.jsonl")]


@case("eval-out-is-a-link", "symbolic link")
def _(w):
    _link(w.tmp / "e.json", w.secret)
    return ["eval", f"{w.run}/last.pt", "--device", "cpu", "--out", str(w.tmp / "e.json")]


@case("eval-default-eval-json-is-a-link", "symbolic link")
def _(w):
    _link(w.run / "eval.json", w.secret)
    return ["eval", f"{w.run}/last.pt", "--device", "cpu"]


@case("export-out-is-a-link", "symbolic link")
def _(w):
    _link(w.tmp / "m.safetensors", w.secret)
    return ["export", f"{w.run}/last.pt", "--format", "safetensors", "--out", str(w.tmp / "m.safetensors")]


@case("recipe-yaml-is-a-link-to-a-secret", "symbolic link")
def _(w):
    _link(w.run / "recipe.yaml", w.secret)
    return ["report", str(w.run)]


@case("eval-json-is-a-link", "symbolic link")
def _(w):
    _link(w.run / "eval.json", w.secret)
    return ["report", str(w.run)]


@case("metrics-jsonl-is-a-link", "symbolic link")
def _(w):
    _link(w.run / "metrics.jsonl", w.secret)
    return ["report", str(w.run)]


@case("resume-with-last-pt-a-link", "symbolic link")
def _(w):
    (w.tmp / "elsewhere.pt").write_bytes((w.run / "last.pt").read_bytes())
    _link(w.run / "last.pt", w.tmp / "elsewhere.pt")
    return ["train", str(w.recipe), "--out", str(w.run), "--resume", "--no-progress"]


@case("resume-with-metrics-a-link", "symbolic link")
def _(w):
    _link(w.run / "metrics.jsonl", w.secret)
    return ["train", str(w.recipe), "--out", str(w.run), "--resume", "--no-progress"]


@case("resume-with-recipe-yaml-a-directory", "not a regular file")
def _(w):
    (w.run / "recipe.yaml").unlink()
    (w.run / "recipe.yaml").mkdir()
    return ["train", str(w.recipe), "--out", str(w.run), "--resume", "--no-progress"]


# ---- tampered run files read by the report ----------------------------------------------------

_TAMPERED = [
    ("eval-json-infinity", "eval.json", b'{"epoch": Infinity}', "no NaN or Infinity"),
    ("eval-json-nan", "eval.json", b'{"acc": NaN}', "no NaN or Infinity"),
    ("eval-json-not-utf8", "eval.json", b'{"acc": "\xff\xfe"}', "not UTF-8"),
    ("eval-json-deeply-nested", "eval.json", b"[" * 200_000, "nested too deeply"),
    ("eval-json-nested-beyond-bound", "eval.json", b'{"a": ' + b"[" * 100 + b"]" * 100 + b"}", "nested more than"),
    ("eval-json-a-list", "eval.json", b"[1, 2]", "expected a JSON object"),
    ("eval-json-truncated", "eval.json", b'{"acc": 1', "malformed JSON"),
    ("metrics-line-infinity", "metrics.jsonl", b'{"epoch": 1, "loss": Infinity}\n', "no NaN or Infinity"),
    ("metrics-line-deeply-nested", "metrics.jsonl", b"[" * 200_000 + b"\n", "nested too deeply"),
    ("metrics-not-utf8", "metrics.jsonl", b'{"epoch": 1}\n\xc3\x28\n', "not UTF-8"),
    ("shift-eval-a-string", "shift_eval.json", b'"x"', "expected a JSON object"),
    ("shift-eval-infinity", "shift_eval.json", b'{"curves": -Infinity}', "no NaN or Infinity"),
    ("recipe-duplicate-key", "recipe.yaml", b"name: a\noptim:\n  lr: 0.05\n  lr: 99\n", "the key 'lr' appears twice"),
    ("recipe-duplicate-section", "recipe.yaml", b"optim: {lr: 1}\nname: a\noptim: {lr: 2}\n",
     "the key 'optim' appears twice"),
    ("recipe-alias-bomb", "recipe.yaml",
     b'a: &a ["x","x","x","x","x","x","x","x","x"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n'
     b'c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n'
     b'f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\ng: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\nh: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]\n'
     b'data: {dataset: *h}\n', "each use of a YAML alias counts"),
    ("recipe-not-utf8", "recipe.yaml", b"name: \xff\n", "not UTF-8"),
    ("recipe-too-large", "recipe.yaml", b"#" * (2 << 20), "at most"),
    ("recipe-deeply-nested", "recipe.yaml", b"a: " + b"[" * 20_000, "nested too deeply"),
]
for _name, _file, _bytes, _msg in _TAMPERED:
    def _setup(w, _file=_file, _bytes=_bytes):
        (w.run / _file).write_bytes(_bytes)
        return ["report", str(w.run)]
    CASES.append(Case(_name, _setup, (_msg,)))


@case("eval-json-a-directory", "is a directory")
def _(w):
    (w.run / "eval.json").unlink()
    (w.run / "eval.json").mkdir()
    return ["report", str(w.run)]


# ---- hostile checkpoint fields: eval, predict and export read every field --------------------------

_FIELDS = [
    ("num-classes-negative", {"num_classes": -3}, "'num_classes' must be an integer"),
    ("num-classes-huge", {"num_classes": 10 ** 9}, "'num_classes' must be an integer"),
    ("num-classes-string", {"num_classes": "10"}, "'num_classes' must be an integer"),
    ("in-chans-zero", {"in_chans": 0}, "'in_chans' must be an integer"),
    ("epoch-string", {"epoch": "seven"}, "'epoch' must be an integer"),
    ("epoch-negative", {"epoch": -1}, "'epoch' must be an integer"),
    ("counts-nan", {"class_counts": [float("nan")] * 10}, "'class_counts'[0] must be an integer"),
    ("counts-strings", {"class_counts": ["a"] * 10}, "'class_counts'[0] must be an integer"),
    ("counts-nested", {"class_counts": [[1]] * 10}, "'class_counts'[0] must be an integer"),
    ("counts-zero", {"class_counts": [0] * 10}, "'class_counts'[0] must be an integer >= 1"),
    ("counts-negative", {"class_counts": [5] * 9 + [-1]}, "'class_counts'[9] must be an integer >= 1"),
    ("counts-too-many", {"class_counts": [1] * 100_000}, "must have 10 values, got 100000"),
    ("counts-a-number", {"class_counts": 5}, "'class_counts' must be a list"),
    ("counts-2d-tensor", {"class_counts": torch.ones(10, 2, dtype=torch.int64)}, "tensor of shape (10, 2)"),
    ("class-names-a-number", {"class_names": 5}, "'class_names' must be a list of 10 names"),
    ("class-names-short", {"class_names": ["a", "b"]}, "'class_names' must be a list of 10 names"),
    ("mean-a-string", {"mean": "abc"}, "'mean' must be a list"),
    ("std-zero", {"std": [0.0, 0.0, 0.0]}, "'std'[0] must be a finite number > 0"),
    ("std-nan", {"std": [float("nan")] * 3}, "'std'[0] must be a finite number"),
    ("mean-wrong-length", {"mean": [0.5]}, "'mean' must have 3 values"),
    ("input-size-huge", {"input_size": [3, 10 ** 6, 10 ** 6]}, "'input_size'[1] must be an integer"),
    ("input-size-channels", {"input_size": [1, 32, 32]}, "'input_size' has 1 channels"),
    ("image-files-a-string", {"image_files": "yes"}, "'image_files' must be true or false"),
    ("recipe-a-number", {"recipe": 5}, "'recipe' must be a mapping"),
    ("model-not-tensors", {"model": {"w": "x"}}, "must map parameter names to tensors"),
]


def _tampered_checkpoint(w: World, change) -> Path:
    ckpt = torch.load(w.run / "last.pt", weights_only=True)
    if callable(change):
        change(ckpt)
    else:
        ckpt.update(change)
    path = w.tmp / "tampered.pt"
    torch.save(ckpt, path)
    return path


def _nan_weights(ckpt):
    k = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    ckpt["model"][k] = ckpt["model"][k].clone().fill_(float("nan"))


def _inf_weights(ckpt):
    k = [k for k, v in ckpt["model"].items() if v.is_floating_point()][-1]
    ckpt["model"][k] = ckpt["model"][k].clone().fill_(float("inf"))


_FIELDS += [("weights-nan", _nan_weights, "are not finite"), ("weights-inf", _inf_weights, "are not finite")]

for _name, _change, _msg in _FIELDS:
    CASES.append(Case(f"eval-{_name}", lambda w, c=_change: ["eval", str(_tampered_checkpoint(w, c)), "--device", "cpu",
                                                             "--out", str(w.tmp / "e.json")], (_msg, "tampered.pt")))
    CASES.append(Case(f"predict-{_name}", lambda w, c=_change: ["predict", str(_tampered_checkpoint(w, c)),
                                                                str(w.image), "--device", "cpu", "--out",
                                                                str(w.tmp / "p.jsonl")], (_msg, "tampered.pt")))
for _name, _change, _msg in _FIELDS[:4]:
    CASES.append(Case(f"export-{_name}", lambda w, c=_change: ["export", str(_tampered_checkpoint(w, c)), "--format",
                                                               "safetensors"], (_msg,)))


# ---- hostile resume states: refused before anything in the run folder changes ----------------------

def _resume_with(change) -> Callable[[World], list[str]]:
    def setup(w):
        ckpt = torch.load(w.run / "last.pt", weights_only=True)
        change(ckpt)
        torch.save(ckpt, w.run / "last.pt")
        return ["train", str(w.recipe), "--out", str(w.run), "--resume", "--set", "optim.epochs=2", "--no-progress"]
    return setup


def _wrong_momentum(ckpt):
    state = ckpt["optimizer"]["state"]
    first = next(iter(state))
    state[first]["momentum_buffer"] = torch.zeros(7, 7)


_RESUME = [
    ("resume-optimizer-state-a-number", lambda c: c["optimizer"].update(state=5), "'optimizer' must be an optimizer"),
    ("resume-optimizer-wrong-shape", _wrong_momentum, "has shape (7, 7)"),
    ("resume-optimizer-nan", lambda c: [v.fill_(float("nan")) for s in c["optimizer"]["state"].values()
                                        for v in s.values() if torch.is_tensor(v) and v.is_floating_point()],
     "is not finite"),
    ("resume-optimizer-too-few-groups", lambda c: c["optimizer"].update(param_groups=[]), "optimizer state does not fit"),
    ("resume-rng-torch-short", lambda c: c["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)),
     "random-number states do not restore"),
    ("resume-rng-python-garbage", lambda c: c["rng"].update(python=(3, ("x",) * 625, None)), "'rng' must hold"),
    ("resume-rng-numpy-garbage", lambda c: c["rng"].update(numpy={"keys": torch.zeros(3)}), "'rng' must hold"),
    ("resume-scheduler-a-list", lambda c: c.update(scheduler=[1]), "'scheduler' must be a mapping"),
    ("resume-epoch-beyond-the-recipe", lambda c: c.update(epoch=50), "already reached epoch 50"),
]
for _name, _change, _msg in _RESUME:
    CASES.append(Case(_name, _resume_with(_change), (_msg,)))


# ---- weights files (safetensors) with hostile metadata ---------------------------------------------

def _weights_with(**meta) -> Callable[[World], list[str]]:
    def setup(w):
        ckpt = load_checkpoint(w.run / "last.pt")
        fields = {k: json.dumps(ckpt.get(k)) for k in ("recipe", "epoch", "num_classes", "in_chans", "class_counts",
                                                         "mean", "std", "class_names", "input_size",
                                                         "image_files")}
        fields.update(meta)
        path = w.tmp / "w.safetensors"
        save_file({k: v.contiguous() for k, v in ckpt["model"].items()}, str(path),
                  metadata={"format": "balpoe-weights", **fields})
        return ["predict", str(path), str(w.image), "--device", "cpu", "--out", str(w.tmp / "p.jsonl")]
    return setup


CASES += [
    Case("weights-num-classes-huge", _weights_with(num_classes="1e9"), ("'num_classes' must be an integer",)),
    Case("weights-counts-a-string", _weights_with(class_counts='"abc"'), ("'class_counts' must be a list",)),
    Case("weights-std-nan", _weights_with(std="NaN"), ("no NaN or Infinity",)),
    Case("weights-mean-malformed", _weights_with(mean="[0.5,"), ("malformed JSON",)),
    Case("weights-nested", _weights_with(class_names="[" * 100_000), ("nested too deeply",)),
]


# ---- train: refusals before anything is created or replaced ----------------------------------------

def _recipe_file(w: World, raw: dict, name: str = "r.yaml") -> Path:
    path = w.tmp / name
    path.write_text(yaml.safe_dump(raw))
    return path


@case("train-into-a-run-that-stopped-before-its-checkpoint", "stopped before its first checkpoint", "--resume auto")
def _(w):
    (w.run / "last.pt").unlink()
    (w.run / "eval.json").unlink()
    return ["train", str(w.recipe), "--out", str(w.run), "--no-progress"]


@case("train-auto-into-results-without-checkpoint", "holds results (eval.json)")
def _(w):
    (w.run / "last.pt").unlink()
    return ["train", str(w.recipe), "--out", str(w.run), "--resume", "auto", "--no-progress"]


@case("train-into-eval-json-only", "holds results (eval.json)")
def _(w):
    folder = w.tmp / "evalonly"
    folder.mkdir()
    (folder / "eval.json").write_text("{}")
    return ["train", str(w.recipe), "--out", str(folder), "--no-progress"]


@case("resume-with-other-data", "differ from those", "training class counts")
def _(w):
    from formats import write_cifar
    other = write_cifar(w.tmp / "otherdata", 10, 30, 4, seed=1)
    return ["train", str(w.recipe), "--out", str(w.run), "--resume", "--set", f"data.root={other}", "--no-progress"]


@case("train-missing-pretrained-file", "model.pretrained_file", "not found")
def _(w):
    raw = _recipe(w.data)
    raw["model"]["pretrained_file"] = str(w.tmp / "missing.pt")
    return ["train", str(_recipe_file(w, raw)), "--out", str(w.tmp / "new"), "--no-progress"]


@case("train-pretrained-file-not-weights", "model.pretrained_file")
def _(w):
    raw = _recipe(w.data)
    raw["model"]["pretrained_file"] = str(w.secret)
    return ["train", str(_recipe_file(w, raw)), "--out", str(w.tmp / "new"), "--no-progress"]


@case("train-stage2-missing-init-checkpoint", "stage2.init_checkpoint")
def _(w):
    raw = _recipe(w.data)
    raw["stage"] = 2
    raw["stage2"] = {"init_checkpoint": str(w.tmp / "missing" / "last.pt")}
    return ["train", str(_recipe_file(w, raw)), "--out", str(w.tmp / "new"), "--no-progress"]


@case("train-stage2-tampered-init-checkpoint", "stage2.init_checkpoint", "'class_counts'")
def _(w):
    raw = _recipe(w.data)
    raw["stage"] = 2
    raw["stage2"] = {"init_checkpoint": str(_tampered_checkpoint(w, {"class_counts": [-1] * 10}))}
    return ["train", str(_recipe_file(w, raw)), "--out", str(w.tmp / "new"), "--no-progress"]


@case("train-device-meta", "recipe key 'train.device' is not a device name")
def _(w):
    return ["train", str(w.recipe), "--set", "train.device=meta", "--out", str(w.tmp / "new"), "--no-progress"]


@case("train-missing-test-image", "not found", "n00000002_1.JPEG")
def _(w):
    from formats import write_image_list
    root = write_image_list(w.tmp / "lists", "imagenet_lt", 3, [6, 4, 3], 2, size=8)
    lines = (root / "ImageNet_LT_test.txt").read_text().splitlines()
    (root / lines[-1].split()[0]).unlink()          # one test image is gone
    raw = _recipe(root)
    raw["data"] = {"dataset": "image_list", "root": str(root), "train_list": "ImageNet_LT_train.txt",
                   "test_list": "ImageNet_LT_test.txt", "image_size": 8, "num_workers": 0}
    return ["train", str(_recipe_file(w, raw)), "--out", str(w.tmp / "new"), "--no-progress"]


@case("train-foreign-test-image-on-disk", "cannot decode image", "n00000002_1.JPEG")
def _(w):
    """A test image that is not an image (its header), in a dataset read from disk per epoch: found
    before --out is created, not after training."""
    from formats import write_image_list
    root = write_image_list(w.tmp / "lists", "imagenet_lt", 3, [6, 4, 3], 2, size=8)
    lines = (root / "ImageNet_LT_test.txt").read_text().splitlines()
    (root / lines[-1].split()[0]).write_text("not an image\n")
    raw = _recipe(root)
    raw["data"] = {"dataset": "image_list", "root": str(root), "train_list": "ImageNet_LT_train.txt",
                   "test_list": "ImageNet_LT_test.txt", "image_size": 8, "num_workers": 0, "in_memory": False}
    return ["train", str(_recipe_file(w, raw)), "--out", str(w.tmp / "new"), "--no-progress"]


@case("train-out-name-too-long", "File name too long")
def _(w):
    return ["train", str(w.recipe), "--out", str(w.tmp / ("y" * 300)), "--no-progress"]


@case("recipe-file-duplicate-key", "line 4: the key 'lr' appears twice")
def _(w):
    path = w.tmp / "dup.yaml"
    path.write_text("name: a\noptim:\n  lr: 0.05\n  lr: 99\n")
    return ["train", str(path), "--out", str(w.tmp / "new"), "--no-progress"]


# ---- command-line values --------------------------------------------------------------------------

_VALUES = [
    ("seed-negative", ["--test-dists", "uniform", "--seed", "-1"], "expected an integer in [0, 2**32)"),
    ("dirichlet-seed-negative", ["--prior", "dirichlet:forward10:100:-1"], "the seed must be an integer"),
    ("dirichlet-concentration-nan", ["--prior", "dirichlet:forward10:nan:0"], "concentration must be > 0 and finite"),
    ("labels-per-class-nan", ["--adapt", "labelled", "--labels-per-class", "nan"], "expected a finite number > 0"),
    ("labels-per-class-inf", ["--adapt", "labelled", "--labels-per-class", "inf"], "expected a finite number > 0"),
    ("prior-overflow", ["--prior", ",".join(["1e308"] * 10)], "overflow"),
    ("device-meta", ["--device", "meta"], "not a device name: 'meta'"),
]
for _name, _extra, _msg in _VALUES:
    CASES.append(Case(f"eval-{_name}", lambda w, e=_extra: ["eval", f"{w.run}/last.pt", *e, "--out",
                                                            str(w.tmp / "shift")], (_msg,)))
CASES += [
    Case("predict-prior-overflow", lambda w: ["predict", f"{w.run}/last.pt", str(w.image), "--device", "cpu",
                                              "--prior", ",".join(["1e308"] * 10), "--out", str(w.tmp / "p.jsonl")],
         ("overflow",)),
    Case("predict-device-meta", lambda w: ["predict", f"{w.run}/last.pt", str(w.image), "--device", "meta",
                                           "--out", str(w.tmp / "p.jsonl")], ("not a device name",)),
    Case("predict-checkpoint-name-too-long", lambda w: ["predict", str(w.tmp / ("z" * 300 + ".pt")), str(w.image)],
         ("File name too long",)),
]


def test_the_corpus_has_the_expected_size():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names)) == EXPECTED_CASES


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_hostile_case_is_one_line_and_changes_nothing(c: Case, world: World, capsys):
    argv = c.setup(world)
    _refused(argv, capsys, world.tmp, contains=c.contains)


# ------------------------------------------------------------------------------------------------
# What must still work next to hostile files


def test_a_planted_link_at_a_temporary_name_is_never_written_through(world, capsys):
    target = world.tmp / "target"
    for name in ("report.html.tmp", f".report.html.tmp-{os.getpid()}", ".eval.json.tmp"):
        (world.run / name).symlink_to(target)
    assert main(["report", str(world.run)]) == 0
    assert not target.exists() and (world.run / "report.html").is_file() and not (world.run / "report.html").is_symlink()


def test_a_symlinked_recipe_never_reaches_the_report(world):
    (world.run / "recipe.yaml").unlink()
    (world.run / "recipe.yaml").symlink_to(world.secret)
    with pytest.raises(BalpoeError, match="symbolic link"):
        from balpoe.evaluate.run_report import report_sections
        report_sections(world.run)
    assert "do not publish" not in (world.run / "report.html").read_text()


def test_duplicate_yaml_keys_are_refused_and_merge_keys_are_not_duplicates():
    with pytest.raises(BalpoeError, match=r"line 3: the key 'lr' appears twice"):
        parse_yaml("optim:\n  lr: 1\n  lr: 2\n", "x.yaml")
    assert parse_yaml("base: &b {lr: 1, epochs: 2}\noptim:\n  <<: *b\n  lr: 3\n", "x.yaml")["optim"] == {"lr": 3,
                                                                                                        "epochs": 2}


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "eval.json"
    atomic_write_text("old\n", path)
    real = os.fsync

    def full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(BalpoeError, match=r"cannot write '.*eval.json' \(No space left on device\)"):
        atomic_write_text("new\n", path)
    monkeypatch.setattr(os, "fsync", real)
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]


def test_out_of_disk_during_a_command_is_one_line(world, capsys, monkeypatch):
    def full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    err = _refused(["predict", f"{world.run}/last.pt", str(world.image), "--device", "cpu", "--out",
                    str(world.tmp / "p.jsonl")], capsys, world.tmp)
    assert "No space left on device" in err and "p.jsonl" in err


def test_a_killed_exports_temporary_file_is_removed_by_the_next_export(world, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = world.run / f".last.safetensors.tmp-{pid}-abcd_123.safetensors"
    stale.write_bytes(b"partial")
    legacy = world.run / f".last.tmp-{pid}.safetensors"      # the name exports used before
    legacy.write_bytes(b"partial")
    assert main(["export", f"{world.run}/last.pt", "--format", "safetensors"]) == 0
    assert not stale.exists() and (world.run / "last.safetensors").is_file()
    assert not legacy.exists()
    assert remove_stale_temporaries(world.run) == []


# ------------------------------------------------------------------------------------------------
# One writer per run folder: the lock, a second process, a killed holder

HOLD = r"""
import sys, time
from pathlib import Path
from balpoe.runtime.files import RunLock
lock = RunLock(sys.argv[1]).acquire()
Path(sys.argv[2]).touch()
time.sleep(120)
"""


def _start_holder(folder: Path, marker: Path, code: str = HOLD, args: tuple = ()) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder), str(marker), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the holder never took the lock"
        time.sleep(0.05)
    return proc


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


def test_the_lock_of_a_killed_process_is_released(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    holder = _start_holder(folder, tmp_path / "held")
    try:
        with pytest.raises(RunInUse, match=f"in use by another training run \\(process {holder.pid}\\)"):
            RunLock(folder).acquire()
    finally:
        _kill(holder)
    assert (folder / LOCK_NAME).exists()             # the killed holder's file is still there ...
    with RunLock(folder):                            # ... and its lock went with the process
        with pytest.raises(RunInUse):
            RunLock(folder).acquire()                # one holder at a time, within a process too
    assert not (folder / LOCK_NAME).exists()


TRAIN_AND_HANG = r"""
import sys, time
from pathlib import Path
from balpoe.data.device_loader import DeviceLoader
orig = DeviceLoader.__iter__
def it(self):
    for i, batch in enumerate(orig(self)):
        if self.train and i == 1:
            Path(sys.argv[2]).touch()
            time.sleep(120)
        yield batch
DeviceLoader.__iter__ = it
from balpoe.cli import main
sys.exit(main(["train", sys.argv[3], "--out", sys.argv[1], "--no-progress", "--no-report"]))
"""


def test_a_second_train_into_a_running_folder_is_refused(world, capsys):
    out = world.tmp / "busy"
    holder = _start_holder(out, world.tmp / "training", TRAIN_AND_HANG, (str(world.recipe),))
    try:
        # 'auto' would start the unfinished run again: the lock refuses it while the first one runs
        err = _refused(["train", str(world.recipe), "--out", str(out), "--resume", "auto", "--no-progress"], capsys,
                       world.tmp, contains=("in use by another training run", f"process {holder.pid}"))
        assert "Traceback" not in err
        _refused(["train", str(world.recipe), "--out", str(out), "--no-progress"], capsys, world.tmp,
                 contains="stopped before its first checkpoint")
    finally:
        _kill(holder)
    # the first run was killed: its lock is gone and the run starts again
    assert main(["train", str(world.recipe), "--out", str(out), "--resume", "auto", "--no-progress",
                 "--no-report"]) == 0
    assert load_checkpoint(out / "last.pt")["epoch"] == 1 and not (out / LOCK_NAME).exists()
    assert math.isfinite(json.loads((out / "eval.json").read_text())["acc"])
