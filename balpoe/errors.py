"""User-facing errors.

Every mistake a user can make (a bad recipe key, a missing file, an out-of-range value) raises
:class:`BalpoeError` with a single line that names the key, file or value.  The CLI prints it as
``error: <message>`` and exits with :data:`EXIT_USAGE`; no traceback is shown.
"""

from __future__ import annotations

import sys

EXIT_USAGE = 2


class BalpoeError(Exception):
    """A one-line, user-facing error (bad input, missing data, invalid recipe)."""


class RunExists(BalpoeError):
    """The output directory already holds a run (``last.pt``) and resuming was not asked for."""

    def __init__(self, out):
        self.out = out
        super().__init__(f"output directory '{out}' already holds a run (last.pt); resume it or choose another "
                         "output directory")


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
