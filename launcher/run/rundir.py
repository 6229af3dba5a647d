"""The run directory's life cycle (docs/architecture.md §7): create, refuse, resume, clean up.

Its paths are named once, in `ncft.run_paths.RunPaths`, because
`ncft.analysis.report` reads the same directory and ncft must not import the
launcher; this module owns what happens to the directory. An existing run is never
overwritten unless the spec says `output.overwrite` (start over) or `output.resume`
(continue from the last complete checkpoint), and a run that fails before its first
checkpoint removes the directory it created. While a run lives, it holds the
directory's lock (`launcher.run.lock`), which `overwrite` and `resume` respect.

A resume trusts nothing it has not verified: `verify_for_resume` checks every stage
checkpoint against its manifest (`launcher.run.manifest`) and falls back to the newest
one that verifies, moving the others aside with a line naming each file and why; the
mid-task checkpoints are verified by the ranks (`launcher.run.progress.resumable`).
A resume may change the engine section (backend, nodes, ranks per node: a SLURM job
requeued onto fewer nodes): a stage checkpoint is a whole model, which any engine and
world size loads.
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
from launcher.run import lock, manifest
from ncft.io import write_json, write_text
from ncft.run_paths import STAGE_STATE, RunPaths

STAGE_MODEL = "model.safetensors"  # a stage checkpoint's weights
SKIPPED = "checkpoints-skipped"  # where a resume moves checkpoints it cannot trust
_POLICY_KEYS = ("resume", "overwrite")


def _comparable(resolved_yaml: str) -> dict:
    data = yaml.safe_load(resolved_yaml)
    for key in (*_POLICY_KEYS, "dir"):  # a run directory copied or moved elsewhere resumes
        data.get("output", {}).pop(key, None)
    # How many ranks on which engine may change on resume: stage checkpoints are whole
    # models, and `progress.resumable` restarts a stage whose shards do not fit.
    data.pop("engine", None)
    return data


def _contents(root: Path) -> list[Path]:
    """What `root` holds besides its lock file."""
    return [p for p in root.iterdir() if p.name != lock.LOCK]


def holds_run(root: Path) -> bool:
    """True if `root` exists and holds anything but a lock (a run, or something else)."""
    return root.is_dir() and bool(_contents(root))


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
    if run.root.is_dir():
        lock.check_free(run.root)
    if not holds_run(run.root) or overwrite:
        return
    if not resume:
        raise UserError(
            f"output.dir: {run.root} already holds a run; set output.resume=true to "
            "continue it or output.overwrite=true to start over"
        )
    if run.spec.is_file():
        try:
            before = _comparable(run.spec.read_text())
        except (yaml.YAMLError, AttributeError) as err:
            raise UserError(f"output.resume: {run.spec} is unreadable ({err}); restore it or "
                            "use a new output.dir") from None
        now = _comparable(resolved_yaml)
        if before != now:
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            raise UserError(
                f"output.resume: the spec differs from the one {run.root} started with "
                f"(sections {changed}); resume with the same spec or use a new output.dir"
            )


def prepare(root: Path, resolved_yaml: str, resume: bool, overwrite: bool) -> RunPaths:
    """Create or reopen a run directory according to the output policy (rank 0 only).

    Call it holding the directory's lock (`launcher.run.lock.RunLock`); overwriting
    keeps the lock file. A resume verifies the checkpoints first (`verify_for_resume`).

    Raises:
        UserError: As `check_policy` and `verify_for_resume`.
    """
    check_policy(root, resolved_yaml, resume, overwrite)
    run = RunPaths(Path(root))
    if overwrite and holds_run(run.root):
        for path in _contents(run.root):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    elif resume and holds_run(run.root):
        for line in verify_for_resume(run):
            print(f"ncft: {line}", flush=True)
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
    """(index, dir) of the newest sealed stage checkpoint (its manifest exists), else None.

    The ranks call this after `verify_for_resume` moved aside what does not verify.
    """
    best = None
    for index, path in run.stage_dirs():
        if (path / manifest.MANIFEST).is_file():
            best = (index, path)
    return best


def verify_for_resume(run: RunPaths) -> list[str]:
    """Verify every stage checkpoint; keep the verified ones before the first bad one.

    The first checkpoint that does not verify, and every later one (they were trained
    from it), move to `RUN/checkpoints-skipped/`, so the resume continues after the
    newest checkpoint that verifies and retrains the rest.

    Returns:
        Lines to print: each checkpoint skipped, naming the file and why.

    Raises:
        UserError: If there are stage checkpoints and none verifies (naming the file).
    """
    dirs = list(run.stage_dirs())
    bad = next(((i, p, why) for i, p in dirs if (why := manifest.problem(p))), None)
    if bad is None:
        return []
    first, path, why = bad
    if first == 0 or not any(i < first for i, _ in dirs):
        raise UserError(f"output.resume: no checkpoint of {run.root} verifies: {why}; delete "
                        f"{path} to start that stage again from its start, or set "
                        "output.overwrite=true to start the run over")
    lines = [f"skipping checkpoint {path}: {why}"]
    skipped = run.root / SKIPPED
    skipped.mkdir(exist_ok=True)
    for index, later in dirs:
        if index < first:
            continue
        target = skipped / f"{later.name}.{int(time.time())}"
        later.rename(target)
        if later != path:
            lines.append(f"skipping checkpoint {later}: it was trained from the skipped one")
        lines.append(f"  moved to {target} (delete it once you have looked)")
    shutil.rmtree(run.in_progress, ignore_errors=True)  # shards of the stages retrained
    newest = max(p for i, p in dirs if i < first)
    lines.append(f"resuming after stage {first} ({newest.name}), the newest checkpoint "
                 "that verifies")
    return lines


def read_state(stage_dir: Path) -> dict[str, Any]:
    """The bookkeeping saved with a stage checkpoint.

    Raises:
        UserError: If state.json cannot be read, naming it.
    """
    path = stage_dir / STAGE_STATE
    try:
        state = json.loads(path.read_text())
        _ = state["matrix"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path} is unreadable ({type(err).__name__}: {err}); resume "
                        "verifies it against its manifest, so it changed since") from None
    return state


class MetricsLog:
    """Appends one JSON object per logged step to metrics.jsonl (rank 0 only)."""

    def __init__(
        self, path: Path, enabled: bool, keep_until: tuple[int, int] | None = None
    ) -> None:
        self.path, self.enabled = path, enabled
        if enabled and keep_until is not None and path.exists():
            # A resumed run drops the lines logged after its checkpoint (stage, step),
            # so the log ends up identical in shape to an uninterrupted run's.
            kept = [line for line, record in read_metrics(path) if _before(record, keep_until)]
            write_text(path, "".join(line + "\n" for line in kept))

    def write(self, **record: Any) -> None:
        """Append a record (adds a wall-clock timestamp)."""
        if not self.enabled:
            return
        record.setdefault("time", time.time())
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of every complete line of metrics.jsonl.

    A last line that does not parse is what a crash during an append leaves: it is
    dropped with a warning. A bad line before the last is damage, not a crash.

    Raises:
        UserError: For a line other than the last that does not parse, naming the
            file and line.
    """
    lines = path.read_text().split("\n")
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            if all(not rest.strip() for rest in lines[number:]):
                print(f"ncft: warning: dropping the partial last line {number} of {path} "
                      f"(a crash during an append): {line[:80]!r}", flush=True)
                continue
            raise UserError(f"{path} line {number} is not a JSON object ({err}); fix or "
                            "delete that line") from None
        out.append((line, record))
    return out


def _before(record: dict[str, Any], until: tuple[int, int]) -> bool:
    stage, step = record.get("stage", 0), record.get("step", 0)
    return stage < until[0] or (stage == until[0] and step <= until[1])


def write_results(run: RunPaths, payload: dict[str, Any]) -> None:
    """results.json, atomically."""
    write_json(run.results, payload)
