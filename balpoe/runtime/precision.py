"""Mixed precision: where bf16 autocast is used.

``train.amp: true`` asks for bf16 autocast of the network (the loss and the classifier heads stay
in float32).  It is used where the device computes bf16 natively: CUDA GPUs with bf16 support, and
CPUs with AVX512-BF16 or AMX instructions (oneDNN then runs bf16 convolutions at about twice the
float32 rate).  Elsewhere bf16 would be emulated and slower, so the run stays in float32 and says so.
"""

from __future__ import annotations

import warnings

import torch


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` has native bf16 arithmetic (CUDA bf16 support; CPU AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)
    return False


def use_amp(device: torch.device, requested: bool, warn: bool = True) -> bool:
    """``requested`` (``train.amp``) and :func:`native_bf16`; warns once when it has to say no."""
    if not requested:
        return False
    if native_bf16(device):
        return True
    if warn:
        warnings.warn(f"train.amp: the {device.type} device has no native bf16 arithmetic; running in float32",
                      stacklevel=2)
    return False


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on ``device`` (a no-op context when not ``enabled``)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
