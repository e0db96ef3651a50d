"""README code blocks run as written (at a tiny size): the Python API block."""

from __future__ import annotations

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
