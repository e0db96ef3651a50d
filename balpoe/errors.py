"""User-facing errors.

Every mistake a user can make (a bad recipe key, a missing file, an out-of-range value) raises
:class:`BalpoeError` with a single line that names the key, file or value.  The CLI prints it as
``error: <message>`` and exits with :data:`EXIT_USAGE`; no traceback is shown.
"""

from __future__ import annotations

EXIT_USAGE = 2


class BalpoeError(Exception):
    """A one-line, user-facing error (bad input, missing data, invalid recipe)."""
