"""Verified checkpoints: every checkpoint directory ends with a manifest of what it holds.

```
checkpoints/02-agnews/manifest.json        {"files": {"model.safetensors": {"size", "sha256"},
                                                       <STAGE_STATE>: {...}}}
checkpoints/in-progress/02-agnews/step-00000040/manifest.json   (rank files, progress.json)
```
The manifest is written last and atomically (`ncft.io.write_json`), so a directory
without one was never completed. A resume checks every listed file's size and
SHA-256 before it trusts the directory: bytes zeroed or a file truncated after the
write (a disk fault, a copy gone wrong, a person editing a file) are found and named,
where loading them would train on silently wrong weights. `problem` says why a
directory does not verify; the callers decide what to fall back to
(`launcher.run.rundir.verify_for_resume`, `launcher.run.progress`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ncft.io import write_json

MANIFEST = "manifest.json"
_CHUNK = 8 << 20  # bytes hashed per read: constant memory whatever the file's size


def digest(path: Path) -> dict[str, Any]:
    """A file's size and SHA-256 (read in chunks)."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            sha.update(block)
    return {"size": path.stat().st_size, "sha256": sha.hexdigest()}


def seal(directory: Path, entries: dict[str, dict[str, Any]]) -> Path:
    """Write `directory`'s manifest from `entries` (name -> `digest`), atomically.

    Call it after every listed file is on disk; it marks the directory complete.
    """
    return write_json(Path(directory) / MANIFEST, {"version": 1, "files": entries})


def seal_files(directory: Path, names: list[str]) -> Path:
    """`seal` with the digests of `names`, files inside `directory`."""
    return seal(directory, {name: digest(Path(directory) / name) for name in names})


def read(directory: Path) -> dict[str, dict[str, Any]]:
    """The manifest's entries (name -> size, sha256).

    Raises:
        ValueError: If the manifest is missing or unreadable (naming the file).
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ValueError(f"{path} is missing: the checkpoint was never completed (or an "
                         "ncft without verified checkpoints wrote it)")
    try:
        files = json.loads(path.read_text())["files"]
        return {str(name): {"size": int(e["size"]), "sha256": str(e["sha256"])}
                for name, e in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path} is unreadable ({type(err).__name__}: {err})") from None


def check_file(directory: Path, name: str, want: dict[str, Any]) -> str | None:
    """Why file `name` of `directory` does not match `want` (None: it matches)."""
    path = Path(directory) / name
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != want["size"]:
        return f"{path} has {size} bytes, its manifest says {want['size']} (truncated or grown)"
    if digest(path)["sha256"] != want["sha256"]:
        return f"{path} does not match the SHA-256 in its manifest (its bytes changed)"
    return None


def problem(directory: Path, only: list[str] | None = None) -> str | None:
    """Why `directory` does not verify, naming the file; None if it does.

    Args:
        directory: A checkpoint directory.
        only: Check just these listed files (a rank checks its own shard); the
            manifest itself is always read.
    """
    try:
        files = read(directory)
    except ValueError as err:
        return str(err)
    for name, want in files.items():
        if only is not None and name not in only:
            continue
        why = check_file(directory, name, want)
        if why:
            return why
    missing = [n for n in only or () if n not in files]
    if missing:
        return f"{Path(directory) / MANIFEST} does not list {missing}"
    return None
