"""TensorBoard logging (``train.log_tensorboard``): the event files hold what metrics.jsonl and eval.json hold."""

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from balpoe import recipe_from_dict, train


def test_tensorboard_events_hold_the_logged_values(cifar_root, tmp_path):
    raw = {"name": "tb", "seed": 1,
           "data": {"dataset": "cifar10", "root": str(cifar_root), "imb_factor": 10, "many_threshold": 30,
                    "few_threshold": 10},
           "model": {"backbone": "small_cnn", "num_experts": 2, "split": "layer1", "kwargs": {"widths": [8, 16, 16]}},
           "loss": {"tau": [0.5, 1.5]},
           "optim": {"lr": 0.05, "batch_size": 32, "epochs": 2, "warmup_epochs": 0, "schedule": "cosine"},
           "train": {"log_tensorboard": True, "eval_every": 1, "eval_batch_size": 64}}
    out = tmp_path / "run"
    report = train(recipe_from_dict(raw), out, show_progress=False, report=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = set(acc.Tags()["scalars"])
    assert events and {"train/loss", "train/lr", "train/img_per_s", "test/acc", "test/ece", "test/nll"} <= tags
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(r["epoch"], pytest.approx(r["loss"]))
                                                                      for r in rows]
    assert [e.value for e in acc.Scalars("train/lr")] == [pytest.approx(r["lr"]) for r in rows]
    assert acc.Scalars("test/acc")[-1].value == pytest.approx(report["acc"])
    names = report["analysis"]["class_names"]
    for name, value in zip(names, report["analysis"]["per_class_acc"]["ensemble"]):
        assert acc.Scalars(f"per_class_acc/{name}")[0].value == pytest.approx(value)
    (image,) = acc.Images("reliability/test")
    assert image.width == image.height == 480 and image.step == 2
    # hparams: the recipe's keys with the final metrics
    hparam = [EventAccumulator(str(p)).Reload() for p in events]
    values = [a.Scalars("hparam/acc")[0].value for a in hparam if "hparam/acc" in a.Tags()["scalars"]]
    assert values == [pytest.approx(report["acc"])]
