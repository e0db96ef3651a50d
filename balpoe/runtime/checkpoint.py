"""Checkpoint and result files: written atomically, read without running code.

* Writing: one dict per file, written atomically (a temporary file in the same directory, fsync,
  then ``os.replace``), so an interrupted write never destroys the previous file.  A temporary file
  left behind by a killed process is removed on the next start (:func:`remove_stale_temporaries`)
  and on exceptions.
* Reading: ``torch.load(weights_only=True)``: only tensors and plain Python data (dicts, lists,
  tuples, numbers, strings) are unpickled, so a checkpoint someone hands you cannot run code when
  it is loaded; a file that asks for anything else is refused with one line.  Checkpoints written
  before RNG states were stored as plain data hold numpy arrays: numpy's array reconstruction (and
  nothing else) is allowed for them.
* Weights only: ``.safetensors`` files (:func:`save_safetensors`) hold the model's tensors and, as
  JSON metadata, the resolved recipe and the data description; :func:`load_checkpoint` reads them
  too (for evaluation and prediction; they cannot be resumed).
* JSON: :func:`write_json` writes strict JSON (NaN and infinities become ``null``).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from balpoe.errors import BalpoeError

FORMAT = "balpoe-checkpoint"
WEIGHTS_FORMAT = "balpoe-weights"
#: keys every checkpoint must have (evaluation needs them)
REQUIRED_KEYS = ("recipe", "epoch", "model", "num_classes", "in_chans", "class_counts")
#: keys a training checkpoint needs to be resumed
RESUME_KEYS = ("optimizer", "scheduler", "rng")
#: metadata of a weights file besides the tensors (JSON-encoded)
_META_KEYS = ("recipe", "epoch", "num_classes", "in_chans", "class_counts", "mean", "std", "class_names", "taus",
              "input_size", "image_files")
_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")
_multiarray = getattr(np, "_core", None) or np.core
#: numpy's array reconstruction, for RNG states in checkpoints written by balpoe 0.1.0
_LEGACY_NUMPY = [_multiarray.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _atomic_write(path: str | Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_save(obj, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically."""
    return _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | Path) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _strict(obj):
    """NaN / infinities -> None, recursively (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def json_text(obj, indent: int | None = 2) -> str:
    """Strict JSON text of ``obj`` (NaN and infinities written as ``null``)."""
    return json.dumps(_strict(obj), indent=indent, allow_nan=False)


def write_json(obj, path: str | Path) -> Path:
    """Strict JSON of ``obj`` to ``path``, atomically (NaN and infinities written as ``null``)."""
    return atomic_write_text(json_text(obj) + "\n", path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files (``.NAME.tmp-PID``) that killed processes left in ``folder``
    (those whose process no longer exists); returns the removed paths."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TMP.match(p.name)
        if m is None or not p.is_file():
            continue
        pid = int(m.group("pid"))
        if pid == os.getpid() or _alive(pid):
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def ensure_writable_dir(folder: str | Path, what: str = "output directory") -> Path:
    """Create ``folder`` if needed and check that files can be written in it (before any work
    starts, so that nothing computed is lost at the end); one-line errors otherwise."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise BalpoeError(f"{what} '{folder}' is a file, not a directory")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except (NotADirectoryError, FileExistsError):
        raise BalpoeError(f"cannot create {what} '{folder}': a parent is a file") from None
    except OSError as e:
        raise BalpoeError(f"{what} '{folder}' is not writable ({e.strerror or type(e).__name__})") from None
    return folder


def ensure_writable_file(path: str | Path, what: str = "output file") -> Path:
    """Check that ``path`` can be written (its folder is created and writable; ``path`` itself is
    not a directory) before any work starts."""
    path = Path(path)
    if path.is_dir():
        raise BalpoeError(f"{what} '{path}' is a directory; give a file path")
    ensure_writable_dir(path.parent if str(path.parent) else Path("."), what=f"folder of the {what}")
    if path.exists() and not os.access(path, os.W_OK):
        raise BalpoeError(f"{what} '{path}' is not writable")
    return path


def _unsafe_global(message: str) -> str:
    m = re.search(r"GLOBAL ([\w.]+)", message)
    return m.group(1) if m else "an object that is not plain data"


def load_checkpoint(path: str | Path, map_location="cpu", resume: bool = False) -> dict:
    """Read and check a balpoe checkpoint (``.pt``) or weights file (``.safetensors``) without
    running code; a one-line error names the file otherwise.  ``resume``: the file must also hold
    the optimizer, scheduler and RNG states."""
    path = Path(path)
    if path.is_dir():
        raise BalpoeError(f"checkpoint '{path}' is a directory, not a file")
    if not path.is_file():
        raise BalpoeError(f"checkpoint '{path}' not found")
    if path.suffix == ".safetensors":
        ckpt = load_safetensors(path)
    else:
        try:
            with torch.serialization.safe_globals(_LEGACY_NUMPY):
                ckpt = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise BalpoeError(f"checkpoint '{path}' holds {_unsafe_global(str(e))}, not only tensors and plain "
                              "data; refused (checkpoints are loaded without running code)") from None
        except Exception as e:  # noqa: BLE001 - corrupt/truncated files are user errors
            raise BalpoeError(f"checkpoint '{path}' could not be read ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise BalpoeError(f"'{path}' is not a balpoe checkpoint")
    missing = [k for k in REQUIRED_KEYS + (RESUME_KEYS if resume else ()) if k not in ckpt]
    if missing:
        what = "resume from" if resume and all(k in ckpt for k in REQUIRED_KEYS) else "use"
        raise BalpoeError(f"checkpoint '{path}' lacks {', '.join(repr(k) for k in missing)}; cannot {what} it")
    if not isinstance(ckpt["recipe"], dict) or not isinstance(ckpt["model"], dict):
        raise BalpoeError(f"checkpoint '{path}' is damaged: 'recipe' and 'model' must be mappings")
    return ckpt


def save_safetensors(ckpt: dict, path: str | Path) -> Path:
    """The model weights of checkpoint ``ckpt`` as a ``.safetensors`` file, with the resolved recipe
    and the data description (classes, channels, counts, normalisation, taus) as JSON metadata;
    written atomically."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in ckpt["model"].items()}
    meta = {"format": WEIGHTS_FORMAT, **{k: json.dumps(ckpt.get(k)) for k in _META_KEYS}}
    # serialised in memory and written like every other output (so with the same permissions: safetensors'
    # own save_file creates its file 0600)
    return _atomic_write(path, lambda f: f.write(save(tensors, metadata=meta)))


def load_safetensors(path: str | Path) -> dict:
    """A checkpoint-like dict (no optimizer, scheduler or RNG state) from a weights file."""
    path = Path(path)
    try:
        tensors = load_file(str(path))
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        meta = header.get("__metadata__") or {}
        if meta.get("format") != WEIGHTS_FORMAT:
            raise BalpoeError(f"'{path}' is a safetensors file but not balpoe weights (no balpoe metadata)")
        fields = {k: json.loads(meta[k]) for k in _META_KEYS if k in meta}
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise BalpoeError(f"weights file '{path}' could not be read ({type(e).__name__})") from None
    return {"format": FORMAT, **fields, "model": tensors}


def rng_state() -> dict:
    """The torch, numpy, python (and CUDA) RNG states as tensors and plain data."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state` (also the numpy tuple of checkpoints written by balpoe 0.1.0)."""
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    if isinstance(npy, dict):
        npy = ("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    np.random.set_state(npy)
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
