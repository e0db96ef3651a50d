"""Mixed precision: where autocast is used, and in which dtype.

``train.amp: true`` asks for autocast of the network (the loss and the classifier heads stay in
float32).  bf16 is used where the device computes it natively: CUDA GPUs with native bf16 (Ampere
and newer) and CPUs with AVX512-BF16 or AMX instructions (oneDNN then runs bf16 convolutions at
about twice the float32 rate).  GPUs that only emulate bf16 (V100, T4: ``torch.cuda.is_bf16_supported()``
says yes there, ``including_emulation=False`` says no) get fp16 autocast with loss scaling
(``torch.amp.GradScaler``) instead.  Elsewhere bf16 would be emulated and slower, so the run stays
in float32 and says so once.
"""

from __future__ import annotations

import warnings

import torch


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` has native bf16 arithmetic (CUDA without emulation; CPU AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # torch < 2.3 has no including_emulation (and reported native support only)
            return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)
    return False


def amp_dtype(device: torch.device, requested: bool, warn: bool = True) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` on ``device``: bf16 where native, fp16 on CUDA GPUs
    without native bf16 (use a ``GradScaler``), None (float32) elsewhere; warns when it falls back."""
    if not requested:
        return None
    if native_bf16(device):
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_available():
        if warn:
            warnings.warn("train.amp: this GPU has no native bf16; using fp16 autocast with loss scaling",
                          stacklevel=2)
        return torch.float16
    if warn:
        warnings.warn(f"train.amp: the {device.type} device has no native bf16 arithmetic; running in float32",
                      stacklevel=2)
    return None


def use_amp(device: torch.device, requested: bool, warn: bool = True) -> bool:
    """Whether ``train.amp`` means autocast on ``device`` (:func:`amp_dtype` is not None)."""
    return amp_dtype(device, requested, warn) is not None


def autocast(device: torch.device, enabled: bool | torch.dtype, dtype: torch.dtype | None = None):
    """Autocast on ``device`` in ``dtype`` (bf16 by default; ``enabled`` may itself be the dtype);
    a no-op context when not enabled."""
    if isinstance(enabled, torch.dtype):
        enabled, dtype = True, enabled
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=bool(enabled))
