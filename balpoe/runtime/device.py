"""Device names -> ``torch.device``."""

from __future__ import annotations

import torch

from balpoe.errors import BalpoeError


def resolve_device(name: str, what: str = "recipe key 'train.device'") -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; ``what`` names the
    setting in the one-line error (a recipe key, or a keyword argument)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise BalpoeError(f"{what} is {name!r} but CUDA is not available on this machine (use 'cpu' or 'auto')")
    try:
        return torch.device(name)
    except (RuntimeError, TypeError):
        raise BalpoeError(f"{what} is not a device name: {name!r} (expected auto, cpu, cuda or cuda:N)") from None
