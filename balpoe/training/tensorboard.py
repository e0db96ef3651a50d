"""TensorBoard logging of a run (``train.log_tensorboard: true``; rank 0 only).

Into ``OUT/tensorboard``: every scalar of ``metrics.jsonl`` per epoch (``train/loss``, ``train/lr``,
``train/img_per_s``, ``train/epoch_time_s``, ``test/acc``, ``test/ece``), and at the end the final
test metrics (``test/*``), each class's test accuracy (``per_class_acc/<class>``), the reliability
diagram as an image, and the recipe's hyper-parameters with the final metrics (``add_hparams``).
``tensorboard`` is an optional dependency (``pip install "balpoe[tensorboard]"``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from balpoe.errors import BalpoeError
from balpoe.evaluate.reliability_plot import ReliabilityData, draw_reliability

_TEST_KEYS = {"test_acc": "test/acc", "test_ece": "test/ece", "test_many": "test/many", "test_medium": "test/medium",
              "test_few": "test/few"}
_FINAL_KEYS = ("acc", "many", "medium", "few", "ece", "mce", "nll", "brier")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (bool, int, float, str)):
            out[f"{prefix}{k}"] = v
        elif isinstance(v, (list, tuple)) and len(v) <= 16:
            out[f"{prefix}{k}"] = str(list(v))
    return out


class TensorBoardLogger:
    """``log_epoch(row)`` after each epoch, ``close(out, report)`` after the final evaluation."""

    def __init__(self, out: Path, recipe: dict):
        try:  # optional dependency, imported only when asked for
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise BalpoeError("recipe key 'train.log_tensorboard' needs tensorboard: pip install "
                              "\"balpoe[tensorboard]\"") from None
        self.logdir = Path(out) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.logdir))
        self.recipe = recipe
        self.epoch = 0

    def log_epoch(self, row: dict) -> None:
        self.epoch = int(row["epoch"])
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(_TEST_KEYS.get(key, f"train/{key}"), float(value), self.epoch)

    def close(self, out: Path, report: dict) -> None:
        step = self.epoch
        for key in _FINAL_KEYS:
            if isinstance(report.get(key), float) and np.isfinite(report[key]):
                self.writer.add_scalar(f"test/{key}", report[key], step)
        analysis = report.get("analysis") or {}
        names = analysis.get("class_names") or []
        for name, acc in zip(names, (analysis.get("per_class_acc") or {}).get("ensemble", [])):
            if np.isfinite(acc):
                self.writer.add_scalar(f"per_class_acc/{name}", acc, step)
        rel = (analysis.get("reliability") or {}).get("none")
        if rel is not None:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "reliability.png"
                draw_reliability(ReliabilityData(**{k: rel[k] for k in ReliabilityData.__dataclass_fields__}), path,
                                 f"ECE = {rel['ece']:.2f}%   MCE = {rel['mce']:.2f}%", 480, 480)
                with Image.open(path) as img:
                    image = np.asarray(img.convert("RGB"))
            self.writer.add_image("reliability/test", torch.from_numpy(image.copy()), step, dataformats="HWC")
        metrics = {f"hparam/{k}": report[k] for k in ("acc", "ece", "nll") if isinstance(report.get(k), float)}
        self.writer.add_hparams(_flat(self.recipe), metrics, run_name=".")
        self.writer.close()
