"""What survives a crash and what a resumed run equals.

* kill -9 mid-epoch and during a checkpoint write, then ``--resume``: final weights and optimizer
  state bit-identical to an uninterrupted run, the last good checkpoint loadable after the kill,
  no stray temporary files, ``metrics.jsonl`` with exactly one row per epoch;
* resuming with a longer ``optim.epochs`` follows the schedule of the new horizon; a change that
  would make the run something else is refused with one line naming the key;
* a non-finite loss stops the run within a few steps and keeps the last good checkpoint;
* checkpoints are loaded without running code; weights files (safetensors) evaluate the same.
"""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from formats import write_cifar

from balpoe import recipe_from_dict, train
from balpoe.cli import main
from balpoe.data.lt import lt_class_counts
from balpoe.errors import BalpoeError
from balpoe.evaluate.build import evaluate_checkpoint
from balpoe.losses.build import LOSSES, register_loss
from balpoe.losses.logit_adjusted import BalPoELoss
from balpoe.shift.build import ShiftOptions, evaluate_shift
from balpoe.runtime.checkpoint import (FORMAT, atomic_write_text, load_checkpoint, remove_stale_temporaries,
                                       save_safetensors)

ROOT = Path(__file__).resolve().parents[2]


def _recipe(root, **optim) -> dict:
    return {
        "name": "fault", "seed": 5,
        "data": {"dataset": "cifar10", "root": str(root), "imb_factor": 10, "many_threshold": 30,
                 "few_threshold": 10, "augment": {"crop_padding": 2, "rotation": 10}},
        "model": {"backbone": "small_cnn", "num_experts": 2, "split": "layer1",
                  "kwargs": {"widths": [8, 16, 16]}},
        "loss": {"tau": [0.5, 1.5]},
        "optim": {"lr": 0.05, "batch_size": 32, "epochs": 3, "warmup_epochs": 0, "schedule": "cosine", **optim},
        "train": {"mixup_alpha": 0.4, "checkpoint_every": 1, "eval_batch_size": 64},
    }


def _same_state(a: dict, b: dict) -> None:
    assert a["epoch"] == b["epoch"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), (i, k)


