"""``metrics.jsonl``: the per-epoch log a training run appends (one JSON object a line) and the
run report, the test curve and a resumed run read back.

:func:`metrics_rows` is its one reader.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from balpoe.errors import BalpoeError
from balpoe.runtime.files import parse_json, read_text


def finite_number(x) -> float | None:
    """A value read from a run file as a finite float, or None (null, NaN, inf, a bool, anything
    that is not a number)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def metrics_rows(path: str | Path, upto: int | None = None) -> list[tuple[dict, str]]:
    """The rows of ``metrics.jsonl`` with the text of their lines, one per epoch in epoch order: an
    epoch logged twice (a resumed run) keeps its later line.  A missing file has no rows; a link is
    refused.

    Without ``upto`` (a finished log: the report) every non-blank line must be a JSON object, else a
    :class:`BalpoeError` names the file and the line; a row without a numeric ``epoch`` counts as the
    next epoch.  With ``upto`` (resuming at epoch ``upto``) only rows with an integer epoch in
    ``1..upto`` are kept, and a line that is not a JSON object (one cut by a crash) is dropped."""
    path = Path(path)
    if not os.path.lexists(path):
        return []
    by_epoch: dict[float, tuple[dict, str]] = {}
    for lineno, line in enumerate(read_text(path, "metrics file", follow_links=False).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = parse_json(line, f"{path}, line {lineno}")
            if not isinstance(row, dict):
                raise BalpoeError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
        except BalpoeError:
            if upto is None:
                raise
            continue
        epoch = row.get("epoch")
        if upto is not None:
            if isinstance(epoch, int) and not isinstance(epoch, bool) and 1 <= epoch <= upto:
                by_epoch[float(epoch)] = (row, line)
            continue
        number = finite_number(epoch)
        by_epoch[number if number is not None else float(len(by_epoch) + 1)] = (row, line)
    return [by_epoch[e] for e in sorted(by_epoch)]
