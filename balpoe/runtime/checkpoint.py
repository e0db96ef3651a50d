"""Checkpoint and result files: written atomically, read without running code.

* Writing: one dict per file, written atomically by :func:`balpoe.runtime.files.atomic_write` (a
  temporary file with an unpredictable name in the same directory, fsync, then ``os.replace``), so
  an interrupted write never destroys the previous file.  A temporary file left behind by a killed
  process is removed on the next start (:func:`remove_stale_temporaries`) and on exceptions.
* Reading: ``torch.load(weights_only=True)``: only tensors and plain Python data (dicts, lists,
  tuples, numbers, strings) are unpickled, so a checkpoint someone hands you cannot run code when
  it is loaded; a file that asks for anything else is refused with one line.  Checkpoints written
  before RNG states were stored as plain data hold numpy arrays: numpy's array reconstruction (and
  nothing else) is allowed for them.
* Weights only: ``.safetensors`` files (:func:`save_safetensors`) hold the model's tensors and, as
  JSON metadata, the resolved recipe and the data description; :func:`load_checkpoint` reads them
  too (for evaluation and prediction; they cannot be resumed).
* JSON: :func:`write_json` writes strict JSON (NaN and infinities become ``null``).
* Validation: every field read from a checkpoint or a weights file's metadata is checked for type,
  range and shape before use (:func:`validate_checkpoint_fields`).
"""

from __future__ import annotations

import json
import math
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from balpoe.errors import BalpoeError, clip, short_path, shown
from balpoe.runtime.files import (atomic_write, check_size, ensure_writable_dir,  # noqa: F401
                                   ensure_writable_file, parse_json, remove_stale_temporaries)

FORMAT = "balpoe-checkpoint"
WEIGHTS_FORMAT = "balpoe-weights"
#: keys every checkpoint must have (evaluation needs them)
REQUIRED_KEYS = ("recipe", "epoch", "model", "num_classes", "in_chans", "class_counts")
#: keys a training checkpoint needs to be resumed
RESUME_KEYS = ("optimizer", "scheduler", "rng")
#: metadata of a weights file besides the tensors (JSON-encoded)
_META_KEYS = ("recipe", "epoch", "num_classes", "in_chans", "class_counts", "mean", "std", "class_names",
              "input_size", "image_files")
#: keys older checkpoints and weights files also held, dropped on reading: ``taus``, a copy of the experts'
#: taus, which the recipe holds (``loss``, ``model.num_experts``; :func:`balpoe.losses.build.expert_taus`)
LEGACY_KEYS = ("taus",)
_multiarray = getattr(np, "_core", None) or np.core
#: numpy's array reconstruction, for RNG states in checkpoints written by balpoe 0.1.0
_LEGACY_NUMPY = [_multiarray.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def atomic_save(obj, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically (:func:`~balpoe.runtime.files.atomic_write`)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | Path) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`~balpoe.runtime.files.atomic_write`)."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


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


def _unsafe_global(message: str) -> str:
    m = re.search(r"GLOBAL ([\w.]+)", message)
    return m.group(1) if m else "an object that is not plain data"


def load_checkpoint(path: str | Path, map_location="cpu", resume: bool = False) -> dict:
    """Read and check a balpoe checkpoint (``.pt``) or weights file (``.safetensors``) without
    running code; every field is validated (:func:`validate_checkpoint_fields`) and a one-line
    error names the file and the field otherwise; keys older files held that are derived now
    (:data:`LEGACY_KEYS`) are dropped.  ``resume``: the file must also hold the optimizer, scheduler
    and RNG states."""
    path = Path(path)
    try:
        if path.is_dir():
            raise BalpoeError(f"checkpoint '{short_path(path)}' is a directory, not a file")
        if not path.is_file():
            raise BalpoeError(f"checkpoint '{short_path(path)}' not found")
    except OSError as e:  # a name too long for the file system, a symlink loop, ...
        raise BalpoeError(f"checkpoint '{short_path(path)}' cannot be read ({e.strerror or type(e).__name__})") from None
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
    for key in LEGACY_KEYS:     # derived from the recipe now: no stale copy is read
        ckpt.pop(key, None)
    missing = [k for k in REQUIRED_KEYS + (RESUME_KEYS if resume else ()) if k not in ckpt]
    if missing:
        what = "resume from" if resume and all(k in ckpt for k in REQUIRED_KEYS) else "use"
        raise BalpoeError(f"checkpoint '{path}' lacks {', '.join(repr(k) for k in missing)}; cannot {what} it")
    return validate_checkpoint_fields(ckpt, path, resume=resume)


# ------------------------------------------------------------------------------------------------
# Validation of every field a checkpoint (or a weights file's metadata) holds

