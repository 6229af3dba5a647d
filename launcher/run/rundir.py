"""The run directory's life cycle (docs/architecture.md §7): create, refuse, resume, clean up.

Its paths are named once, in `ncft.run_paths.RunPaths`, because
`ncft.analysis.report` reads the same directory and ncft must not import the
launcher; this module owns what happens to the directory. An existing run is never
overwritten unless the spec says `output.overwrite` (start over) or `output.resume`
(continue from the last complete checkpoint), and a run that fails before its first
checkpoint removes the directory it created.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from launcher.errors import UserError
from ncft.io import write_json, write_text
from ncft.run_paths import STAGE_STATE, RunPaths

_POLICY_KEYS = ("resume", "overwrite")


def _comparable(resolved_yaml: str) -> dict:
    data = yaml.safe_load(resolved_yaml)
    for key in _POLICY_KEYS:
        data.get("output", {}).pop(key, None)
    return data


def holds_run(root: Path) -> bool:
    """True if `root` exists and is not empty (a run, or something else, lives there)."""
    return root.is_dir() and any(root.iterdir())


def check_policy(root: Path, resolved_yaml: str, resume: bool, overwrite: bool) -> None:
    """Check that the output policy allows a run in `root`; create nothing.

    Raises:
        UserError: If `root` is not a directory, or holds a run and neither policy is
            set, or if a resumed run's spec differs from the one it started with.
    """
    run = RunPaths(Path(root))
    if run.root.exists() and not run.root.is_dir():
        raise UserError(f"output.dir: {run.root} is a file, not a directory; "
                        "set output.dir to a new or existing directory")
    if not holds_run(run.root) or overwrite:
        return
    if not resume:
        raise UserError(
            f"output.dir: {run.root} already holds a run; set output.resume=true to "
            "continue it or output.overwrite=true to start over"
        )
    if run.spec.is_file():
        before, now = _comparable(run.spec.read_text()), _comparable(resolved_yaml)
        if before != now:
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            raise UserError(
                f"output.resume: the spec differs from the one {run.root} started with "
                f"(sections {changed}); resume with the same spec or use a new output.dir"
            )


def prepare(root: Path, resolved_yaml: str, resume: bool, overwrite: bool) -> RunPaths:
    """Create or reopen a run directory according to the output policy (rank 0 only).

    Raises:
        UserError: As `check_policy`.
    """
    check_policy(root, resolved_yaml, resume, overwrite)
    run = RunPaths(Path(root))
    if overwrite and holds_run(run.root):
        shutil.rmtree(run.root)
    for path in (run.root, run.neurons, run.checkpoints, run.plots):
        path.mkdir(parents=True, exist_ok=True)
    write_text(run.spec, resolved_yaml)
    return run


def started(run: RunPaths) -> bool:
    """True once a run has something to resume: a stage or a mid-task checkpoint."""
    return run.checkpoints.is_dir() and any(run.checkpoints.iterdir())


@contextmanager
def removed_unless_started(run: RunPaths, created: bool) -> Iterator[None]:
    """Remove a run directory this invocation created if the body fails before it started.

    A failure before the first checkpoint (a model that does not load, a bad data row,
    a rank killed early) leaves nothing to resume; keeping the half-made directory
    would only make the corrected rerun fail with "already holds a run". A directory
    that held a run before (`output.resume`) is never removed.
    """
    try:
        yield
    except BaseException:
        if created and not started(run):
            shutil.rmtree(run.root, ignore_errors=True)
        raise


def last_complete_stage(run: RunPaths) -> tuple[int, Path] | None:
    """(index, dir) of the newest checkpoint whose state.json exists, else None."""
    best = None
    for index, path in run.stage_dirs():
        if (path / STAGE_STATE).is_file():
            best = (index, path)
    return best


def read_state(stage_dir: Path) -> dict[str, Any]:
    """The bookkeeping saved with a stage checkpoint."""
    return json.loads((stage_dir / STAGE_STATE).read_text())


class MetricsLog:
    """Appends one JSON object per logged step to metrics.jsonl (rank 0 only)."""

    def __init__(
        self, path: Path, enabled: bool, keep_until: tuple[int, int] | None = None
    ) -> None:
        self.path, self.enabled = path, enabled
        if enabled and keep_until is not None and path.exists():
            # A resumed run drops the lines logged after its checkpoint (stage, step),
            # so the log ends up identical in shape to an uninterrupted run's.
            kept = [
                line for line in path.read_text().splitlines()
                if line and _before(json.loads(line), keep_until)
            ]
            write_text(path, "\n".join(kept) + ("\n" if kept else ""))

    def write(self, **record: Any) -> None:
        """Append a record (adds a wall-clock timestamp)."""
        if not self.enabled:
            return
        record.setdefault("time", time.time())
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def _before(record: dict[str, Any], until: tuple[int, int]) -> bool:
    stage, step = record.get("stage", 0), record.get("step", 0)
    return stage < until[0] or (stage == until[0] and step <= until[1])


def write_results(run: RunPaths, payload: dict[str, Any]) -> None:
    """results.json, atomically."""
    write_json(run.results, payload)
