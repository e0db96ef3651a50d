"""Checkpoints: one dict per file, written atomically (temporary file in the same directory, then
``os.replace``), so an interrupted write never destroys the previous checkpoint."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from balpoe.errors import BalpoeError

FORMAT = "balpoe-checkpoint"


def atomic_save(obj, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(text: str, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load and check a balpoe checkpoint; a one-line error names the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise BalpoeError(f"checkpoint '{path}' not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - corrupt/truncated files are user errors
        raise BalpoeError(f"checkpoint '{path}' could not be read ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise BalpoeError(f"'{path}' is not a balpoe checkpoint")
    return ckpt


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
