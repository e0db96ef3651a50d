"""Device names -> ``torch.device``."""

from __future__ import annotations

import os
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


def auto_threads(default: int | None = None, cores: int | None = None, load: float | None = None) -> tuple[int, str]:
    """CPU threads for training when the recipe leaves ``train.threads`` at 0: torch's default
    (``default``, the physical cores), less the cores other processes keep busy (the 1-minute load
    average ``load`` on the ``cores`` this process may run on), at least 1.  Torch's OpenMP threads
    wait for each other at every parallel region: one more thread than there are free cores makes a
    small model's step several times slower than one thread (``benchmarks/threads.py``).  Returns
    ``(threads, why)``; ``why`` is a one-line note when fewer than ``default`` were chosen, else ""."""
    default = default or torch.get_num_threads()
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:  # no load average on this platform
            return default, ""
    n = max(1, min(default, int(cores - load + 0.5)))
    if n >= default:
        return default, ""
    return n, (f"threads: {n} of {default} (the 1-minute load average is {load:.1f} on {cores} cores: other processes "
               "keep the rest busy; train.threads sets the count)")
