"""The two errors the `ncft` command prints as one line instead of a traceback.

`UserError` is a problem the user fixes (a spec field, a file, a model name, the
state of the output directory); its message names the field and the fix.
`RanksFailed` says that a spawned rank failed, in that rank's own words;
`RanksDiverged` that the ranks stopped on an inf/nan loss or gradient norm
(`ncft.train.Diverged` in a rank), which exits with its own code, `EXIT_DIVERGED`.
All are caught at the top of `launcher.cli.main`; `--debug` or `NCFT_DEBUG=1` shows the
tracebacks instead (the ranks inherit the variable).
"""

from __future__ import annotations

import os

DEBUG_ENV = "NCFT_DEBUG"
EXIT_DIVERGED = 76  # training stopped on an inf/nan loss or gradient norm


class UserError(ValueError):
    """A run-time user error: the message names the spec field (or file) and the fix."""


class RanksFailed(RuntimeError):
    """A spawned rank failed; the message is that rank's error on one line."""


class RanksDiverged(RanksFailed):
    """The ranks stopped on an inf/nan loss or gradient norm; the message says where."""


def debugging() -> bool:
    """True if tracebacks were asked for (`--debug` or `NCFT_DEBUG=1`)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")
