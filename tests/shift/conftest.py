"""The label-shift tests' checkpoints, trained once for every module that uses them: tiny Fashion-MNIST
IDX files (``formats.py``), a 3-expert BalPoE model and a one-expert one.  The tests write their
outputs elsewhere (``--out``), never into these run folders."""

import pytest
from formats import write_fashion_mnist

from balpoe import recipe_from_dict, train


def _recipe(root, holdout: float, experts: int, tau: list[float]) -> dict:
    return {"name": f"fm_e{experts}", "seed": 1,
            "data": {"dataset": "fashion_mnist", "root": str(root), "imb_factor": 10, "holdout_fraction": holdout,
                     "many_threshold": 30, "few_threshold": 10, "augment": {"crop_padding": 2, "rotation": 0}},
            "model": {"backbone": "small_cnn", "num_experts": experts, "split": "layer1" if experts > 1 else "head",
                      "kwargs": {"widths": [8, 16, 16]}},
            "loss": {"tau": tau},
            "optim": {"epochs": 2, "warmup_epochs": 0, "batch_size": 32, "schedule": "cosine", "lr": 0.05},
            "train": {"mixup_alpha": 0.4, "eval_batch_size": 64}}


@pytest.fixture(scope="session")
def fm_root(tmp_path_factory):
    # 60 training images per class before LT subsampling (IR 10: 60..6), 30 test images per class.
    return write_fashion_mnist(tmp_path_factory.mktemp("fm"), 60, 30, seed=2)


@pytest.fixture(scope="session")
def balpoe_ckpt(fm_root, tmp_path_factory):
    """3 experts, tau 0/1/2, with a 20% held-out slice of the LT training split."""
    out = tmp_path_factory.mktemp("balpoe")
    train(recipe_from_dict(_recipe(fm_root, 0.2, 3, [0, 1, 2])), out, show_progress=False, report=False)
    return out / "last.pt"


@pytest.fixture(scope="session")
def single_ckpt(fm_root, tmp_path_factory):
    """One logit-adjusted expert (tau 1), no held-out slice."""
    out = tmp_path_factory.mktemp("single")
    train(recipe_from_dict(_recipe(fm_root, 0.0, 1, [1])), out, show_progress=False, report=False)
    return out / "last.pt"
