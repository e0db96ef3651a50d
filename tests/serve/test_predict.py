"""``balpoe predict``: image files of any size and mode through the checkpoint's test transform,
top-k of the balanced (or prior-adjusted) ensemble, unreadable files as one warning line each,
and the unlabelled estimate of the images' label distribution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from serve_images import class_images, write_images

from balpoe.cli import main
from balpoe.errors import BalpoeError
from balpoe.evaluate.build import load_model
from balpoe.recipe import recipe_from_dict
from balpoe.runtime.checkpoint import atomic_save, load_checkpoint
from balpoe.serve.build import checkpoint_preprocess, load_served
from balpoe.serve.predict import predict
from balpoe.shift.targets import parse_prior


def _cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _reference_probs(ckpt: Path, images) -> torch.Tensor:
    """softmax of the ensemble's mean logits of uint8 HWC images, normalised as the training loader does
    (the recipe's taus 0.5 / 1.5 make the ensemble balanced: lambda_m = 0)."""
    model, _, c = load_model(ckpt)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    mean, std = (torch.tensor(c[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        return torch.softmax(model((x - mean) / std).mean(0).double(), 1)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _full(row: dict, num_classes: int = 10) -> torch.Tensor:
    p = torch.zeros(num_classes, dtype=torch.float64)
    p[row["class_ids"]] = torch.tensor(row["probabilities"], dtype=torch.float64)
    return p


def test_predict_images_of_any_size_and_mode_skips_unreadable_ones(ckpt, tmp_path, capsys):
    folder = tmp_path / "images"
    labels = list(range(10))
    write_images(folder / "png", labels)
    big = Image.fromarray(class_images([3], seed=4)[0]).resize((80, 56))
    (folder / "sizes").mkdir()
    big.save(folder / "sizes" / "big.jpg", quality=95)
    Image.fromarray(class_images([7], seed=5)[0]).convert("L").save(folder / "sizes" / "grey.png")
    good = (folder / "png" / "000_c0.png").read_bytes()
    (folder / "broken.png").write_bytes(good[: len(good) // 2])  # truncated PNG
    (folder / "notes.png").write_text("not an image")
    (folder / "README.txt").write_text("not an image suffix: not taken from a folder")
    out = tmp_path / "predictions.jsonl"

    rc, _, err = _cli(capsys, "predict", ckpt, folder, "--topk", "3", "--out", out, "--device", "cpu")

    assert rc == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "broken.png" in warnings[0] and "notes.png" in warnings[1], err
    assert "error:" not in err
    rows = _rows(out)
    names = [Path(r["path"]).relative_to(folder).as_posix() for r in rows]
    assert names == sorted(names) and len(rows) == 14 and "README.txt" not in names
    failed = {Path(r["path"]).name: r["error"] for r in rows if "error" in r}
    assert set(failed) == {"broken.png", "notes.png"} and all(n in e for n, e in failed.items())
    classes = load_checkpoint(ckpt)["class_names"]
    for r in rows:
        if "error" in r:
            continue
        p = r["probabilities"]
        assert len(r["labels"]) == 3 and p == sorted(p, reverse=True) and sum(p) <= 1 + 1e-9 and min(p) >= 0
        assert r["labels"] == [classes[i] for i in r["class_ids"]]
    # The 32x32 PNGs go through exactly the training normalisation: the same probabilities as the
    # model on the raw arrays, and the class prototypes are recognised.
    png = [r for r in rows if r["path"].endswith(".png") and "error" not in r and "/png/" in r["path"]]
    ref = _reference_probs(ckpt, class_images(labels))
    for r, c in zip(png, labels):
        assert torch.allclose(torch.tensor(r["probabilities"], dtype=torch.float64), ref[c][r["class_ids"]],
                              atol=1e-5)
    assert sum(r["class_ids"][0] == c for r, c in zip(png, labels)) >= 7


def test_no_readable_image_is_an_error(ckpt, tmp_path, capsys):
    bad = tmp_path / "a.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    rc, _, err = _cli(capsys, "predict", ckpt, bad, "--out", tmp_path / "p.jsonl")
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("warning:") and "a.jpg" in lines[0], err
    assert lines[1] == "error: no input image could be read (1 tried)"


def test_prior_files_adjust_the_probabilities(trained, tmp_path):
    imgs = write_images(tmp_path / "imgs", [0, 4, 9, 2])
    classes = load_checkpoint(trained)["class_names"]
    weights = [1, 1, 1, 1, 1, 1, 1, 1, 1, 8]
    text = tmp_path / "prior.txt"
    text.write_text("# one weight per class\n" + "\n".join(map(str, weights)) + "\n")
    mapping = tmp_path / "prior.json"
    mapping.write_text(json.dumps(dict(zip(classes, weights))))
    base = predict(trained, imgs, topk=10, device="cpu", quiet=True)
    by_text = predict(trained, imgs, prior=str(text), topk=10, device="cpu", quiet=True)
    by_json = predict(trained, imgs, prior=str(mapping), topk=10, device="cpu", quiet=True)
    by_spec = predict(trained, imgs, prior=",".join(map(str, weights)), topk=10, device="cpu", quiet=True)
    q = parse_prior(",".join(map(str, weights)), weights)
    assert by_text["prior"]["mode"] == "known" and by_text["prior"]["probabilities"] == pytest.approx(q.tolist())
    for b, t, j, s in zip(base["rows"], by_text["rows"], by_json["rows"], by_spec["rows"]):
        pb, pt = _full(b), _full(t)
        assert torch.allclose(pt, _full(j)) and torch.allclose(pt, _full(s))
        # Bayes rule: p_q(y|x) ∝ p_balanced(y|x) q_y
        assert torch.allclose(pt, pb * q / (pb * q).sum(), atol=1e-9)
        assert pt[9] > pb[9]
    assert predict(trained, imgs, prior="uniform", topk=10, quiet=True)["rows"] == base["rows"]


def test_prior_file_of_the_wrong_length_is_a_one_line_error(ckpt, tmp_path, capsys):
    img = write_images(tmp_path / "imgs", [1])[0]
    prior = tmp_path / "prior.txt"
    prior.write_text("1 2 3 4 5 6 7\n")
    rc, out, err = _cli(capsys, "predict", ckpt, img, "--prior", prior, "--out", tmp_path / "p.jsonl")
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: prior file") and str(prior) in err
    assert "has 7 entries, expected one per class (10)" in err
    assert not (tmp_path / "p.jsonl").exists()
    bad = tmp_path / "prior.json"
    bad.write_text(json.dumps({"airplane": 1, "unicorn": 2}))
    rc, _, err = _cli(capsys, "predict", ckpt, img, "--prior", bad)
    assert rc == 2 and err.count("\n") == 1 and "'unicorn'" in err


@pytest.mark.parametrize("argv, message", [
    (["--prior", "1,2", "--adapt", "unlabelled"], "exclude each other"),
    (["--prior", "nonexistent/prior.txt"], "neither 'uniform', class weights"),
    (["--topk", "0"], "--topk: expected a positive integer"),
])
def test_bad_options_are_one_line_errors(ckpt, tmp_path, capsys, argv, message):
    img = write_images(tmp_path / "imgs", [1])[0]
    rc, _, err = _cli(capsys, "predict", ckpt, img, *argv)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error:") and message in err, err


def test_missing_input_is_a_one_line_error(ckpt, tmp_path, capsys):
    rc, _, err = _cli(capsys, "predict", ckpt, tmp_path / "nope.png")
    assert rc == 2 and err == f"error: input '{tmp_path / 'nope.png'}' not found\n"


# ------------------------------------------------------------------------------------------------
# Unlabelled adaptation: the label distribution of the given images

SKEW = [16, 12, 9, 7, 5, 4, 3, 2, 1, 1]   # the training split's order: class 0 is the most frequent


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_adapt_unlabelled_estimates_the_skew_of_the_images(trained, tmp_path, direction):
    counts = SKEW if direction == "forward" else SKEW[::-1]
    labels = [c for c, n in enumerate(counts) for _ in range(n)]
    write_images(tmp_path / "imgs", labels, seed=7)
    res = predict(trained, [tmp_path / "imgs"], adapt="unlabelled", device="cpu", quiet=True)
    info = res["prior"]
    q = torch.tensor(info["probabilities"])
    assert info["mode"] == "unlabelled" and info["calibration"] == "bcts" and info["source"]["kind"] == "holdout"
    assert q.sum() == pytest.approx(1.0) and info["n_images"] == len(labels)
    frequent = torch.tensor(counts).argsort(descending=True)[:3]
    assert q[frequent].sum() > 0.3 + 0.1            # uniform would give 0.3
    assert (info["tau"] < 1) == (direction == "forward")
    # the adapted predictions are the selector's logits: top-k sorted, probabilities <= 1 in sum
    for r in res["rows"]:
        assert r["probabilities"] == sorted(r["probabilities"], reverse=True) and sum(r["probabilities"]) <= 1 + 1e-9


def test_adapt_without_the_source_data_warns_and_goes_on(trained, tmp_path, capsys):
    ckpt = load_checkpoint(trained)
    ckpt["recipe"]["data"]["root"] = str(tmp_path / "moved-away")
    moved = atomic_save(ckpt, tmp_path / "moved.pt")
    write_images(tmp_path / "imgs", [0, 0, 0, 1, 2], seed=8)
    out = tmp_path / "p.jsonl"
    rc, _, err = _cli(capsys, "predict", moved, tmp_path / "imgs", "--adapt", "unlabelled", "--out", out)
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "uncalibrated" in warnings[0] and "CIFAR-10 not found" in warnings[0], err
    assert "estimated label distribution of the 5 images" in err
    assert len(_rows(out)) == 5


# ------------------------------------------------------------------------------------------------
# The test transform of each kind of dataset, also for checkpoints that do not record input_size


def _recipe(dataset: str, **data):
    return recipe_from_dict({"name": "x", "data": {"dataset": dataset, **data},
                             "model": {"backbone": "small_cnn", "num_experts": 1}, "loss": {"tau": [1.0]}})


@pytest.mark.parametrize("dataset, data, chans, size, crop", [
    ("cifar100", {}, 3, 32, None),
    ("fashion_mnist", {}, 1, 28, None),
    ("imagenet_lt", {"root": "x", "image_size": 64}, 3, 64, 73),
])
def test_preprocess_of_checkpoints_without_input_size(dataset, data, chans, size, crop):
    pre = checkpoint_preprocess({"in_chans": chans}, _recipe(dataset, **data), "checkpoint 'x'")
    assert pre.input_size == [chans, size, size] and pre.crop_resize == crop and len(pre.mean) == chans
    img = Image.new("RGB", (100, 80), (200, 10, 10))
    x = pre.transform()(img)
    assert x.shape == (chans, size, size) and x.dtype == torch.float32 and 0 <= float(x.min()) <= float(x.max()) <= 1


def test_predict_an_old_checkpoint_without_input_size(trained, tmp_path):
    ckpt = load_checkpoint(trained)
    del ckpt["input_size"]
    old = atomic_save(ckpt, tmp_path / "old.pt")
    assert load_served(old).preprocess.input_size == [3, 32, 32]
    imgs = write_images(tmp_path / "imgs", [5, 6])
    assert predict(old, imgs, quiet=True)["rows"] == predict(trained, imgs, quiet=True)["rows"]


def test_predict_api_rejects_bad_arguments(trained, tmp_path):
    img = write_images(tmp_path / "imgs", [1])
    with pytest.raises(BalpoeError, match="top-k must be a positive integer"):
        predict(trained, img, topk=0)
    with pytest.raises(BalpoeError, match="adaptation must be one of unlabelled"):
        predict(trained, img, adapt="labelled")
