"""Run a Python entry point on N local ranks with the torch elastic API.

Under an existing launcher (torchrun, deepspeed, srun with the torch env set) the
entry point runs directly as this process's rank; with one process it runs in
place; otherwise it spawns `nproc` workers on loopback and fails if any fails.

A failing rank is reported as one line, not as the elastic agent's log of every
rank's traceback: each rank writes its error's message to a private folder, and the
parent raises `UserError` (a `ValueError` in a rank: a problem the user fixes) or
`RanksFailed` with the first failing rank's message (`RanksDiverged` for a run that
stopped on an inf/nan loss or gradient norm). `NCFT_DEBUG=1` keeps the agent's
full log.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from launcher.dist import free_port
from launcher.errors import RanksDiverged, RanksFailed, UserError, debugging

# The elastic agent logs each failed rank's traceback; torch.multiprocessing logs
# the SIGTERM it sends the surviving ranks.
_AGENT_LOGGERS = ("torch.distributed.elastic", "torch.multiprocessing")


def under_launcher() -> bool:
    """True if a launcher already set this process's rank environment."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def run_local(entry: Callable[..., Any], nproc: int, *args: Any) -> None:
    """Call `entry(*args)` on `nproc` ranks of this machine.

    Args:
        entry: A module-level function (workers are spawned, so it is pickled).
        nproc: Ranks to run; 1 runs in this process.
        *args: Picklable arguments.

    Raises:
        UserError: If a rank raised a `ValueError` (its message, one line).
        RanksFailed: If a rank failed otherwise (raised, was killed, or exited).
    """
    if under_launcher() or nproc == 1:
        entry(*args)
        return
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # DeepSpeed reads this at import time in each worker; gloo must stay on loopback.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex[:8],
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=0,
        local_addr="127.0.0.1", monitor_interval=0.5,
    )
    reports = Path(tempfile.mkdtemp(prefix="ncft-ranks-"))
    try:
        with _quiet_agent():
            elastic_launch(config, _reporting)(entry, str(reports), *args)
    except ChildFailedError as err:
        raise _first_failure(err, reports) from None
    finally:
        shutil.rmtree(reports, ignore_errors=True)


def _reporting(entry: Callable[..., Any], reports: str, *args: Any) -> Any:
    """A rank's body: `entry(*args)`, leaving a failure's message in `reports`."""
    try:
        return entry(*args)
    except Exception as exc:
        from ncft.train import Diverged

        user = isinstance(exc, ValueError)
        kind = "user" if user else "diverged" if isinstance(exc, Diverged) else "failed"
        # A user error's message is written for the user as is; anything else is
        # squeezed onto one line (library messages often span several).
        text = str(exc).strip() if user else f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        rank = os.environ.get("RANK", "0")
        (Path(reports) / f"rank-{rank}.json").write_text(
            json.dumps({"kind": kind, "message": text})
        )
        raise


def _first_failure(err: Exception, reports: Path) -> Exception:
    """The error to raise for a failed launch: the root-cause rank's own message."""
    rank, failure = err.get_first_failure()
    files = [reports / f"rank-{rank}.json", *sorted(reports.glob("rank-*.json"),
                                                    key=lambda p: p.stat().st_mtime)]
    for path in files:
        if path.is_file():
            report = json.loads(path.read_text())
            if report["kind"] == "user":
                return UserError(report["message"])
            if report["kind"] == "diverged":  # every rank stops at once: no rank prefix
                return RanksDiverged(str(report["message"]).split(": ", 1)[1])
            return RanksFailed(f"rank {path.stem[5:]}: {report['message']}")
    if failure.exitcode < 0:
        return RanksFailed(f"rank {rank} was killed by {failure.signal_name()}")
    return RanksFailed(f"rank {rank} exited with code {failure.exitcode}")


@contextmanager
def _quiet_agent() -> Iterator[None]:
    """Silence the agent's failure log (every rank's traceback) unless debugging."""
    logs = [logging.getLogger(name) for name in _AGENT_LOGGERS]
    before = [log.level for log in logs]
    if not debugging():
        for log in logs:
            log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for log, level in zip(logs, before):
            log.setLevel(level)
