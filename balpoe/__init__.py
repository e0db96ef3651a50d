"""balpoe: long-tailed image recognition with calibrated multi-expert ensembles.

BalPoE (Sanchez Aimar et al., CVPR 2023) trains E experts on a shared backbone with logit-adjusted
losses CE(f_k + tau_k log pi_train, y) and averages their logits; MiSLAS (Zhong et al., CVPR 2021)
is the one-expert, two-stage special case.  Python API::

    from balpoe import load_recipe, train, evaluate_checkpoint, evaluate_shift, ShiftOptions
    recipe = load_recipe("recipes/balpoe/fashion_mnist_lt_ir100_cpu_demo.yaml", ["optim.epochs=5"])
    report = train(recipe, "runs/demo")            # trains, checkpoints, evaluates
    report = evaluate_checkpoint("runs/demo/last.pt")
    shift = evaluate_shift("runs/demo/last.pt", ShiftOptions(test_dists="all", adapt="unlabelled"))
"""

import importlib

from balpoe.errors import BalpoeError
from balpoe.recipe import Recipe, load_recipe, recipe_from_dict

__version__ = "0.1.0"

# Lazy imports keep `import balpoe` (and `balpoe --help`) fast: name -> module that defines it.
_LAZY = {
    "balpoe.training.build": ("train", "build_optimizer", "build_scheduler"),
    "balpoe.models.build": ("build_model",),
    "balpoe.losses.build": ("expert_taus",),
    "balpoe.evaluate.build": ("evaluate_checkpoint", "evaluate_model", "load_model"),
    "balpoe.evaluate.logits": ("collect_logits",),
    "balpoe.evaluate.report": ("report_from_logits",),
    "balpoe.data.build": ("build_data", "build_loader"),
    "balpoe.models": ("build_multi_expert", "MultiExpertNet"),
    "balpoe.shift.build": ("evaluate_shift", "ShiftOptions"),
    "balpoe.shift.scoring": ("evaluate_targets",),
    "balpoe.shift.targets": ("target_sets",),
    "balpoe.shift.selector": ("TauSelector",),
    "balpoe.serve.predict": ("predict",),
    "balpoe.serve.export": ("export",),
}


def __getattr__(name: str):
    for module, names in _LAZY.items():
        if name in names:
            return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'balpoe' has no attribute {name!r}")


__all__ = ["BalpoeError", "Recipe", "load_recipe", "recipe_from_dict", *[n for names in _LAZY.values() for n in names],
           "__version__"]
