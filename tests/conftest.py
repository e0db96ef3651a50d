"""Shared fixtures: tiny datasets written in the real on-disk formats (``formats.py``)."""

from __future__ import annotations

import os

import pytest
import torch
from formats import write_cifar, write_fashion_mnist

# The processes the tests start (CLI runs, torchrun ranks, spawned workers) run one OpenMP thread
# each: several processes with torch's default of one thread per core oversubscribe a small machine
# (on 2 cores, tests/training ran 3.4x slower).  This process keeps the thread count it started with;
# a test that needs a child's floats to equal this process's sets the child's count itself.
_THREADS = torch.get_num_threads()
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(_THREADS)


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory):
    """CIFAR-10 pickle layout: 40 training and 8 test images per class (learnable prototypes)."""
    return write_cifar(tmp_path_factory.mktemp("cifar"), 10, 40, 8, seed=0)


@pytest.fixture(scope="session")
def fm_small_root(tmp_path_factory):
    """Fashion-MNIST IDX files: 30 training and 6 test images per class."""
    return write_fashion_mnist(tmp_path_factory.mktemp("fm_small"), 30, 6, seed=1)
