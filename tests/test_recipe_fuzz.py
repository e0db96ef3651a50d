"""Fuzzed recipes: hundreds of broken variants of the shipped CPU demo recipe, each through the CLI.

The variants come from a deterministic generator: unknown keys at every level, wrong types and
out-of-range / non-finite numbers at every key, wrong list lengths, broken cross-key rules,
garbage / truncated / non-UTF-8 bytes, YAML alias bombs, bad ``--set`` overrides and recipe paths
that are directories, missing, FIFOs or impossible names.  Every variant is invalid, so nothing
trains: ``balpoe train`` must exit with status 2 after exactly one line ``error: ...`` (at most 400
characters, no traceback), within 2 s, without writing to the output directory.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import random
import subprocess
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

import balpoe.training.build as training_build
from balpoe.cli import main
from balpoe.recipe import (AugmentConfig, DataConfig, LossConfig, ModelConfig, OptimConfig, Recipe, Stage2Config,
                           TrainConfig)

ROOT = Path(__file__).resolve().parents[1]
BASE_PATH = ROOT / "recipes" / "balpoe" / "fashion_mnist_lt_ir100_cpu_demo.yaml"
BASE_TEXT = BASE_PATH.read_text()
BASE = yaml.safe_load(BASE_TEXT)
SECTIONS = {"": Recipe, "data": DataConfig, "data.augment": AugmentConfig, "model": ModelConfig, "loss": LossConfig,
            "optim": OptimConfig, "train": TrainConfig, "stage2": Stage2Config}
MAX_LINE = 400
MAX_SECONDS = 2.0


@dataclass(frozen=True)
class Variant:
    """One broken recipe: ``content`` written to ``recipe.yaml`` (``path`` says what the recipe
    path is instead, for ``dir``, ``missing``, ...), then ``balpoe train`` with ``overrides``."""
    name: str
    content: bytes = b""
    path: str = "file"
    overrides: tuple[str, ...] = ()


def _dump(raw: dict) -> bytes:
    return yaml.safe_dump(raw, sort_keys=False, allow_unicode=True).encode()


def _with(key: str, value, raw: dict | None = None) -> dict:
    """A deep copy of ``raw`` (default: the base recipe) with the dotted ``key`` set to ``value``."""
    raw = copy.deepcopy(BASE if raw is None else raw)
    node = raw
    *sections, last = key.split(".")
    for s in sections:
        node = node.setdefault(s, {})
    node[last] = value
    return raw


def _leaves():
    """(dotted key, type, field metadata) of every non-section recipe key."""
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not dataclasses.is_dataclass(hints[f.name]):
                yield (f"{section}.{f.name}" if section else f.name), hints[f.name], f.metadata


def _wrong_values(tp) -> list:
    """Values of the wrong type for a key of type ``tp``."""
    optional = typing.get_origin(tp) is typing.Union and type(None) in typing.get_args(tp)
    inner = next(a for a in typing.get_args(tp) if a is not type(None)) if optional else tp
    extra = [] if optional else [None]
    if inner is bool:
        return ["maybe", 1, 0.0, [True], {"a": 1}] + extra
    if typing.get_origin(inner) is typing.Union and set(typing.get_args(inner)) == {bool, str}:
        return [1, 0.0, [True], {"a": 1}] + extra   # true, false or one of the key's words
    if inner is int:
        return ["fast", 2.5, True, [1], {"a": 1}, "1e", "2.5e0"] + extra
    if inner is float:
        return ["fast", True, [1.0], {"a": 1}, "1e", "0x1p3", "nan"] + extra
    if inner is str:
        return [5, 1.5, True, ["a"], {"a": "b"}] + extra
    if inner is dict:
        return ["abc", [1], 5, True] + extra
    if typing.get_origin(inner) is list:
        item = typing.get_args(inner)[0]
        return ["160", 5, {"a": 1}, [1.5] if item is int else [0, "x", 2], [[1], 2, 3], [True, 1, 2]] + extra
    raise AssertionError(f"no wrong values for {tp}")


def _nested_list(depth: int) -> list:
    value: list = [1]
    for _ in range(depth - 1):
        value = [value]
    return value


def _alias_chain(levels: int = 9, width: int = 9) -> str:
    """A YAML flow list whose last item expands to ``width ** levels`` strings ("billion laughs")."""
    items = ["&a0 [" + ", ".join(["lol"] * width) + "]"]
    items += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels + 1)]
    return "[" + ", ".join(items) + "]"


def _yaml_at(key: str, value_text: str) -> bytes:
    """The base recipe plus ``key: <value_text>`` (raw YAML) under its sections."""
    *sections, last = key.split(".")
    raw = copy.deepcopy(BASE)
    raw.pop(sections[0] if sections else last, None)  # the key's top-level section comes as text, below
    head = "".join(f"{'  ' * i}{s}:\n" for i, s in enumerate(sections))
    return _dump(raw) + (head + f"{'  ' * len(sections)}{last}: {value_text}\n").encode()


def variants() -> list[Variant]:
    out: list[Variant] = []
    add = out.append

    # Unknown keys at every level (a new key, a typo of every key the base sets, a misspelt section).
    for section in SECTIONS:
        add(Variant(f"unknown-key:{section or 'top'}", _dump(_with(f"{section}.bogus" if section else "bogus", 1))))
    for section, body in [("", BASE), *[(s, v) for s, v in BASE.items() if isinstance(v, dict)],
                          ("data.augment", BASE["data"]["augment"])]:
        for k in body:
            raw = copy.deepcopy(BASE)
            node = raw
            for s in filter(None, section.split(".")):
                node = node[s]
            node[k + "_"] = node.pop(k)
            add(Variant(f"typo:{section}.{k}", _dump(raw)))
    for typo in ("dat", "optimizer", "Model", "stage_2"):
        add(Variant(f"typo-section:{typo}", _dump(_with(typo, {}))))

    # Wrong types at every key; sections that are not mappings.
    for k, (key, tp, _) in enumerate(_leaves()):
        for i, value in enumerate(_wrong_values(tp)):
            if (i + k) % 2 == 0 or i == 0:  # half of them, a different half for neighbouring keys
                add(Variant(f"type:{key}:{i}", _dump(_with(key, value))))
    for section in SECTIONS:
        if section:
            for i, value in enumerate((5, "abc", [1, 2], True)):
                add(Variant(f"section-type:{section}:{i}", _dump(_with(section, value))))

    # Out of range, non-finite and absurd numbers; values outside the choices; strings too long or
    # with control characters.
    for key, tp, meta in _leaves():
        inner = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
        if typing.get_origin(inner) is list:
            inner = typing.get_args(inner)[0]
        def wrap(v, key=key, tp=tp):  # a list key gets the value as an item
            return [v, 1.0, 2.0] if key == "loss.tau" else [v] if typing.get_origin(tp) is list else v
        if inner in (int, float):
            if meta.get("min") is not None:
                add(Variant(f"range:{key}:below", _dump(_with(key, wrap(meta["min"] - (1 if inner is int else 0.5))))))
            if meta.get("max") is not None:
                add(Variant(f"range:{key}:above", _dump(_with(key, wrap(meta["max"] + 1)))))
            if meta.get("gt") is not None:
                add(Variant(f"range:{key}:at-gt", _dump(_with(key, wrap(meta["gt"])))))
        if inner is float:
            for text in (".nan", ".inf", "-.inf", "1e999"):
                value = f"[{text}, 1, 2]" if key == "loss.tau" else text
                add(Variant(f"non-finite:{key}:{text}", _yaml_at(key, value)))
            add(Variant(f"non-finite:{key}:10**400", _dump(_with(key, wrap(10 ** 400)))))
        if inner is int and key != "stage":
            for value in (10 ** 30, "1e30", "1e99999", -(10 ** 30)):
                add(Variant(f"huge:{key}:{value if isinstance(value, str) else len(str(value))}",
                            _dump(_with(key, wrap(value)))))
        if inner is str:
            limit = meta.get("max_len") or 200
            add(Variant(f"long:{key}", _dump(_with(key, "x" * (limit + 1)))))
            add(Variant(f"control:{key}", _dump(_with(key, "a\x07b"))))
            add(Variant(f"newline:{key}", _dump(_with(key, "a\nb"))))
        if meta.get("choices") is not None:
            add(Variant(f"choice:{key}", _dump(_with(key, "nope" if inner is str else 3))))

    # Wrong list lengths and broken cross-key rules.
    for n in (0, 1, 2, 4, 65):
        add(Variant(f"tau-length:{n}", _dump(_with("loss.tau", [0.5] * n))))
    cross = {
        "experts>64": {"model": {"num_experts": 65}, "loss": {"tau": [1.0] * 65}},
        "milestones-decreasing": {"optim": {"schedule": "multistep", "milestones": [10, 5]}},
        "milestones-in-warmup": {"optim": {"schedule": "multistep", "warmup_epochs": 3, "milestones": [2, 8]}},
        "milestones-negative": {"optim": {"schedule": "multistep", "milestones": [-1, 8]}},
        "warmup>=epochs": {"optim": {"epochs": 2, "warmup_epochs": 2}},
        "tau_min>tau_max": {"loss": {"tau_min": 3.0, "tau_max": 1.0}},
        "min_lr>lr": {"optim": {"min_lr": 0.5}},
        "few>many": {"data": {"few_threshold": 2000, "many_threshold": 1000}},
        "stage2-no-init": {"stage": 2},
        "stage2-eps": {"stage": 2, "stage2": {"init_checkpoint": "x.pt", "eps_1": 0.1, "eps_k": 0.5}},
        "stage2-power": {"stage": 2, "stage2": {"init_checkpoint": "x.pt", "las_form": "power"}},
        "kwargs-num_classes": {"model": {"kwargs": {"num_classes": 5}}},
        "kwargs-in_chans": {"model": {"kwargs": {"in_chans": 3}}},
        "kwargs-pretrained": {"model": {"kwargs": {"pretrained": True}}},
        "kwargs-bad-name": {"model": {"kwargs": {"drop rate": 0.1}}},
        "kwargs-int-name": {"model": {"kwargs": {1: 0.1}}},
        "kwargs-deep": {"model": {"kwargs": {"a": _nested_list(40)}}},
    }
    for name, change in cross.items():
        raw = copy.deepcopy(BASE)
        for section, value in change.items():
            if isinstance(value, dict):
                raw.setdefault(section, {}).update(value)
            else:
                raw[section] = value
        add(Variant(f"cross:{name}", _dump(raw)))
    # Names no registry knows (refused before anything is written, by the training entry point).
    for key, value in (("data.dataset", "mnist"), ("model.backbone", "resnet_9000"), ("loss.name", "focal"),
                       ("data.dataset", "d" * 200), ("model.backbone", "b" * 200), ("loss.name", "l" * 200)):
        add(Variant(f"unregistered:{key}:{len(value)}", _dump(_with(key, value))))

    # Garbage bytes, truncated YAML, non-UTF-8, characters YAML refuses, YAML that is not a mapping.
    rng = random.Random(20240611)
    for i in range(25):
        add(Variant(f"garbage:{i}", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))))
    base = BASE_TEXT.encode()
    offset = 0
    for line in BASE_TEXT.splitlines(keepends=True):  # cut inside each flow collection: never valid YAML
        code = line.split("#", 1)[0]
        for start in (i for i, c in enumerate(code) if c in "{["):
            end = code.index("}" if code[start] == "{" else "]", start)
            for cut in range(offset + start + 1, offset + end, 3):
                add(Variant(f"truncated:{cut}", BASE_TEXT[:cut].encode()))
        offset += len(line)
    for i, pos in enumerate(sorted(rng.sample(range(len(base)), 12))):
        add(Variant(f"non-utf8:{i}", base[:pos] + b"\xff\xfe" + base[pos:]))
    add(Variant("non-utf8:latin1", base.replace(b"# BalPoE", "# BalPoE caf\u00e9".encode("latin-1"), 1)))
    add(Variant("non-utf8:utf16", BASE_TEXT.encode("utf-16")))
    add(Variant("nul-byte", base.replace(b"name: ", b"name: \x00", 1)))
    add(Variant("escape-char", base.replace(b"name: ", b"name: \x1b[31m", 1)))
    add(Variant("tab-indent", base.replace(b"  dataset:", b"\tdataset:", 1)))
    add(Variant("bad-indent", base.replace(b"  imb_factor:", b"   imb_factor:", 1)))
    for i, text in enumerate(["- a\n- b\n", "42\n", "just text\n", "name: x\n---\nname: y\n", "a: *undefined\n",
                              "? [a]\n: 1\n", "name: !!python/object/apply:os.system [ls]\n", "name: !!binary aGk=\n",
                              "x: [1, 2\n", "x: {a: 1\n", "\"unterminated\n", "name: 'x\n", "{a: 1}}\n"]):
        add(Variant(f"not-a-recipe:{i}", text.encode()))
    add(Variant("nested-too-deeply", b"name: " + b"[" * 20_000 + b"\n"))
    add(Variant("too-large", base + b"#" * (1 << 20)))

    # YAML alias bombs in values (a 1 kB file that would expand to 10**9 strings).
    for key in ("name", "data.dataset", "data.root", "data.augment", "model.backbone", "model.kwargs",
                "model.kwargs.layers", "loss.tau", "optim.lr", "optim.milestones", "train.device", "bogus"):
        add(Variant(f"alias-bomb:{key}", _yaml_at(key, _alias_chain())))

    # Bad --set overrides on the (valid) base recipe.
    for i, text in enumerate(["optim.lr=fast", "optim.lr=.nan", "optim.lr=-1e-3", "optim.epochs=1e9", "seed=2**70",
                              f"seed={2 ** 70}", "model=3", "data.augment=[1]", ".lr=1", "optim.lr.x=1", "optim.nope=1",
                              "name=" + "x" * 300, "model.kwargs={a: *b}", "model.kwargs=" + _alias_chain(),
                              "loss.tau=[0, 1]", "optim", "=1", "optim.milestones=[0, 5]", "train.threads=1025",
                              "data.augment.crop_padding=1000000", "data.image_size=1e5", "data.num_workers=257"]):
        add(Variant(f"override:{i}", base, overrides=(text,)))

    # Recipe paths that are not readable recipe files.
    for kind in ("dir", "missing", "missing-parent", "file-as-parent", "fifo", "nul", "long-name", "symlink-loop",
                 "broken-symlink"):
        add(Variant(f"path:{kind}", path=kind))
    return out


VARIANTS = variants()


def _recipe_path(v: Variant, tmp: Path) -> str:
    p = tmp / "recipe.yaml"
    if v.path == "file":
        p.write_bytes(v.content)
    elif v.path == "dir":
        p.mkdir()
    elif v.path == "missing-parent":
        p = tmp / "no" / "such" / "recipe.yaml"
    elif v.path == "file-as-parent":
        (tmp / "plain").write_text("name: x\n")
        p = tmp / "plain" / "recipe.yaml"
    elif v.path == "fifo":
        os.mkfifo(p)
    elif v.path == "nul":
        return str(tmp / "re\0cipe.yaml")
    elif v.path == "long-name":
        p = tmp / ("r" * 300 + ".yaml")
    elif v.path == "symlink-loop":
        p.symlink_to(p)
    elif v.path == "broken-symlink":
        p.symlink_to(tmp / "gone.yaml")
    return str(p)


def _argv(v: Variant, path: str, out: Path) -> list[str]:
    argv = ["train", path, "--out", str(out)]
    for text in v.overrides:
        argv += ["--set", text]
    return argv


@pytest.fixture
def nothing_trains(monkeypatch):
    """A variant that got past validation would reach the output directory: fail loudly instead."""
    def accepted(out, *args, **kwargs):
        raise AssertionError(f"a fuzzed variant was accepted (output directory {out})")
    monkeypatch.setattr(training_build, "check_output_dir", accepted)


def test_the_generator_is_deterministic_and_large():
    assert [(v.name, v.content, v.path, v.overrides) for v in variants()] == \
        [(v.name, v.content, v.path, v.overrides) for v in VARIANTS]
    assert len(VARIANTS) >= 300 and len({v.name for v in VARIANTS}) == len(VARIANTS)


def _check(code: int, err: str, out_text: str, out: Path, seconds: float) -> str:
    lines = err.splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err[:2000]
    assert "Traceback" not in err and out_text == ""
    assert len(lines[0]) <= MAX_LINE, lines[0][:1000]
    assert seconds < MAX_SECONDS, seconds
    assert not out.exists()
    return lines[0]


@pytest.mark.parametrize("v", VARIANTS, ids=lambda v: v.name)
def test_every_broken_variant_is_one_line_exit_2(v, tmp_path, capsys, nothing_trains):
    path, out = _recipe_path(v, tmp_path), tmp_path / "out"
    capsys.readouterr()
    start = time.perf_counter()
    code = main(_argv(v, path, out))
    seconds = time.perf_counter() - start
    captured = capsys.readouterr()
    _check(code, captured.err, captured.out, out, seconds)


#: Through a real ``python -m balpoe`` (the exit status and stderr as a user sees them; every other
#: variant runs in-process above, where the same code path prints the same line).
SUBPROCESS = ["alias-bomb:name"]


def test_a_handful_through_a_real_process(tmp_path, capsys, nothing_trains):
    chosen = [v for v in VARIANTS if v.name in SUBPROCESS]
    assert len(chosen) == len(SUBPROCESS)
    runs = []
    for v in chosen:
        tmp = tmp_path / v.name.replace(":", "_").replace("/", "_")
        tmp.mkdir()
        path, out = _recipe_path(v, tmp), tmp / "out"
        code = main(_argv(v, path, out))
        expected = capsys.readouterr().err.strip()
        assert code == 2 and expected.startswith("error: ")
        proc = subprocess.Popen([sys.executable, "-m", "balpoe", *_argv(v, path, out)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        runs.append((v, proc, out, expected))
    for v, proc, out, expected in runs:  # the processes run side by side
        stdout, stderr = proc.communicate(timeout=120)
        line = _check(proc.returncode, stderr, stdout, out, 0.0)
        assert line == expected, v.name  # the same line as in-process
