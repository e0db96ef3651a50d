"""User-facing errors.

Every mistake a user can make (a bad recipe key, a missing file, an out-of-range value) raises
:class:`BalpoeError` with a single line that names the key, file or value.  The CLI prints it as
``error: <message>`` and exits with :data:`EXIT_USAGE`; no traceback is shown.
"""

from __future__ import annotations

EXIT_USAGE = 2


class BalpoeError(Exception):
    """A one-line, user-facing error (bad input, missing data, invalid recipe)."""


def run_reporting_errors(fn, *args, **kwargs):
    """Run ``fn``; a :class:`BalpoeError` prints ``error: <message>`` on stderr and exits with
    :data:`EXIT_USAGE` (for scripts such as the benchmarks; the CLI does the same in ``main``)."""
    import sys
    try:
        return fn(*args, **kwargs)
    except BalpoeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
