"""benchmarks/train_speed.py: both modes run one tiny epoch on synthetic CIFAR-100; the output has
the promised structure (timings are not asserted)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "train_speed.py"


def test_train_speed_fast_and_reference_smoke(tmp_path):
    out = tmp_path / "speed.json"
    cmd = [sys.executable, str(SCRIPT), "--synthetic", "--synthetic-test-per-class", "2", "--limit", "96",
           "--epochs", "1", "--warmup-epochs", "0", "--reference", "--ref-workers", "1", "--threads", "1",
           "--breakdown", "--set", "model.backbone=small_cnn", "--set", "model.kwargs={widths: [8, 16, 32]}",
           "--set", "optim.batch_size=32", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = proc.stdout
    assert "SYNTHETIC" in text and "speed-up (fast img/s / reference img/s):" in text
    assert "fast" in text and "reference" in text and "img/s" in text

    r = json.loads(out.read_text())
    assert r["data"]["synthetic"] is True and "SYNTHETIC" in r["data"]["note"]
    assert r["data"]["dataset"] == "cifar100" and r["data"]["images_per_epoch"] == 96
    assert set(r["modes"]) == {"fast", "reference"} and r["epochs"] == 1
    for mode in r["modes"].values():
        assert mode["images_per_epoch"] == 96 and len(mode["epoch_seconds"]) == 1
        for key in ("s_per_epoch", "img_per_s", "cpu_s_per_epoch", "peak_mem_mib", "loader_s_per_epoch"):
            assert isinstance(mode[key], float) and mode[key] > 0
        assert mode["peak_mem_kind"] in ("cuda_max_allocated", "rss_high_water_mark",
                                         "rss_high_water_mark_process_lifetime")
    assert r["modes"]["fast"]["settings"]["loader"] == "DeviceLoader"
    assert r["modes"]["reference"]["settings"]["loader"].startswith("DataLoader")
    assert r["speedup"] == r["modes"]["fast"]["img_per_s"] / r["modes"]["reference"]["img_per_s"]
    assert r["cpu_time_ratio"] == r["modes"]["reference"]["cpu_s_per_epoch"] / r["modes"]["fast"]["cpu_s_per_epoch"]


def test_synthetic_cifar100_is_real_format_and_lt_ir100_size(tmp_path):
    spec = importlib.util.spec_from_file_location("train_speed", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from balpoe.data.build import build_data
    from balpoe.data.lt import lt_class_counts
    from balpoe.recipe import recipe_from_dict

    root = mod.write_synthetic_cifar100(tmp_path, lt_class_counts(500, 100, 100), test_per_class=1)
    assert sorted(p.name for p in (root / "cifar-100-python").iterdir()) == ["meta", "test", "train"]
    recipe = recipe_from_dict({"data": {"dataset": "cifar100", "root": str(root), "imb_factor": 100}})
    bundle = build_data(recipe.data, "cpu")
    assert len(bundle.train) == 10_847 and bundle.train.images.shape[1:] == (3, 32, 32)
    assert bundle.class_counts[0] == 500 and bundle.class_counts[-1] == 5 and len(bundle.test) == 100
    assert bundle.train.images.dtype == torch.uint8
