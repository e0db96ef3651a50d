"""``torch.distributed`` through ``torchrun``: DDP on the model, rank-0-only logging/checkpoints.

``torchrun --nproc_per_node N --no-python balpoe train RECIPE`` (the installed console script) or
``torchrun --nproc_per_node N -m balpoe train RECIPE`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; without them everything here is a no-op and training runs in
one process.  The backend follows the training device: NCCL on CUDA (process ``r`` on
``cuda:LOCAL_RANK``), gloo on CPU.

What a DDP run means here:

* the global batch is ``optim.batch_size``; every rank gets ``optim.batch_size / N`` of it
  (:func:`local_batch_size`), so learning rate and schedule need no change;
* the training loaders shard like ``DistributedSampler``: one global order per epoch (the same
  seed on every rank), padded by wrapping to a multiple of N, rank ``r`` taking positions
  ``r::N``; every rank therefore runs the same number of steps with equally sized batches, and
  DDP's gradient average equals the gradient of the mean loss over the global batch;
* BatchNorm normalises each rank's shard (as the official code's ``DataParallel`` does per
  replica) and DDP broadcasts rank 0's running statistics before every forward; with
  ``train.sync_bn`` (CUDA only) BN statistics are computed over the global batch instead;
* random streams (:mod:`balpoe.runtime.seeding`): the sample order and the mixup lambda are drawn
  from streams seeded identically on every rank (one global order, one lambda per global step);
  augmentation and the mixup pairing come from per-rank streams, so the ranks' shards are
  augmented independently.  A 1-process and an N-process run are therefore identically
  distributed but not sample for sample the same; with augmentation and mixup switched off they
  are (``tests/training/test_distributed.py``);
* metrics, progress, warnings, checkpoints and the final evaluation come from rank 0 only; every
  rank loads the checkpoint on ``--resume``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as td
import torch.nn as nn

from balpoe.errors import BalpoeError

_OWN_GROUP = False  # True when init_distributed created the process group (shutdown destroys it)


def init_distributed(device: torch.device | None = None) -> tuple[int, int, torch.device | None]:
    """Join the ``torchrun`` process group, if launched by torchrun.

    Returns ``(rank, world_size, device)``: the device is ``cuda:LOCAL_RANK`` for a CUDA device
    under torchrun (one GPU per process) and ``device`` unchanged otherwise.
    """
    global _OWN_GROUP
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is not None and device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise BalpoeError(f"torchrun started local rank {local_rank} but only {torch.cuda.device_count()} "
                              "CUDA device(s) are visible; lower --nproc_per_node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not td.is_initialized():
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        td.init_process_group(backend=backend)
        _OWN_GROUP = True
    return td.get_rank(), td.get_world_size(), device


def shutdown() -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    global _OWN_GROUP
    if _OWN_GROUP and td.is_initialized():
        td.destroy_process_group()
    _OWN_GROUP = False


def is_distributed() -> bool:
    return td.is_available() and td.is_initialized() and td.get_world_size() > 1


def world_size() -> int:
    return td.get_world_size() if is_distributed() else 1


def rank() -> int:
    return td.get_rank() if is_distributed() else 0


def local_batch_size(global_batch: int, world: int) -> int:
    """Each rank's share of the global batch ``optim.batch_size``."""
    if global_batch % world:
        raise BalpoeError(f"recipe key 'optim.batch_size' ({global_batch}) must be divisible by the number of "
                          f"processes ({world}): it is the global batch, split evenly across ranks")
    return global_batch // world


def barrier() -> None:
    if is_distributed():
        td.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        t = t.clone()
        td.all_reduce(t)
    return t


def wrap_model(model: nn.Module, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """DDP-wrap the model when distributed (optionally converting BN to SyncBatchNorm).

    ``convert_sync_batchnorm`` re-uses the BN parameters, so an optimizer built before wrapping
    still updates them.
    """
    if not is_distributed():
        return model
    if sync_bn:
        if device.type != "cuda":
            raise BalpoeError("recipe key 'train.sync_bn' needs CUDA devices (torch's SyncBatchNorm does not run "
                              "on CPU); set train.sync_bn=false")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    # Stage 2 freezes most parameters; DDP must not wait for gradients that never come.
    frozen = not all(p.requires_grad for p in model.parameters())
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=frozen)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP and/or ``torch.compile`` wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
