"""Device names -> ``torch.device``."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from balpoe.errors import BalpoeError


def resolve_device(name: str, what: str = "recipe key 'train.device'") -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; ``what`` names the
    setting in the one-line error (a recipe key, or a keyword argument).  Other device types
    (``meta``, ``mps``, ...) are refused: nothing here runs on them."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise BalpoeError(f"{what} is {name!r} but CUDA is not available on this machine (use 'cpu' or 'auto')")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        raise BalpoeError(f"{what} is not a device name: {name!r} (expected auto, cpu, cuda or cuda:N)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise BalpoeError(f"{what} is {name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def cpu_name() -> str:
    """The CPU model (from ``/proc/cpuinfo`` on Linux), for reports and benchmark tables."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """``NVIDIA H100 80GB HBM3`` for a CUDA device, ``cpu (AMD EPYC ..., 2 threads)`` for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({cpu_name()}, {torch.get_num_threads()} threads)"
