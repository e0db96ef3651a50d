"""Tiny trained checkpoints for the serving tests (trained once per session)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from balpoe import recipe_from_dict, train


def serve_recipe(root, epochs: int = 8, **model) -> dict:
    """Two small-CNN experts (tau 0.5 / 1.5: a balanced ensemble) on the tiny CIFAR-10-LT (IR 10),
    with a held-out slice for calibration."""
    return {
        "name": "serve", "seed": 5,
        "data": {"dataset": "cifar10", "root": str(root), "imb_factor": 10, "many_threshold": 30,
                 "few_threshold": 10, "holdout_fraction": 0.1, "augment": {"crop_padding": 2, "rotation": 10}},
        "model": {"backbone": "small_cnn", "num_experts": 2, "split": "layer1", "kwargs": {"widths": [8, 16, 16]},
                  **model},
        "loss": {"tau": [0.5, 1.5]},
        "optim": {"lr": 0.05, "batch_size": 32, "epochs": epochs, "warmup_epochs": 0, "schedule": "cosine"},
        "train": {"mixup_alpha": 0.0, "checkpoint_every": epochs, "eval_batch_size": 64},
    }


@pytest.fixture(scope="session")
def trained(cifar_root, tmp_path_factory) -> Path:
    """A checkpoint that has learnt the class prototypes (8 epochs, ~80 % balanced accuracy)."""
    out = tmp_path_factory.mktemp("serve") / "run"
    train(recipe_from_dict(serve_recipe(cifar_root)), out, show_progress=False, report=False)
    return out / "last.pt"


@pytest.fixture(scope="session")
def batched(cifar_root, tmp_path_factory) -> Path:
    """The same network with model.batched_experts: true (1 epoch)."""
    out = tmp_path_factory.mktemp("serve_batched") / "run"
    train(recipe_from_dict(serve_recipe(cifar_root, epochs=1, batched_experts=True)), out, show_progress=False, report=False)
    return out / "last.pt"


@pytest.fixture
def ckpt(trained, tmp_path) -> Path:
    """A private copy of the trained checkpoint (exports default to files next to it)."""
    return Path(shutil.copy(trained, tmp_path / "last.pt"))
