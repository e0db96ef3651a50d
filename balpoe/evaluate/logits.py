"""Logits of a split, computed once (and, for ``balpoe compare``, kept in a cache file next to the
run): every evaluation in the library is derived from them."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_tensors

from balpoe.runtime.files import atomic_write_bytes
from balpoe.runtime.precision import amp_dtype, autocast


@torch.no_grad()
def collect_logits(model: torch.nn.Module, loader, device: torch.device | str, amp: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert logits ``[E, N, C]`` (float32, CPU) and labels ``[N]`` of everything in ``loader``
    (model in eval mode); ``amp``: bf16 autocast where the device has native bf16
    (:func:`balpoe.runtime.precision.amp_dtype`)."""
    device = torch.device(device)
    model.eval()
    dtype = amp_dtype(device, amp, warn=False)
    outs, labels = [], []
    for x, y in loader:
        with autocast(device, dtype is not None, dtype):
            logits = model(x.to(device, non_blocking=True))
        outs.append(logits.float())
        labels.append(y)
    return torch.cat(outs, 1).cpu(), torch.cat(labels).cpu()


def cached_logits(model: torch.nn.Module, loader, device: torch.device | str, amp: bool, cache: str | Path | None,
                  key: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """:func:`collect_logits`, read from / written to the safetensors file ``cache`` (no cache:
    computed).  ``key`` names what was evaluated (e.g. the checkpoint's digest and the data
    section); a cache of another key, or one that cannot be read, is recomputed and replaced.
    Returns the expert logits, the labels and the seconds the forward pass took (0 when read)."""
    if cache is not None and Path(cache).is_file():
        try:
            with safe_open(str(cache), framework="pt") as f:
                if (f.metadata() or {}).get("key") == key:
                    logits, labels = f.get_tensor("expert_logits"), f.get_tensor("labels")
                    if logits.dim() == 3 and labels.dim() == 1 and logits.shape[1] == labels.numel():
                        return logits, labels, 0.0
        except (SafetensorError, OSError, KeyError):
            pass  # unreadable or incomplete: computed again below
    start = time.perf_counter()
    logits, labels = collect_logits(model, loader, device, amp)
    seconds = time.perf_counter() - start
    if cache is not None:
        data = save_tensors({"expert_logits": logits.contiguous(), "labels": labels.contiguous()},
                            metadata={"key": key})
        atomic_write_bytes(data, cache)
    return logits, labels, seconds


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex): what a logits cache is keyed by."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
