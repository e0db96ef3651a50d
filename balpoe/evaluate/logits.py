"""Logits of a split, computed once: every evaluation in the library is derived from them."""

from __future__ import annotations

import torch

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
