"""Each class's many / medium / few group: written once into ``eval.json`` (``analysis.class_group``,
:func:`~balpoe.data.lt.class_groups` of the training counts) and read by the run report, which groups
an older ``eval.json`` without it through the same function."""

import json
import re
import subprocess
import sys

from balpoe import recipe_from_dict, train
from balpoe.data.lt import GROUP_NAMES, class_groups
from balpoe.evaluate.run_report import report_sections, write_html_report
from balpoe.runtime.checkpoint import load_checkpoint


def _sections_html(page: str, *sids: str) -> list[str]:
    return [re.search(rf'<section id="{sid}">(.*?)</section>', page, re.S).group(1) for sid in sids]


def test_eval_json_carries_each_class_group_and_an_old_eval_json_renders_the_same_groups(cifar_root, tmp_path):
    out = tmp_path / "run"
    recipe = {"name": "groups", "seed": 0,
              "data": {"dataset": "cifar10", "root": str(cifar_root), "imb_factor": 10, "many_threshold": 30,
                       "few_threshold": 10},
              "model": {"backbone": "small_cnn", "num_experts": 2, "split": "layer1",
                        "kwargs": {"widths": [8, 16, 16]}},
              "loss": {"tau": [0.5, 1.5]},
              "optim": {"lr": 0.05, "batch_size": 32, "epochs": 1, "warmup_epochs": 0},
              "train": {"eval_batch_size": 64}}
    train(recipe_from_dict(recipe), out, show_progress=False)
    counts = load_checkpoint(out / "last.pt")["class_counts"]
    saved = json.loads((out / "eval.json").read_text())
    want = class_groups(counts, 30, 10).tolist()
    assert saved["analysis"]["class_group"] == want
    assert set(want) == {0, 1, 2}  # 40 ... 4 images: every group has classes
    new = report_sections(out)
    order = new["per_class"]["order"]
    assert new["per_class"]["groups"] == [GROUP_NAMES[want[i]] for i in order]
    assert new["groups"]["n_classes"] == {name: want.count(g) for g, name in enumerate(GROUP_NAMES)}
    page = write_html_report(out).read_text()

    del saved["analysis"]["class_group"]  # as an eval.json written before the groups were saved
    (out / "eval.json").write_text(json.dumps(saved))
    old = report_sections(out)
    for key in ("groups", "n_many", "n_few"):
        assert old["per_class"][key] == new["per_class"][key], key
    assert old["groups"] == new["groups"] and old["confusion"]["bounds"] == new["confusion"]["bounds"]
    assert _sections_html(write_html_report(out).read_text(), "per_class", "groups", "confusion") == \
        _sections_html(page, "per_class", "groups", "confusion")


def test_the_report_imports_no_torch():
    """The page is drawn from the saved files alone: importing it (and so ``balpoe report``) loads no torch."""
    code = ("import sys, balpoe.evaluate.run_report\n"
            "print(sorted(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stderr[-2000:]
