"""balpoe: long-tailed image recognition with calibrated multi-expert ensembles.

BalPoE (Sanchez Aimar et al., CVPR 2023) trains E experts on a shared backbone with logit-adjusted
losses CE(f_k + tau_k log pi_train, y) and averages their logits; MiSLAS (Zhong et al., CVPR 2021)
is the one-expert, two-stage special case.  Python API::

    from balpoe import load_recipe, train, evaluate_checkpoint
    recipe = load_recipe("recipes/balpoe/fashion_mnist_lt_ir100_cpu_demo.yaml", ["optim.epochs=5"])
    report = train(recipe, "runs/demo")            # trains, checkpoints, evaluates
    report = evaluate_checkpoint("runs/demo/last.pt")
"""

from balpoe.errors import BalpoeError
from balpoe.recipe import Recipe, load_recipe, recipe_from_dict

__version__ = "0.1.0"


_LAZY = {
    "balpoe.trainer": ("train", "build_model", "build_optimizer", "build_scheduler", "expert_taus"),
    "balpoe.evaluate": ("evaluate_checkpoint", "evaluate_model", "collect_logits", "load_model", "report_from_logits"),
    "balpoe.data.build": ("build_data", "build_loader"),
    "balpoe.models": ("build_multi_expert", "MultiExpertNet"),
    "balpoe.shift_eval": ("evaluate_shift", "evaluate_targets", "target_sets"),
    "balpoe.selector": ("TauSelector",),
}


def __getattr__(name: str):
    # Lazy imports keep `import balpoe` (and `balpoe --help`) fast.
    import importlib
    for module, names in _LAZY.items():
        if name in names:
            return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'balpoe' has no attribute {name!r}")


__all__ = ["BalpoeError", "Recipe", "load_recipe", "recipe_from_dict", "train", "evaluate_checkpoint",
           "evaluate_model", "collect_logits", "load_model", "build_data", "build_loader", "build_model",
           "build_multi_expert", "MultiExpertNet", "evaluate_shift", "evaluate_targets", "target_sets",
           "TauSelector", "__version__"]
