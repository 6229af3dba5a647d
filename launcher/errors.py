"""The two errors the `ncft` command prints as one line instead of a traceback.

`UserError` is a problem the user fixes (a spec field, a file, a model name, the
state of the output directory); its message names the field and the fix.
`RanksFailed` says that a spawned rank failed, in that rank's own words. Both are
caught at the top of `launcher.cli.main`; `--debug` or `NCFT_DEBUG=1` shows the
tracebacks instead (the ranks inherit the variable).
"""

from __future__ import annotations

import os

DEBUG_ENV = "NCFT_DEBUG"


class UserError(ValueError):
    """A run-time user error: the message names the spec field (or file) and the fix."""


class RanksFailed(RuntimeError):
    """A spawned rank failed; the message is that rank's error on one line."""


def debugging() -> bool:
    """True if tracebacks were asked for (`--debug` or `NCFT_DEBUG=1`)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")
