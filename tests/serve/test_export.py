"""``balpoe export``: safetensors weights that give the checkpoint's logits exactly, and one
TorchScript / ONNX module (float images in [0, 1] -> balanced or prior-adjusted ensemble logits,
normalisation inside, metadata in the file) that matches the PyTorch model, batched experts included."""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from serve_images import class_images, write_images

from balpoe import recipe_from_dict
from balpoe.cli import main
from balpoe.errors import BalpoeError
from balpoe.evaluate.build import ensemble_prior, load_model
from balpoe.runtime.checkpoint import load_checkpoint
from balpoe.serve.build import load_served
from balpoe.serve.export import TOLERANCE, export, export_metadata, read_metadata
from balpoe.serve.predict import predict
from balpoe.shift.targets import parse_prior

PRIOR = "dirichlet:forward10:100:0"


def _cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _balanced(ckpt: Path, x: torch.Tensor) -> torch.Tensor:
    """The ensemble's mean logits of images in [0, 1], normalised by hand (lambda_m = 0 here: taus 0.5 / 1.5)."""
    model, _, c = load_model(ckpt)
    mean, std = (torch.tensor(c[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        return model((x - mean) / std).mean(0)


def _batch(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _log_q(ckpt: Path) -> torch.Tensor:
    return torch.log(parse_prior(PRIOR, load_checkpoint(ckpt)["class_counts"]).clamp_min(1e-8)).float()


def _jit_load(path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in recent torch; its files still load
        return torch.jit.load(str(path), **kwargs)


def test_safetensors_weights_give_exactly_the_checkpoints_logits(ckpt, capsys):
    rc, _, err = _cli(capsys, "export", ckpt, "--format", "safetensors")
    path = ckpt.with_suffix(".safetensors")
    assert rc == 0 and path.is_file() and f"saved {path}" in err
    original, _, c = load_model(ckpt)
    loaded, recipe, w = load_model(path)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(original(x), loaded(x))
    assert recipe.to_dict() == load_model(ckpt)[1].to_dict()
    assert w["input_size"] == [3, 32, 32] and w["class_names"] == c["class_names"] and w["mean"] == c["mean"]
    imgs = write_images(ckpt.parent / "imgs", [0, 3, 8])
    assert predict(path, imgs, quiet=True)["rows"] == predict(ckpt, imgs, quiet=True)["rows"]


def test_checkpoints_and_weights_with_the_old_taus_copy_load_and_give_the_same_taus(ckpt, tmp_path):
    """The taus live in the recipe only (``expert_taus``); files written before that also carried a
    ``taus`` copy (a checkpoint key, a weights-file metadata key): they load, the copy is dropped,
    and the readers (the export metadata here) derive the same taus from the recipe."""
    new = torch.load(ckpt, weights_only=True)
    assert "taus" not in new
    old = {**new, "taus": [0.5, 1.5]}                         # as checkpoints were written before
    torch.save(old, tmp_path / "old.pt")
    weights = tmp_path / "old.safetensors"
    meta = {k: json.dumps(new.get(k)) for k in ("recipe", "epoch", "num_classes", "in_chans", "class_counts", "mean",
                                                 "std", "class_names", "input_size", "image_files")}
    save_file({k: v.contiguous() for k, v in new["model"].items()}, str(weights),
              metadata={"format": "balpoe-weights", **meta, "taus": "[0.5, 1.5]"})
    for path in (tmp_path / "old.pt", weights):
        loaded = load_checkpoint(path)
        assert "taus" not in loaded and loaded["recipe"] == new["recipe"]
        assert ensemble_prior(recipe_from_dict(loaded["recipe"]))[0] == [0.5, 1.5]
        assert json.loads(export_metadata(load_served(path), None, None)["checkpoint"])["taus"] == [0.5, 1.5]


def test_torchscript_module_matches_and_carries_its_metadata(ckpt, capsys):
    rc, _, err = _cli(capsys, "export", ckpt, "--format", "torchscript")
    path = ckpt.with_suffix(".torchscript")
    assert rc == 0 and path.is_file(), err
    module = _jit_load(path)
    for n in (1, 5):
        x = _batch(n, n)
        with torch.no_grad():
            assert torch.allclose(module(x), _balanced(ckpt, x), atol=1e-5, rtol=0)
    extra = {k: "" for k in ("preprocess", "class_names", "prior", "recipe", "input", "output")}
    _jit_load(path, _extra_files=extra)
    meta = {k: json.loads(v) if k not in ("input", "output") else v.decode() for k, v in extra.items()}
    c = load_checkpoint(ckpt)
    assert meta["class_names"] == c["class_names"] and meta["recipe"] == c["recipe"]
    pre = meta["preprocess"]
    assert pre["input_size"] == [3, 32, 32] and pre["channel_order"] == "RGB" and pre["value_range"] == [0, 1]
    assert pre["mean"] == c["mean"] and pre["std"] == c["std"]
    assert meta["prior"]["spec"] == "uniform" and meta["prior"]["probabilities"] is None
    assert "[B, 3, 32, 32]" in meta["input"] and "[0, 1]" in meta["input"]
    assert read_metadata(path)["preprocess"] == pre


def test_pt2_program_matches_for_any_batch_and_carries_its_metadata(ckpt, capsys):
    rc, _, err = _cli(capsys, "export", ckpt, "--format", "pt2", "--prior", PRIOR)
    path = ckpt.with_suffix(".pt2")
    assert rc == 0 and path.is_file() and f"saved {path}" in err, err
    program = torch.export.load(str(path)).module()
    for n in (1, 5):                                   # the batch axis is dynamic
        x = _batch(n, n)
        with torch.no_grad():
            assert torch.allclose(program(x), _balanced(ckpt, x) + _log_q(ckpt), atol=1e-5, rtol=0)
    meta = read_metadata(path)
    assert meta["class_names"] == load_checkpoint(ckpt)["class_names"] and meta["prior"]["spec"] == PRIOR
    assert meta["preprocess"]["input_size"] == [3, 32, 32]


@pytest.fixture(scope="module")
def onnxruntime():
    return pytest.importorskip("onnxruntime", reason="the 'export' extra (onnx, onnxscript, onnxruntime)")


@pytest.fixture(scope="module")
def onnx_file(trained, onnxruntime, tmp_path_factory) -> tuple[Path, Path]:
    """``balpoe export CKPT --format onnx --prior PRIOR`` of a copy of the trained checkpoint:
    (checkpoint, ONNX file)."""
    ckpt = Path(shutil.copy(trained, tmp_path_factory.mktemp("onnx") / "last.pt"))
    rc = main(["export", str(ckpt), "--format", "onnx", "--prior", PRIOR])
    assert rc == 0
    return ckpt, ckpt.with_suffix(".onnx")


def test_onnx_module_with_a_prior_runs_in_onnxruntime(onnx_file, onnxruntime):
    ckpt, path = onnx_file
    assert path.is_file()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert inp.name == "images" and outp.name == "logits" and isinstance(inp.shape[0], str)  # dynamic batch axis
    for n in (1, 4):
        x = _batch(n, 10 + n)
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        assert torch.allclose(got, _balanced(ckpt, x) + _log_q(ckpt), atol=1e-4, rtol=0)
    meta = session.get_modelmeta().custom_metadata_map
    prior = json.loads(meta["prior"])
    assert prior["spec"] == PRIOR
    assert prior["probabilities"] == pytest.approx(parse_prior(PRIOR, load_checkpoint(ckpt)["class_counts"]).tolist())
    assert json.loads(meta["class_names"]) == load_checkpoint(ckpt)["class_names"]
    assert json.loads(meta["recipe"]) == load_checkpoint(ckpt)["recipe"]


def test_onnx_module_with_its_metadata_preprocessing_agrees_with_predict(onnx_file, onnxruntime, tmp_path):
    """What a deployment does: read the preprocessing from the file, resize, [0, 1], run, softmax."""
    ckpt, path = onnx_file
    meta = read_metadata(path)
    pre = meta["preprocess"]
    img = tmp_path / "photo.jpg"
    Image.fromarray(class_images([6], seed=9)[0]).resize((57, 41)).save(img, quality=90)
    with Image.open(img) as im:
        im = im.convert(pre["channel_order"]).resize(tuple(pre["resize"][::-1]), Image.BILINEAR)
        x = np.asarray(im, dtype=np.float32)[None].transpose(0, 3, 1, 2) / 255.0
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probs = torch.softmax(torch.from_numpy(session.run(None, {"images": x})[0]).double(), 1)[0]
    row = predict(ckpt, [img], prior=meta["prior"]["spec"], topk=10, quiet=True)["rows"][0]
    assert torch.allclose(probs[row["class_ids"]], torch.tensor(row["probabilities"], dtype=torch.float64), atol=1e-4)


def test_batched_experts_checkpoint_exports(batched, onnxruntime, tmp_path):
    assert load_model(batched)[0].batched
    x = _batch(3, 4)
    want = _balanced(batched, x)
    ts = export(batched, "torchscript", out=tmp_path / "b.torchscript", quiet=True)
    with torch.no_grad():
        assert torch.allclose(_jit_load(ts["path"])(x), want, atol=1e-5, rtol=0)
    ox = export(batched, "onnx", out=tmp_path / "b.onnx", quiet=True)
    session = onnxruntime.InferenceSession(ox["path"], providers=["CPUExecutionProvider"])
    assert torch.allclose(torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), want, atol=1e-4, rtol=0)


def test_missing_onnx_packages_are_a_one_line_error(ckpt, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    rc, out, err = _cli(capsys, "export", ckpt, "--format", "onnx")
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: ONNX export needs") and 'pip install "balpoe[export]"' in err
    assert not ckpt.with_suffix(".onnx").exists()


def test_an_export_that_fails_its_check_leaves_no_file(ckpt, monkeypatch, capsys):
    monkeypatch.setitem(TOLERANCE, "torchscript", -1.0)
    rc, _, err = _cli(capsys, "export", ckpt, "--format", "torchscript")
    assert rc == 2 and err.startswith("error: the exported torchscript module's logits differ") and err.count("\n") == 1
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["last.pt"]


@pytest.mark.parametrize("argv, message", [
    (["--format", "safetensors", "--prior", "1,2"], "a safetensors export holds the weights only"),
    (["--format", "torchscript", "--prior", "1,2,3"], "has 3 entries, expected one per class (10)"),
    (["--format", "pickle"], "argument --format: invalid choice"),
    (["--format", "torchscript", "--out", "{ckpt}"], "is a file this command reads"),
])
def test_export_errors_are_one_line(ckpt, capsys, argv, message):
    rc, _, err = _cli(capsys, "export", ckpt, *[a.format(ckpt=ckpt) for a in argv])
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error:") and message in err, err
    assert load_checkpoint(ckpt)["format"] == "balpoe-checkpoint"


def test_a_missing_checkpoint_is_one_line_and_creates_nothing(tmp_path, capsys):
    missing = tmp_path / "typo" / "last.pt"
    rc, _, err = _cli(capsys, "export", missing, "--format", "torchscript")
    assert rc == 2 and err == f"error: checkpoint '{missing}' not found\n"
    assert not (tmp_path / "typo").exists()


def test_export_and_predict_keep_earlier_outputs_unless_forced(ckpt, tmp_path, capsys):
    assert _cli(capsys, "export", ckpt, "--format", "pt2")[0] == 0
    path = ckpt.with_suffix(".pt2")
    before = path.read_bytes()
    rc, _, err = _cli(capsys, "export", ckpt, "--format", "pt2")
    assert rc == 2 and err == (f"error: export output '{path}' already exists; pass --force to overwrite it, or --out "
                               "to write elsewhere\n")
    assert path.read_bytes() == before
    assert _cli(capsys, "export", ckpt, "--format", "pt2", "--force")[0] == 0
    out = tmp_path / "p.jsonl"
    out.write_text("earlier\n")
    imgs = write_images(tmp_path / "imgs", [1])
    rc, _, err = _cli(capsys, "predict", ckpt, *imgs, "--out", out)
    assert rc == 2 and err.startswith(f"error: predictions file '{out}' already exists") and out.read_text() == "earlier\n"
    assert _cli(capsys, "predict", ckpt, *imgs, "--out", out, "--force")[0] == 0
    assert len(out.read_text().splitlines()) == 1 and "earlier" not in out.read_text()


def test_a_checkpoint_whose_weights_do_not_fit_its_recipe_is_one_line(trained):
    c = load_checkpoint(trained)
    c["model"].pop(next(iter(c["model"])))
    with pytest.raises(BalpoeError) as info:
        load_model(c)
    assert str(info.value) == ("the weights in the checkpoint do not fit its recipe's model section "
                               "(Error(s) in loading state_dict for MultiExpertNet:)")
