"""README code blocks run as written (at a tiny size): the Python API block and the comparison command."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def section_blocks(title: str, lang: str) -> list[str]:
    """The ``lang`` code blocks of the README section ``title``."""
    text = README.read_text()
    section = text[text.index(f"## {title}\n"):]
    section = section[:section.index("\n## ", 5)]
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


def test_python_api_block_runs(fm_small_root, tmp_path, monkeypatch):
    (block,) = section_blocks("Python API", "python")
    recipe = "recipes/balpoe/fashion_mnist_lt_ir100_cpu_demo.yaml"
    assert f'load_recipe("{recipe}", ["optim.epochs=5"])' in block
    tiny = ["optim.epochs=2", f"data.root={fm_small_root}", "data.imb_factor=10", "data.many_threshold=20",
            "data.few_threshold=5", "optim.batch_size=32", "model.kwargs={widths: [8, 16, 16]}"]
    code = block.replace(f'"{recipe}"', repr(str(ROOT / recipe))).replace('["optim.epochs=5"]', repr(tiny))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), scope)
    assert (tmp_path / "runs" / "api-demo" / "last.pt").is_file()
    e, b, c = scope["expert_logits"].shape
    assert (e, c) == (3, 10) and scope["ensemble"].shape == (b, c) and b == len(scope["y"])
    assert torch.allclose(scope["ensemble"], scope["expert_logits"].mean(0))
    assert scope["logits"].shape == (3, len(scope["labels"]), 10) and len(scope["labels"]) == 60
    assert abs(scope["report"]["acc"] - (scope["logits"].mean(0).argmax(1) == scope["labels"]).double().mean() * 100) \
        < 1e-6


def test_compare_block_runs(fm_small_root, tmp_path, monkeypatch):
    """README "Compare methods": the command as written (every listed recipe, the modes, the baseline), at a
    tiny size: one seed, two epochs, the small Fashion-MNIST files."""
    import shlex

    from balpoe.cli import main
    (block,) = section_blocks("Compare methods", "bash")
    words = shlex.split(block.replace("\\\n", " "), comments=True)
    assert words[:2] == ["balpoe", "compare"] and words.count("compare") == 1
    args = words[2:]
    recipes = [a for a in args if a.endswith(".yaml")]
    assert len(recipes) == 12 and all((ROOT / r).is_file() for r in recipes)
    seeds = args.index("--seeds")
    assert args[seeds + 1:seeds + 4] == ["1", "2", "3"]
    del args[seeds + 2:seeds + 4]                      # one seed
    args = [str(ROOT / a) if a.endswith(".yaml") else a for a in args]
    args[args.index("--out") + 1] = str(tmp_path / "cmp")
    tiny = ["optim.epochs=2", "optim.warmup_epochs=0", f"data.root={fm_small_root}", "data.imb_factor=10",
            "data.many_threshold=20", "data.few_threshold=5", "optim.batch_size=32", "train.threads=1"]
    monkeypatch.chdir(tmp_path)
    assert main(["compare", *args, *(x for t in tiny for x in ("--set", t)), "--no-progress"]) == 0
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert result["complete"] and result["adapt"] == ["none", "unlabelled", "sade", "known"]
    assert len(result["summary"]) == 12 and len(result["paired"]) == 11
    experts = {n: len(json.loads((tmp_path / "cmp" / "runs" / n / "seed1" / "eval.json").read_text())["expert_acc"])
               for n in result["summary"]}
    for name, stats in result["summary"].items():      # sade: the multi-expert runs only
        assert (stats["shift_sade"]["mean"] is not None) == (experts[name] > 1), name
        assert stats["bal_acc"]["mean"] is not None and stats["shift_known"]["mean"] is not None
