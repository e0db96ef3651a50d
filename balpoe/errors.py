"""User-facing errors.

Every mistake a user can make (a bad recipe key, a missing file, an out-of-range value) raises
:class:`BalpoeError` with a single line that names the key, file or value.  The CLI prints it as
``error: <message>`` and exits with :data:`EXIT_USAGE`; no traceback is shown.
"""

from __future__ import annotations

import reprlib
import sys
from pathlib import Path
from typing import Any, Iterable

EXIT_USAGE = 2

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 2, 4, 4, 4, 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 80, 80, 40
#: Characters of a value (or key, or path) shown in an error message.
SHOWN_CHARS = 200


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """A bounded, one-line ``repr`` of ``value`` for error messages: nested containers are cut
    after a few items and levels (a YAML alias chain is never expanded), long strings and numbers
    are elided in the middle, and the result has at most ``limit`` characters."""
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the real error
        text = f"<{type(value).__name__}>"
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip(text: Any, limit: int = SHOWN_CHARS) -> str:
    """``str(text)`` on one line (non-printable characters escaped) and cut to ``limit`` characters."""
    text = str(text)[: limit + 1]
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def quoted(text: Any, limit: int = SHOWN_CHARS) -> str:
    """``'text'`` for a short printable string (a key, a name or a path), else :func:`shown` of
    it (a bounded ``repr``, control characters escaped)."""
    if isinstance(text, Path):
        text = str(text)
    if isinstance(text, str) and len(text) <= limit and text.isprintable():
        return f"'{text}'"
    return shown(text, limit)


def check_choice(what: str, value: Any, choices: Iterable[str]) -> str:
    """``value`` when it is one of ``choices`` (names, or a mapping keyed by them), else a one-line
    :class:`BalpoeError`: ``<what> must be one of a, b, c; got 'x'``."""
    names = list(choices)
    if not isinstance(value, str) or value not in names:
        raise BalpoeError(f"{what} must be one of {', '.join(names)}; got {shown(value)}")
    return value


def short_path(path: str | Path, limit: int = 120) -> str:
    """``path`` for a message, elided in the middle beyond ``limit`` characters."""
    text = clip(path, 10 * limit)
    return text if len(text) <= limit else text[: limit // 2 - 2] + "..." + text[-(limit // 2 - 1):]


class BalpoeError(Exception):
    """A one-line, user-facing error (bad input, missing data, invalid recipe)."""


class NotApplicable(BalpoeError):
    """An option that does not apply to this model or these data (e.g. an adaptation mode that
    weighs experts, on a one-expert model); a caller running many (``balpoe compare``) may skip it."""


class RunExists(BalpoeError):
    """The output directory already holds a run (``last.pt``) and resuming was not asked for."""

    def __init__(self, out):
        self.out = out
        super().__init__(f"output directory '{out}' already holds a run (last.pt); resume it or choose another "
                         "output directory")


class UnfinishedRun(RunExists):
    """The output directory holds the files of a run that stopped before its first checkpoint
    (``recipe.yaml``, ``metrics.jsonl``) and starting it again was not asked for."""

    def __init__(self, out, files):
        self.out, self.files = out, list(files)
        BalpoeError.__init__(self, f"output directory '{out}' holds a run that stopped before its first checkpoint "
                             f"({', '.join(self.files)}); start it again with resume 'auto' or choose another output "
                             "directory")


class OutputExists(BalpoeError):
    """An output file a command would write exists already, and replacing it was not asked for."""

    def __init__(self, path, what: str):
        self.path, self.what = path, what
        super().__init__(f"{what} '{path}' already exists; replacing it was not asked for (overwrite=True), or "
                         "choose another path")


class NoRunToResume(BalpoeError):
    """Resuming was asked for but the output directory holds no ``last.pt``."""

    def __init__(self, out):
        self.out = out
        super().__init__(f"no checkpoint to resume in '{out}' (expected last.pt)")


def run_reporting_errors(fn, *args, **kwargs):
    """Run ``fn``; a :class:`BalpoeError` prints ``error: <message>`` on stderr and exits with
    :data:`EXIT_USAGE` (for scripts such as the benchmarks; the CLI does the same in ``main``)."""
    try:
        return fn(*args, **kwargs)
    except BalpoeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
