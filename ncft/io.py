"""Atomic writes: the one helper every writer of run-directory files goes through.

A file is written under a temporary name in its target's directory and moved into
place with `os.replace`, which is atomic on POSIX within one filesystem; a directory
is filled under a temporary sibling name and renamed into place. A reader (a resumed
run, `ncft report`, a test) therefore sees the old file or the new one, never half
of one, and a crash leaves at most a hidden `.name.*` temporary behind. The launcher
uses these too (docs/architecture.md §7, rule 1: writes are atomic); ncft cannot import the
launcher, so the helper lives here.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_file(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `target`; it replaces `target` if the body succeeds.

    The body creates the file (so it gets the usual umask permissions, not mkstemp's
    0600: run directories are often shared). The parent directory must exist. On
    failure the temporary file is removed and `target` is left as it was.
    """
    target = Path(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(target: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 `text` to `target` atomically; return the path."""
    with atomic_file(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_json(target: str | os.PathLike[str], payload: Any) -> Path:
    """Write `payload` as indented JSON with sorted keys, atomically; return the path."""
    return write_text(target, json.dumps(payload, indent=2, sort_keys=True))


@contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary sibling directory; it replaces `target` if the body succeeds.

    An existing `target` is moved aside first and deleted only once the new one is in
    place. On failure the temporary directory is removed.
    """
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old)
    else:
        tmp.rename(target)
