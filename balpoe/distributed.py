"""``torch.distributed`` through ``torchrun``: DDP on the model, rank-0-only logging/checkpoints.

``torchrun --nproc_per_node N balpoe train RECIPE`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``;
without them everything here is a no-op and training runs in one process.  The backend is NCCL on
CUDA and gloo on CPU.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as td
import torch.nn as nn


def init_distributed() -> tuple[int, int, int]:
    """Initialise the process group if launched by torchrun; returns ``(rank, world_size, local_rank)``."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, 0
    if not td.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        td.init_process_group(backend=backend)
    return td.get_rank(), td.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def is_distributed() -> bool:
    return td.is_available() and td.is_initialized() and td.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        td.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        t = t.clone()
        td.all_reduce(t)
    return t


def wrap_model(model: nn.Module, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """DDP-wrap the model when distributed (optionally converting BN to SyncBatchNorm)."""
    if not is_distributed():
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    # Stage 2 freezes most parameters; DDP must not wait for gradients that never come.
    return nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                               find_unused_parameters=not all(p.requires_grad for p in model.parameters()))


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
