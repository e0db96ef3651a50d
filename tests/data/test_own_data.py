"""Users' own data: class folders (``image_folder``) and ``path label`` lists (``image_list``).

The first test runs the README's "Your own data" example exactly as written there: a Python
script writes JPEG/PNG class folders, a recipe names them, ``balpoe train`` trains four epochs and
``balpoe eval`` / ``balpoe predict`` report with the folder names as class names.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from formats import write_image_list
from PIL import Image

from balpoe import recipe_from_dict
from balpoe.cli import main
from balpoe.data.build import build_data
from balpoe.errors import BalpoeError

# ---- the README example, read from the README ------------------------------------------------

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example() -> tuple[str, str, str, list[str]]:
    """The blocks of README's "Your own data" section: make_folders.py, mydata.yaml, cat_heavy.txt and
    the commands (without the `python make_folders.py` line)."""
    text = README.read_text()
    section = text[text.index("## Your own data"):]
    section = section[:section.index("\n## ", 5)]
    blocks = dict(re.findall(r"```(python|yaml|text|bash)\n(.*?)```", section, re.S))
    commands = [c for c in blocks["bash"].splitlines() if c.startswith("balpoe ")]
    return blocks["python"], blocks["yaml"], blocks["text"], commands


def test_readme_own_data_example_end_to_end(tmp_path, monkeypatch):
    make_folders, recipe, forward_list, commands = readme_example()
    assert len(commands) == 4
    monkeypatch.chdir(tmp_path)
    (tmp_path / "make_folders.py").write_text(make_folders)
    (tmp_path / "mydata.yaml").write_text(recipe)
    (tmp_path / "cat_heavy.txt").write_text(forward_list)
    subprocess.run([sys.executable, "make_folders.py"], check=True, timeout=120)
    assert {p.suffix for p in (tmp_path / "mydata" / "train" / "cat").iterdir()} == {".jpg", ".png"}
    for cmd in commands:
        argv = shlex.split(cmd)
        assert argv[0] == "balpoe"
        if argv[1] == "train":
            argv.append("--no-progress")
        assert main(argv[1:]) == 0, cmd

    run = tmp_path / "runs" / "mydata"
    ev = json.loads((run / "eval.json").read_text())
    a = ev["analysis"]
    assert a["class_names"] == ["cat", "dog", "fox"]
    assert a["class_counts"] == [40, 12, 4]            # natural imbalance kept as found
    assert ev["n"] == 30 and ev["acc"] > 34            # learnable colours: better than chance after 4 epochs
    assert "validation split (folder mydata/val, 12 images)" in a["calibration_note"]
    shift = json.loads((run / "shift_eval.json").read_text())
    assert list(shift["distributions"]) == ["cat_heavy"] and shift["distributions"]["cat_heavy"]["n"] == 7
    assert shift["class_names"] == ["cat", "dog", "fox"]
    assert shift["source"]["n"] == 12 and "validation split" in shift["source"]["note"]
    assert "cat" in (run / "report.html").read_text()
    rows = [json.loads(line) for line in (run / "fox.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and all(set(r["labels"]) == {"cat", "dog", "fox"} for r in rows)


# ---- image_folder ----------------------------------------------------------------------------

def _folder(root: Path, counts: dict[str, int], size: int = 8, seed: int = 0, ext: str = "png") -> Path:
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / name / f"{i}.{ext}")
    return root


def _data(**kw):
    return recipe_from_dict({"data": {"num_workers": 0, "image_size": 8, "in_memory": False, **kw}}).data


def test_one_folder_split_by_test_fraction_is_stratified_and_seeded(tmp_path):
    root = _folder(tmp_path / "all", {"b_class": 20, "a_class": 10, "c": 5})
    cfg = _data(dataset="image_folder", root=str(root), test_fraction=0.2)
    b = build_data(cfg, seed=3)
    assert b.class_names == ["a_class", "b_class", "c"]      # sorted as torchvision sorts
    assert b.class_counts.tolist() == [8, 16, 4]             # floor(0.2 n) per class to the test set
    assert np.bincount(b.test.labels).tolist() == [2, 4, 1]
    train, test = set(map(str, b.train.paths)), set(map(str, b.test.paths))
    assert not train & test and len(train | test) == 35
    assert set(map(str, build_data(cfg, seed=3).test.paths)) == test
    assert set(map(str, build_data(cfg, seed=4).test.paths)) != test
    assert b.holdout is None and b.test.transform is not b.train.transform


def test_balanced_folder_made_long_tailed(tmp_path):
    root = _folder(tmp_path / "bal", {f"k{i}": 12 for i in range(4)})
    test = _folder(tmp_path / "test", {"k0": 2, "k3": 1})     # a test folder may lack classes
    cfg = _data(dataset="image_folder", train_root=str(root), test_root=str(test), lt_subsample=True, imb_factor=10,
                holdout_fraction=0.25)
    b = build_data(cfg, seed=0)
    # Cao et al. 2019 in label order: int(12 * 0.1 ** (i / 3)) = 12, 5, 2, 1; a quarter held out of each
    assert (b.class_counts + torch.bincount(torch.as_tensor(b.holdout.labels), minlength=4)).tolist() == [12, 5, 2, 1]
    assert b.test.labels.tolist() == [0, 0, 3] and b.test.class_names == ["k0", "k1", "k2", "k3"]
    natural = build_data(_data(dataset="image_folder", train_root=str(root), test_root=str(test)))
    assert natural.class_counts.tolist() == [12] * 4


def test_folder_errors_are_one_line_and_say_how_to_fix(tmp_path):
    train = _folder(tmp_path / "train", {"a": 3, "b": 2})
    (tmp_path / "train" / "empty").mkdir()

    def err(**kw) -> str:
        with pytest.raises(BalpoeError) as e:
            build_data(_data(dataset="image_folder", **kw))
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "class folder" in err(train_root=str(train), test_fraction=0.5) and str(train / "empty") in err(
        train_root=str(train), test_fraction=0.5)
    (tmp_path / "train" / "empty").rmdir()
    assert f"folder {tmp_path / 'nope'} not found" in err(train_root=str(tmp_path / "nope"), test_fraction=0.5)
    test = _folder(tmp_path / "test", {"a": 1, "zebra": 1})
    msg = err(train_root=str(train), test_root=str(test))
    assert str(test / "zebra") in msg and "not a class of the training folder" in msg
    assert "data.test_root" in err(train_root=str(train))                # no test split at all
    assert "both name the training folder" in err(root=str(train), train_root=str(train), test_fraction=0.5)
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "x.png")
    assert "no class sub-folder" in err(root=str(tmp_path / "flat"), test_fraction=0.5)
    assert "'data.train_list' is not read by dataset 'image_folder'" in err(train_root=str(train), test_fraction=0.5,
                                                                           train_list="x.txt")
    short = err(train_root=str(_folder(tmp_path / "nat", {"a": 3, "b": 9})), test_fraction=0.3, lt_subsample=True,
                imb_factor=2)
    assert "data.lt_subsample" in short and "class 'a' (label 0) has 2 training images" in short


def test_recipe_cross_checks_of_the_new_keys():
    for data, match in [({"test_fraction": 0.2, "test_root": "t"}, "test_fraction"),
                        ({"holdout_fraction": 0.1, "val_list": "v.txt"}, "holdout_fraction"),
                        ({"test_lists": ["a.txt", "a.txt"]}, "twice")]:
        with pytest.raises(BalpoeError, match=match):
            recipe_from_dict({"data": data})
    with pytest.raises(BalpoeError, match="pretrained_file"):
        recipe_from_dict({"model": {"pretrained": True, "pretrained_file": "w.pt"}})


# ---- image_list ------------------------------------------------------------------------------

def test_image_list_with_class_names_val_and_list_paths(tmp_path):
    root = write_image_list(tmp_path / "d", "imagenet_lt", 3, [9, 5, 2], 2, size=8)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text((root / "ImageNet_LT_train.txt").read_text())
    test_lines = (root / "ImageNet_LT_test.txt").read_text().splitlines()
    (lists / "test.txt").write_text("\n".join(test_lines[::2]) + "\n")
    (lists / "val.txt").write_text("\n".join(test_lines[1::2]) + "\n")
    (lists / "names.txt").write_text("tench\ngoldfish\nshark\n")
    cfg = _data(dataset="image_list", root=str(root), train_list=str(lists / "train.txt"),
                test_list=str(lists / "test.txt"), val_list=str(lists / "val.txt"),
                class_names=str(lists / "names.txt"))
    b = build_data(cfg)
    assert b.class_names == ["tench", "goldfish", "shark"] and b.class_counts.tolist() == [9, 5, 2]
    assert len(b.test) == 3 and len(b.holdout) == 3 and "val.txt" in b.holdout_note
    x, y = b.holdout[0]
    assert tuple(x.shape) == (3, 8, 8)
    # a list file named relative to data.root; without data.root paths are relative to the list's folder
    (root / "mine.txt").write_text((root / "ImageNet_LT_train.txt").read_text())
    assert len(build_data(_data(dataset="image_list", root=str(root), train_list="mine.txt",
                                test_fraction=0.3)).train) > 0
    (lists / "short_names.txt").write_text("tench\ngoldfish\n")
    with pytest.raises(BalpoeError, match="label 2 .*has no class name"):
        build_data(_data(dataset="image_list", root=str(root), train_list=str(lists / "train.txt"),
                         test_fraction=0.3, class_names=str(lists / "short_names.txt")))


def test_image_list_errors(tmp_path):
    root = write_image_list(tmp_path / "d", "imagenet_lt", 2, 3, 1, size=8)

    def err(**kw) -> str:
        with pytest.raises(BalpoeError) as e:
            build_data(_data(dataset="image_list", root=str(root), **kw))
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "looked for" in err(train_list="missing.txt", test_fraction=0.5)
    assert "missing.txt" in err(train_list="missing.txt", test_fraction=0.5)
    assert "'data.train_list' is required" in err(test_fraction=0.5)
    (root / "bad.txt").write_text("train/a.jpg zero\n")
    assert "bad.txt:1" in err(train_list="bad.txt", test_fraction=0.5)
    (root / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    assert "cannot read image list file" in err(train_list="bin.txt", test_fraction=0.5)
    (root / "test_extra.txt").write_text((root / "ImageNet_LT_test.txt").read_text().replace(" 1\n", " 7\n"))
    msg = err(train_list="ImageNet_LT_train.txt", test_list="test_extra.txt")
    assert "test_extra.txt" in msg and "label 7" in msg and "not a training class" in msg
    (root / "gap.txt").write_text("train/n00000000/n00000000_0.JPEG 0\ntrain/n00000001/n00000001_0.JPEG 2\n")
    assert "1 of 3 classes have no training image" in err(train_list="gap.txt", test_fraction=0.5)


def test_imagenet_lt_uses_its_validation_list_as_the_holdout(tmp_path):
    root = write_image_list(tmp_path / "d", "imagenet_lt", 3, [6, 4, 2], 2, size=8)
    b = build_data(_data(dataset="imagenet_lt", root=str(root)))
    assert b.holdout is None
    (root / "ImageNet_LT_val.txt").write_text((root / "ImageNet_LT_test.txt").read_text())
    b = build_data(_data(dataset="imagenet_lt", root=str(root)))
    assert len(b.holdout) == 6 and "ImageNet_LT_val.txt" in b.holdout_note and b.class_counts.tolist() == [6, 4, 2]
    b = build_data(_data(dataset="imagenet_lt", root=str(root), holdout_fraction=0.5))  # an explicit slice wins
    assert b.holdout_note is None and len(b.holdout) == 6 and b.class_counts.tolist() == [3, 2, 1]


def test_data_not_on_this_machine_says_what_was_looked_for_and_where_to_get_it(tmp_path):
    for name, first in [("imagenet_lt", "ImageNet_LT_train.txt"), ("places_lt", "Places_LT_train.txt"),
                        ("inat", "iNaturalist18_train.txt")]:
        msg = str(pytest.raises(BalpoeError, build_data, _data(dataset=name, root=str(tmp_path))).value)
        assert first in msg and "github.com" in msg and "\n" not in msg
    root = write_image_list(tmp_path / "lists_only", "places_lt", 2, 2, 1, size=8)
    for p in (root / "data_256").rglob("*.jpg"):
        p.unlink()
    msg = str(pytest.raises(BalpoeError, build_data, _data(dataset="places_lt", root=str(root))).value)
    assert "first image is not there" in msg and "Places365" in msg