def _epochs(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(cifar_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    train(recipe_from_dict(_recipe(cifar_root)), out, show_progress=False, report=False)
    return out


# ------------------------------------------------------------------------------------------------
# kill -9, then resume

WRAPPER = r"""
import os, sys, time
from pathlib import Path
mode, marker, where = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "fsync":   # hang inside the fsync of the checkpoint written after epoch `where`
    real, calls = os.fsync, [0]
    def fsync(fd):
        if ".last.pt.tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
            calls[0] += 1
            if calls[0] == where:
                Path(marker).touch()
                time.sleep(120)
        real(fd)
    os.fsync = fsync
else:                 # hang after 2 training batches of epoch `where` (0-based)
    from balpoe.data.device_loader import DeviceLoader
    orig = DeviceLoader.__iter__
    def it(self):
        for i, batch in enumerate(orig(self)):
            if self.train and self.epoch == where and i == 2:
                Path(marker).touch()
                time.sleep(120)
            yield batch
    DeviceLoader.__iter__ = it
from balpoe.cli import main
from balpoe.data.lt import lt_class_counts
sys.exit(main(sys.argv[4:]))
"""


def _kill_when(marker: Path, recipe_file: Path, out: Path, mode: str, where: int) -> None:
    # the same thread count as this process: float results depend on it
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.Popen([sys.executable, "-c", WRAPPER, mode, str(marker), str(where), "train", str(recipe_file),
                             "--out", str(out), "--no-progress"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the run never reached the kill point"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("mode, where, last_good", [("fsync", 2, 1), ("batch", 1, 1)])
def test_kill_then_resume_is_bit_identical(cifar_root, uninterrupted, tmp_path, mode, where, last_good):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(_recipe(cifar_root)))
    out = tmp_path / "run"
    _kill_when(tmp_path / "marker", recipe_file, out, mode, where)
    # after the kill: the last good checkpoint is intact and loadable
    assert load_checkpoint(out / "last.pt", resume=True)["epoch"] == last_good
    if mode == "fsync":
        assert list(out.glob(".last.pt.tmp-*")), "the kill should have left a temporary file"
    assert main(["train", str(recipe_file), "--out", str(out), "--resume", "--no-progress"]) == 0
    _same_state(load_checkpoint(out / "last.pt", resume=True), load_checkpoint(uninterrupted / "last.pt", resume=True))
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]     # no stray temporaries
    assert _epochs(out) == [1, 2, 3]                                           # one row per epoch
    lr = [json.loads(x)["lr"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lr == [json.loads(x)["lr"] for x in (uninterrupted / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------
# resume semantics


def test_extending_a_finished_cosine_run_follows_the_new_horizon(cifar_root, uninterrupted, tmp_path):
    out = tmp_path / "run"
    train(recipe_from_dict(_recipe(cifar_root, epochs=2)), out, show_progress=False, report=False)
    with pytest.warns(UserWarning, match="optim.epochs 2 -> 3"):
        train(recipe_from_dict(_recipe(cifar_root, epochs=3)), out, resume=True, show_progress=False, report=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    fresh = [json.loads(x) for x in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    # epochs 1-2 ran under cosine over 2 epochs; epoch 3 under cosine over 3 (not lr 0, not a restart)
    assert rows[0]["lr"] == pytest.approx(0.05) and rows[1]["lr"] == pytest.approx(0.025)
    assert rows[2]["lr"] == pytest.approx(fresh[2]["lr"]) == pytest.approx(0.025 * (1 + math.cos(2 * math.pi / 3)))
    ckpt = load_checkpoint(out / "last.pt", resume=True)
    assert ckpt["recipe"]["optim"]["epochs"] == 3 and yaml.safe_load((out / "recipe.yaml").read_text())["optim"][
        "epochs"] == 3
    assert ckpt["resumed"] == [{"epoch": 2, "changed": {"optim.epochs": [2, 3]}}]


@pytest.mark.parametrize("change, key", [
    ({"model": {"num_experts": 3}, "loss": {"tau": [0, 1, 2]}}, "model.num_experts"),
    ({"data": {"imb_factor": 5}}, "data.imb_factor"),
    ({"train": {"mixup_alpha": 0.0}}, "train.mixup_alpha"),
    ({"model": {"batched_experts": True}}, "model.batched_experts"),
])
def test_resume_refuses_a_change_that_is_not_the_schedule(cifar_root, uninterrupted, tmp_path, change, key):
    raw = _recipe(cifar_root)
    for section, values in change.items():
        raw[section] = {**raw[section], **values}
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes((uninterrupted / "last.pt").read_bytes())
    before = (out / "last.pt").read_bytes()
    with pytest.raises(BalpoeError) as e:
        train(recipe_from_dict(raw), out, resume=True, show_progress=False, report=False)
    assert f"recipe key '{key}'" in str(e.value) and "\n" not in str(e.value)
    assert (out / "last.pt").read_bytes() == before


def test_metrics_rows_are_those_of_the_checkpoint(cifar_root, uninterrupted, tmp_path):
    out = tmp_path / "run"
    train(recipe_from_dict(_recipe(cifar_root, epochs=2)), out, show_progress=False, report=False)
    with open(out / "metrics.jsonl", "a") as f:                     # a crash after epoch 3's row, before its checkpoint
        f.write(json.dumps({"epoch": 3, "loss": 9.9, "lr": 0.0}) + "\n")
    train(recipe_from_dict(_recipe(cifar_root, epochs=3)), out, resume=True, show_progress=False, report=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[2]["loss"] != 9.9
    # a crash before the first checkpoint: the next start begins a fresh metrics.jsonl
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "loss": 7.7}) + "\n")
    with pytest.raises(BalpoeError, match="stopped before its first checkpoint"):   # not without being asked
        train(recipe_from_dict(_recipe(cifar_root, epochs=1)), fresh, show_progress=False, report=False)
    train(recipe_from_dict(_recipe(cifar_root, epochs=1)), fresh, resume="auto", show_progress=False, report=False)
    assert [json.loads(x)["loss"] != 7.7 for x in (fresh / "metrics.jsonl").read_text().splitlines()] == [True]


def test_resume_auto_starts_or_continues(cifar_root, uninterrupted, tmp_path, capsys):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(_recipe(cifar_root, epochs=1)))
    out = tmp_path / "run"
    assert main(["train", str(recipe_file), "--out", str(out), "--resume", "auto", "--no-progress"]) == 0
    assert _epochs(out) == [1]
    recipe_file.write_text(yaml.safe_dump(_recipe(cifar_root, epochs=2)))
    assert main(["train", str(recipe_file), "--out", str(out), "--resume", "auto", "--no-progress"]) == 0
    assert _epochs(out) == [1, 2]
    capsys.readouterr()
    assert main(["train", str(recipe_file), "--out", str(tmp_path / "none"), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no checkpoint to resume" in err and "--resume auto" in err


def test_stale_temporaries_are_removed_and_failed_writes_leave_none(tmp_path):
    dead = tmp_path / ".last.pt.tmp-999999999"
    live = tmp_path / f".last.pt.tmp-{os.getppid()}"
    probe = tmp_path / ".write-test.tmp-999999999-abcd_123"        # a writability probe of a killed process
    dead.write_bytes(b"x")
    live.write_bytes(b"x")
    probe.write_bytes(b"")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted([dead, probe])
    assert live.exists() and not dead.exists() and not probe.exists()

    class Boom(str):
        def encode(self, *a):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(BalpoeError, match="cannot write '.*eval.json' \\(No space left on device\\)"):
        atomic_write_text(Boom("text"), tmp_path / "eval.json")
    assert not list(tmp_path.glob(".eval.json.tmp-*")) and not (tmp_path / "eval.json").exists()


def test_a_non_finite_loss_stops_early_and_keeps_the_last_good_checkpoint(cifar_root, tmp_path):
    calls = [0]
    steps = math.ceil(sum(lt_class_counts(40, 10, 10)) / 32)      # steps per epoch (fewer than the check interval)

    class NanAfter(BalPoELoss):
        def forward(self, logits, target):
            calls[0] += 1
            loss = super().forward(logits, target)
            return loss * float("nan") if calls[0] > steps + 2 else loss   # NaN from epoch 2's third step

    register_loss("nan_after", lambda loss, counts, taus: NanAfter(counts, taus))
    try:
        raw = _recipe(cifar_root, epochs=3)
        raw["loss"] = {**raw["loss"], "name": "nan_after"}
        with pytest.raises(BalpoeError) as e:
            train(recipe_from_dict(raw), tmp_path / "run", show_progress=False, report=False)
    finally:
        LOSSES.pop("nan_after")
    msg = str(e.value)
    assert "non-finite loss in epoch 2" in msg and "last good checkpoint" in msg and "\n" not in msg
    assert load_checkpoint(tmp_path / "run" / "last.pt", resume=True)["epoch"] == 1
    assert calls[0] == 2 * steps    # detected at the end of epoch 2; epoch 3 never ran


# ------------------------------------------------------------------------------------------------
# loading without running code


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("form", ["torch.save", "pickle"])
def test_a_malicious_checkpoint_is_refused_without_running_its_payload(tmp_path, capsys, form):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    obj = {"format": FORMAT, "recipe": {}, "payload": Payload(marker)}
    if form == "torch.save":
        torch.save(obj, bad)
    else:
        bad.write_bytes(pickle.dumps(obj))
    for argv in (["eval", str(bad)], ["eval", str(bad), "--test-dists", "uniform"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "evil.pt" in err and ("refused" in err or "could not be read" in err), err
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(bad.read_bytes())
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("name: x\n")
    assert main(["train", str(recipe_file), "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "last.pt" in err
    assert not marker.exists()


def test_checkpoints_missing_keys_and_directories_are_one_line(tmp_path, uninterrupted):
    ckpt = load_checkpoint(uninterrupted / "last.pt", resume=True)
    del ckpt["num_classes"]
    torch.save(ckpt, tmp_path / "partial.pt")
    with pytest.raises(BalpoeError, match="lacks 'num_classes'"):
        load_checkpoint(tmp_path / "partial.pt")
    with pytest.raises(BalpoeError, match="is a directory"):
        load_checkpoint(tmp_path)


def test_checkpoints_of_balpoe_0_1_0_still_load_and_resume(cifar_root, uninterrupted, tmp_path):
    """0.1.0 stored numpy's RNG state as a tuple holding an array."""
    ckpt = load_checkpoint(uninterrupted / "last.pt", resume=True)
    npy = ckpt["rng"]["numpy"]
    ckpt["rng"]["numpy"] = ("MT19937", npy["keys"].numpy().astype("uint32"), npy["pos"], npy["has_gauss"],
                            npy["cached_gaussian"])
    ckpt["recipe"]["loss"].pop("name")          # a key 0.1.0 did not have
    out = tmp_path / "run"
    out.mkdir()
    torch.save(ckpt, out / "last.pt")
    old = load_checkpoint(out / "last.pt", resume=True)
    assert isinstance(old["rng"]["numpy"], tuple)
    report = evaluate_checkpoint(out / "last.pt", device="cpu", out=tmp_path / "e.json")
    assert report["acc"] == json.loads((uninterrupted / "eval.json").read_text())["acc"]
    train(recipe_from_dict(_recipe(cifar_root, epochs=4)), out, resume=True, show_progress=False, report=False)
    assert load_checkpoint(out / "last.pt")["epoch"] == 4


def test_safetensors_weights_evaluate_like_the_checkpoint(uninterrupted, tmp_path):
    ckpt = load_checkpoint(uninterrupted / "last.pt")
    path = save_safetensors(ckpt, tmp_path / "model.safetensors")
    weights = load_checkpoint(path)
    assert weights["recipe"] == ckpt["recipe"] and weights["class_names"] == ckpt["class_names"]
    for k, v in ckpt["model"].items():
        assert torch.equal(weights["model"][k], v), k
    a = evaluate_checkpoint(uninterrupted / "last.pt", device="cpu", out=tmp_path / "a.json")
    b = evaluate_checkpoint(path, device="cpu", out=tmp_path / "b.json")
    assert a["acc"] == b["acc"] and a["nll"] == b["nll"]
    with pytest.raises(BalpoeError, match="cannot resume from it"):
        load_checkpoint(path, resume=True)


# ------------------------------------------------------------------------------------------------
# files the project writes are strict JSON; outputs are checked before the work


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def test_every_json_a_run_writes_is_strict(uninterrupted, tmp_path):
    # many_threshold above every count: the 'many' group is empty (NaN before) -> null
    report = evaluate_checkpoint(uninterrupted / "last.pt", device="cpu", out=tmp_path / "e.json",
                                 overrides=["data.many_threshold=100000", "data.few_threshold=0"])
    assert math.isnan(report["many"])
    assert _strict((tmp_path / "e.json").read_text())["many"] is None
    for path in [*uninterrupted.glob("*.json"), tmp_path / "e.json"]:
        _strict(path.read_text())
    for line in (uninterrupted / "metrics.jsonl").read_text().splitlines():
        _strict(line)


def test_eval_checks_its_output_and_overrides_before_the_work(uninterrupted, tmp_path, capsys):
    ckpt = str(uninterrupted / "last.pt")
    c100 = write_cifar(tmp_path / "c100", 100, 20, 1)
    cases = [
        (["--out", str(tmp_path)], "is a directory; give a file path"),
        (["--out", str(uninterrupted / "last.pt" / "e.json")], "last.pt' is a file, not a directory"),
        (["--set", "model.num_experts=3", "--set", "loss.tau=[0, 1, 2]"], "recipe key 'model.num_experts' is 3"),
        (["--set", "data.dataset=cifar100", "--set", f"data.root={c100}"],
         "recipe key 'data.dataset': cifar100 has 100 classes"),
        (["--batch-size", "0"], "argument --batch-size: expected a positive integer"),
    ]
    for extra, message in cases:
        assert main(["eval", ckpt, "--device", "cpu", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (extra, err)


def test_under_torchrun_only_rank_0_prints_the_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("RANK", "1")
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_unwritable_output_and_missing_cuda_are_one_line_before_any_work(uninterrupted, tmp_path, capsys,
                                                                        monkeypatch, cifar_root):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(_recipe(cifar_root, epochs=1)))
    real = tempfile.mkstemp

    def refuse(*args, prefix=None, **kwargs):
        if prefix and prefix.startswith(".write-test.tmp-"):
            raise PermissionError(13, "Permission denied")
        return real(*args, prefix=prefix, **kwargs)
    monkeypatch.setattr(tempfile, "mkstemp", refuse)        # a read-only folder (root can write anywhere)
    assert main(["train", str(recipe_file), "--out", str(tmp_path / "ro")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not writable (Permission denied)" in err
    assert not (tmp_path / "ro" / "metrics.jsonl").exists()
    monkeypatch.setattr(tempfile, "mkstemp", real)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["eval", str(uninterrupted / "last.pt"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err == "error: device is 'cuda' but CUDA is not available on this machine (use 'cpu' or 'auto')\n"


def test_label_shift_json_is_strict(uninterrupted, tmp_path):
    evaluate_shift(uninterrupted / "last.pt", ShiftOptions(test_dists="all", adapt="known"), device="cpu",
                   out=tmp_path, plots=False, quiet=True)
    report = _strict((tmp_path / "shift_eval.json").read_text())
    assert report["curves"]["distributions"][0] == "forward50"
