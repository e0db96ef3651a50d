"""Per-epoch random streams: every random draw of an epoch comes from a generator seeded here.

A stream's seed depends only on the run's seed, the epoch, the stream's name and the process rank,
so an epoch replays exactly (a resumed run sees the batches an uninterrupted one would) and the
streams are independent of each other.  Streams:

* ``order``: the epoch's sample order (instance- or class-balanced); identical on every rank, so
  ranks shard one global order;
* ``augment``: per-sample augmentation draws; one stream per rank;
* ``mixup_lambda``: mixup's Beta(alpha, alpha) draws (numpy); identical on every rank, one lambda
  per global step;
* ``mixup_pairs``: mixup's pairing permutation; one stream per rank.
"""

from __future__ import annotations

import numpy as np
import torch

#: stream -> (offset, offset per rank) added to the run's seed
STREAMS: dict[str, tuple[int, int]] = {"order": (0, 0), "augment": (7919, 7919), "mixup_lambda": (0, 0),
                                       "mixup_pairs": (1, 104729)}


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for ``(seed, epoch)``."""
    return (seed * 1_000_003 + epoch * 7919 + 17) % (2**63 - 1)


def stream_seed(seed: int, epoch: int, stream: str, rank: int = 0) -> int:
    """The seed of ``stream`` (one of :data:`STREAMS`) in ``epoch`` on process ``rank``."""
    offset, per_rank = STREAMS[stream]
    return epoch_seed(seed + offset + per_rank * rank, epoch)


def torch_stream(seed: int, epoch: int, stream: str, rank: int = 0, device="cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`stream_seed`."""
    return torch.Generator(device=device).manual_seed(stream_seed(seed, epoch, stream, rank))


def numpy_stream(seed: int, epoch: int, stream: str, rank: int = 0) -> np.random.Generator:
    """A numpy ``Generator`` seeded with :func:`stream_seed`."""
    return np.random.default_rng(stream_seed(seed, epoch, stream, rank))