#: bounds of the data description a checkpoint holds
MAX_CLASSES, MAX_CHANNELS, MAX_SIDE, MAX_EPOCH, MAX_COUNT = 1_000_000, 64, 4096, 100_000, 10 ** 12
MAX_NAME_CHARS = 1000


def _int(value, lo: int, hi: int) -> int | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and lo <= value <= hi:
        return int(value)
    return None


def _numbers(value, what: str, n: int | None, *, integer: bool = False, lo=None, hi=None, gt=None) -> list:
    """``value`` (a list, tuple or 1-D tensor) as ``n`` finite numbers within the bounds, or a
    :class:`BalpoeError` line."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.is_complex():
            raise BalpoeError(f"{what} must be a list of {n or 'some'} numbers, got a tensor of shape "
                              f"{tuple(value.shape)}")
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise BalpoeError(f"{what} must be a list of {n or 'some'} numbers, got {shown(value)}")
    if n is not None and len(value) != n:
        raise BalpoeError(f"{what} must have {n} values, got {len(value)}")
    out = []
    for i, v in enumerate(value):
        ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
        if ok and integer and not isinstance(v, (int, np.integer)):
            ok = False
        if ok:
            ok = math.isfinite(float(v)) and (lo is None or v >= lo) and (hi is None or v <= hi) and \
                (gt is None or v > gt)
        if not ok:
            kind = "an integer" if integer else "a finite number"
            bound = " ".join(b for b in (f">= {lo}" if lo is not None else "", f"> {gt}" if gt is not None else "",
                                         f"<= {hi}" if hi is not None else "") if b)
            raise BalpoeError(f"{what}[{i}] must be {kind}{' ' + bound if bound else ''}, got {shown(v)}")
        out.append(int(v) if integer else float(v))
    return out


def validate_checkpoint_fields(ckpt: dict, path: str | Path, resume: bool = False) -> dict:
    """Check every field of a checkpoint dict (or a weights file's metadata) for type, range and
    shape before anything uses it: ``num_classes``, ``in_chans``, ``epoch``, ``class_counts`` (one
    positive integer per class), ``class_names``, ``mean`` / ``std`` (finite, std > 0, one per
    channel), ``input_size``, ``image_files``, the recipe and the weights (a mapping of
    names to finite tensors); with ``resume`` the optimizer, scheduler, scaler and RNG states'
    structure.  Returns ``ckpt`` (``class_counts`` etc. as plain lists); a one-line error names the
    file and the field otherwise."""
    where = f"checkpoint '{short_path(path)}'"

    def bad(key: str, why: str) -> BalpoeError:
        return BalpoeError(f"{where} is damaged: '{key}' {why}")

    if not isinstance(ckpt.get("recipe"), dict):
        raise bad("recipe", f"must be a mapping, got {shown(ckpt.get('recipe'))}")
    check_size(ckpt["recipe"], f"{where}: 'recipe'", max_values=100_000)
    k = _int(ckpt.get("num_classes"), 1, MAX_CLASSES)
    if k is None:
        raise bad("num_classes", f"must be an integer in [1, {MAX_CLASSES}], got {shown(ckpt.get('num_classes'))}")
    c = _int(ckpt.get("in_chans"), 1, MAX_CHANNELS)
    if c is None:
        raise bad("in_chans", f"must be an integer in [1, {MAX_CHANNELS}], got {shown(ckpt.get('in_chans'))}")
    epoch = _int(ckpt.get("epoch"), 0, MAX_EPOCH)
    if epoch is None:
        raise bad("epoch", f"must be an integer in [0, {MAX_EPOCH}], got {shown(ckpt.get('epoch'))}")
    ckpt["num_classes"], ckpt["in_chans"], ckpt["epoch"] = k, c, epoch
    ckpt["class_counts"] = _numbers(ckpt.get("class_counts"), f"{where}: 'class_counts'", k, integer=True, lo=1,
                                    hi=MAX_COUNT)
    names = ckpt.get("class_names")
    if names is not None:
        if not isinstance(names, (list, tuple)) or len(names) != k or \
                not all(isinstance(x, str) and len(x) <= MAX_NAME_CHARS for x in names):
            raise bad("class_names", f"must be a list of {k} names (strings of at most {MAX_NAME_CHARS} characters), "
                      f"got {shown(names)}")
        ckpt["class_names"] = list(names)
    for key in ("mean", "std"):
        if ckpt.get(key) is not None:
            ckpt[key] = _numbers(ckpt[key], f"{where}: '{key}'", c, **({"gt": 0} if key == "std" else {}))
    if ckpt.get("input_size") is not None:
        size = _numbers(ckpt["input_size"], f"{where}: 'input_size'", 3, integer=True, lo=1, hi=MAX_SIDE)
        if size[0] != c:
            raise bad("input_size", f"has {size[0]} channels but 'in_chans' is {c}")
        ckpt["input_size"] = size
    if "image_files" in ckpt and not isinstance(ckpt["image_files"], bool):
        raise bad("image_files", f"must be true or false, got {shown(ckpt['image_files'])}")
    model = ckpt.get("model")
    if not isinstance(model, dict) or not model:
        raise bad("model", "must be a non-empty mapping of parameter names to tensors")
    for name, t in model.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise bad("model", f"must map parameter names to tensors; {shown(name, 80)} holds {type(t).__name__}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise bad("model", f"weights '{clip(name, 80)}' are not finite (NaN or infinity)")
    if resume:
        _validate_resume_state(ckpt, bad)
    return ckpt


def _validate_resume_state(ckpt: dict, bad) -> None:
    opt = ckpt.get("optimizer")
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict) or \
            not isinstance(opt.get("param_groups"), list) or \
            not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in opt["param_groups"]):
        raise bad("optimizer", "must be an optimizer state (a mapping with 'state' and 'param_groups')")
    for i, s in opt["state"].items():
        if not isinstance(s, dict) or not all(isinstance(v, (torch.Tensor, int, float)) for v in s.values()):
            raise bad("optimizer", f"state of parameter {shown(i, 40)} must map names to tensors or numbers")
        for v in s.values():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise bad("optimizer", f"state of parameter {shown(i, 40)} is not finite")
    if not isinstance(ckpt.get("scheduler"), dict):
        raise bad("scheduler", "must be a mapping (a learning-rate scheduler state)")
    if "scaler" in ckpt and not isinstance(ckpt["scaler"], dict):
        raise bad("scaler", "must be a mapping (a gradient scaler state)")
    rng = ckpt.get("rng")
    ok = isinstance(rng, dict) and isinstance(rng.get("torch"), torch.Tensor) and rng["torch"].dtype == torch.uint8 \
        and rng["torch"].dim() == 1 and "numpy" in rng and isinstance(rng.get("python"), (tuple, list)) \
        and len(rng["python"]) == 3
    if ok:
        npy = rng["numpy"]
        if isinstance(npy, dict):
            keys = npy.get("keys")
            ok = isinstance(keys, torch.Tensor) and keys.shape == (624,) and not keys.is_floating_point() and \
                _int(npy.get("pos"), 0, 624) is not None and _int(npy.get("has_gauss"), 0, 1) is not None and \
                isinstance(npy.get("cached_gaussian"), (int, float))
        else:
            ok = isinstance(npy, tuple) and len(npy) == 5
        py = rng["python"]
        ok = ok and isinstance(py[1], (tuple, list)) and len(py[1]) == 625 and \
            all(isinstance(v, int) and 0 <= v < 2 ** 32 for v in py[1])
    if not ok:
        raise bad("rng", "must hold the torch, numpy and python random states as balpoe writes them")


def save_safetensors(ckpt: dict, path: str | Path) -> Path:
    """The model weights of checkpoint ``ckpt`` as a ``.safetensors`` file, with the resolved recipe
    and the data description (classes, channels, counts, normalisation, input size) as JSON metadata;
    written atomically."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in ckpt["model"].items()}
    return atomic_write(path, lambda f: f.write(safetensors_bytes(ckpt, tensors)))


def safetensors_bytes(ckpt: dict, tensors: dict) -> bytes:
    """The bytes of the ``.safetensors`` file of :func:`save_safetensors`."""
    meta = {"format": WEIGHTS_FORMAT, **{k: json.dumps(ckpt.get(k)) for k in _META_KEYS}}
    return save_tensors(tensors, metadata=meta)


def load_safetensors(path: str | Path) -> dict:
    """A checkpoint-like dict (no optimizer, scheduler or RNG state) from a weights file; its
    metadata are strict JSON (checked field by field by :func:`load_checkpoint`)."""
    path = Path(path)
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise BalpoeError(f"weights file '{path}' could not be read ({type(e).__name__})") from None
    if meta.get("format") != WEIGHTS_FORMAT:
        raise BalpoeError(f"'{path}' is a safetensors file but not balpoe weights (no balpoe metadata)")
    fields = {k: parse_json(meta[k], f"weights file '{short_path(path)}', metadata '{k}'")
              for k in _META_KEYS if k in meta}
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
    """Restore :func:`rng_state` (also the numpy tuple of checkpoints written by balpoe 0.1.0); a
    state that does not restore is one :class:`BalpoeError` line."""
    try:
        torch.set_rng_state(state["torch"])
        npy = state["numpy"]
        if isinstance(npy, dict):
            npy = ("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                   npy["cached_gaussian"])
        np.random.set_state(npy)
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (TypeError, ValueError, RuntimeError, KeyError, IndexError, AttributeError) as e:
        raise BalpoeError(f"the checkpoint's random-number states do not restore ({type(e).__name__}: "
                          f"{clip(str(e).splitlines()[0] if str(e) else '', 100)})") from None
