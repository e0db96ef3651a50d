"""Weights: a model's own weights loaded with one-line errors (:func:`load_state`), and pretrained
weights for a backbone: read a weights file without running code, match its tensors to the backbone
by name and shape, load what matches and say what did not.

Used by :func:`balpoe.models.build.build_multi_expert` for ``model.pretrained_file``; by evaluation,
stage 2 and resuming for a checkpoint's weights (:func:`load_state`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file as load_safetensors

from balpoe.errors import BalpoeError, clip


#: top-level modules holding a timm model's classifier: a weights file's tensors under them are not used
#: (the backbone is built without a classifier; each expert has its own head)
CLASSIFIER_NAMES = ("fc", "head", "classifier", "last_linear")
#: how many key names a message shows
SHOWN_KEYS = 3


def load_state(model: nn.Module, state: dict[str, torch.Tensor], mismatch: str) -> None:
    """``model.load_state_dict(state)`` (every key, every shape); weights that do not fit ``model``
    are one line: ``mismatch`` (what did not fit what) and the first line of torch's report."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BalpoeError(f"{mismatch} ({clip(first, 200)})") from None


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: a ``state_dict``, a checkpoint dict holding one under
    ``'state_dict'`` or ``'model'`` (loaded with ``torch.load(weights_only=True)``: no code runs), or
    a ``.safetensors`` file.  A DDP ``module.`` prefix on every key is dropped.  One-line errors
    name ``model.pretrained_file``."""
    p = Path(path).expanduser()
    where = f"model.pretrained_file '{clip(str(path), 200)}'"
    if not p.is_file():
        raise BalpoeError(f"{where} not found")
    try:
        state = load_safetensors(str(p)) if p.suffix == ".safetensors" else \
            torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error
        kind = "safetensors" if p.suffix == ".safetensors" else "torch state_dict (weights only)"
        raise BalpoeError(f"{where} could not be read as a {kind} ({type(e).__name__}: {clip(e, 150)})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BalpoeError(f"{where} holds no state_dict (expected a mapping of parameter names to tensors, or a "
                          "checkpoint dict with one under 'state_dict' or 'model')")
    if all(str(k).startswith("module.") for k in state):
        state = {str(k)[len("module."):]: v for k, v in state.items()}
    return {str(k): v for k, v in state.items()}


@dataclasses.dataclass
class WeightMatch:
    """How a weights file's tensors match a backbone's state: ``loaded`` keys (same name and shape),
    ``missing`` (in the backbone, not in the file; BN ``num_batches_tracked`` counters excepted),
    ``unexpected`` (in the file, not in the backbone), ``mismatched`` (same name, other shape:
    ``(key, file shape, backbone shape)``) and ``unused`` classifier tensors of the file
    (:data:`CLASSIFIER_NAMES`), which do not count against a match."""
    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple, tuple]]
    unused: list[str]
    parameters: int

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    @property
    def total(self) -> int:
        """Tensors the backbone expects (loaded + missing + of another shape)."""
        return len(self.loaded) + len(self.missing) + len(self.mismatched)

    def problems(self) -> str:
        """``2 missing (a, b), 1 unexpected (c), 1 of another shape (d: file [..], backbone [..])``."""
        def names(keys: list[str]) -> str:
            return ", ".join(keys[:SHOWN_KEYS]) + (", ..." if len(keys) > SHOWN_KEYS else "")
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing ({names(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected ({names(self.unexpected)})")
        if self.mismatched:
            shown_ = [f"{k}: file {list(a)}, backbone {list(b)}" for k, a, b in self.mismatched[:SHOWN_KEYS]]
            parts.append(f"{len(self.mismatched)} of another shape ({'; '.join(shown_)}"
                         f"{'; ...' if len(self.mismatched) > SHOWN_KEYS else ''})")
        return ", ".join(parts)

    def summary(self) -> str:
        """One line: what loaded, what did not, what was unused."""
        line = f"loaded {len(self.loaded)} of {self.total} backbone tensors ({self.parameters:,} parameters)"
        if not self.complete:
            line += f"; not loaded: {self.problems()}"
        if self.unused:
            line += f"; {len(self.unused)} classifier tensors unused"
        return line


def match_weights(own: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> WeightMatch:
    """Compare a backbone's ``state_dict()`` ``own`` with a weights file's tensors ``given`` by
    name and shape (works on meta tensors too)."""
    loaded, missing, mismatched = [], [], []
    for k, v in own.items():
        if k not in given:
            if not k.endswith("num_batches_tracked"):
                missing.append(k)
        elif tuple(given[k].shape) != tuple(v.shape):
            mismatched.append((k, tuple(given[k].shape), tuple(v.shape)))
        else:
            loaded.append(k)
    extra = [k for k in given if k not in own]
    unused = [k for k in extra if k.split(".", 1)[0] in CLASSIFIER_NAMES]
    unexpected = [k for k in extra if k.split(".", 1)[0] not in CLASSIFIER_NAMES]
    params = sum(own[k].numel() for k in loaded if own[k].is_floating_point())
    return WeightMatch(loaded, missing, unexpected, mismatched, unused, params)


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: str, backbone: str,
                 strict: bool = True) -> WeightMatch:
    """Load the tensors of ``state`` (from ``model.pretrained_file`` ``path``) that match ``model``
    by name and shape.  With ``strict`` a partial match is refused with a one-line error (missing,
    unexpected and other-shape keys: counts and the first names); otherwise the matching tensors are
    loaded and the match returned for the report.  No matching tensor at all is always an error."""
    match = match_weights(model.state_dict(), state)
    where = f"model.pretrained_file '{clip(str(path), 200)}'"
    if not match.loaded:
        raise BalpoeError(f"{where} has no tensor matching backbone '{backbone}' ({match.problems()})")
    if strict and not match.complete:
        raise BalpoeError(f"{where} does not match backbone '{backbone}': {match.problems()}; {len(match.loaded)} of "
                          f"{match.total} tensors ({match.parameters:,} parameters) would load: set "
                          "model.pretrained_strict: false to load those, or use a file of this backbone")
    model.load_state_dict({k: state[k] for k in match.loaded}, strict=False)
    return match
