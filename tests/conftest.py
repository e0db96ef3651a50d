"""Shared fixtures: tiny datasets written in the real on-disk formats (``formats.py``)."""

from __future__ import annotations

import pytest
from formats import write_cifar, write_fashion_mnist


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory):
    """CIFAR-10 pickle layout: 40 training and 8 test images per class (learnable prototypes)."""
    return write_cifar(tmp_path_factory.mktemp("cifar"), 10, 40, 8, seed=0)


@pytest.fixture(scope="session")
def fm_small_root(tmp_path_factory):
    """Fashion-MNIST IDX files: 30 training and 6 test images per class."""
    return write_fashion_mnist(tmp_path_factory.mktemp("fm_small"), 30, 6, seed=1)
