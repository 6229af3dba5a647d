"""A lock on the run directory, held for the run's life by the process that launched it.

Two runs writing one directory destroy each other silently: a second run with
`output.overwrite` deleted a live run's checkpoints, and two `output.resume` runs
trained the same tasks into one metrics log. So `ncft run` (the parent process, or
rank 0 under a launcher) takes `RUN/.ncft-lock` before it touches the directory and
removes it when it ends; every other run refuses the directory while the lock is live,
naming the holder's host, pid and SLURM job.

Why a lock *file* created with `O_CREAT | O_EXCL`, and not `flock`/`fcntl`: a run
directory usually lives on a shared file system, and the second run may be on
another node. `O_EXCL` creation is atomic on local file systems and on NFSv3 and later
(Linux clients), Lustre and GPFS, so exactly one creator wins across nodes; `flock`
is local to one node on many NFS setups and needs a mount option on Lustre. A file
cannot vanish with its process, though, so the holder proves it is alive:

- a heartbeat thread touches the file every `HEARTBEAT_S` seconds;
- a lock is *stale* (taken over, with a line saying so) when its holder is on this
  host and its pid is gone; or, on another host, when its heartbeat is older than
  `STALE_AFTER_S`; or when this is a later start of the same SLURM job
  (`SLURM_RESTART_COUNT` higher than the holder's: SLURM never runs two starts of
  one job at once, so a requeued job takes over at once).

Where it does not hold: file systems without atomic `O_EXCL` (NFSv2, some FUSE and
object-store mounts such as s3fs), and nodes whose clocks differ by more than
`STALE_AFTER_S` (a live holder's heartbeat would look stale; run NTP). A takeover
renames the stale file away first, so two runs that find the same stale lock cannot
both take it.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

from launcher.errors import UserError

LOCK = ".ncft-lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


def _me() -> dict[str, Any]:
    return {
        "host": socket.gethostname(), "pid": os.getpid(),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        "started": time.time(), "token": secrets.token_hex(8),
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def describe(holder: dict[str, Any]) -> str:
    """"host H, pid P, SLURM job J" of a lock's holder."""
    text = f"host {holder.get('host')}, pid {holder.get('pid')}"
    if holder.get("slurm_job"):
        text += f", SLURM job {holder['slurm_job']}"
    return text


def stale_reason(holder: dict[str, Any], age_s: float) -> str | None:
    """Why a lock whose heartbeat is `age_s` old is stale, or None if its run is live."""
    me = _me()
    job = holder.get("slurm_job")
    if job and job == me["slurm_job"] and me["slurm_restart"] > int(holder.get("slurm_restart", 0)):
        return f"it was taken by an earlier start of this SLURM job {job}"
    if holder.get("host") == me["host"] and not _pid_alive(int(holder.get("pid", -1))):
        return f"its process {holder.get('pid')} on this host is gone"
    if age_s > STALE_AFTER_S:
        return f"its heartbeat is {age_s:.0f} s old (more than {STALE_AFTER_S:.0f} s)"
    return None


def holder_of(root: Path) -> tuple[dict[str, Any], float] | None:
    """(holder, heartbeat age in seconds) of `root`'s lock, None if there is none."""
    path = Path(root) / LOCK
    try:
        text, mtime = path.read_text(), path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
        holder = holder if isinstance(holder, dict) else {}
    except ValueError:  # a holder killed between create and write: judged by age alone
        holder = {}
    return holder, max(0.0, time.time() - mtime)


def check_free(root: Path) -> None:
    """Refuse if a live run holds `root` (read-only; `RunLock.acquire` decides for real).

    Raises:
        UserError: Naming the live run's host, pid and SLURM job.
    """
    found = holder_of(root)
    if found is None or _mine(found[0]):  # `prepare` checks while this process holds it
        return
    if stale_reason(*found) is None:
        raise _busy(root, *found)


def _mine(holder: dict[str, Any]) -> bool:
    return holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid()


def _busy(root: Path, holder: dict[str, Any], age_s: float) -> UserError:
    return UserError(
        f"output.dir: {root} is in use by a live run ({describe(holder)}; heartbeat "
        f"{age_s:.0f} s ago); wait for it to end or stop it, or choose another output.dir "
        f"(a run that was killed leaves {Path(root) / LOCK}, which is taken over once its "
        "process is gone)")


class RunLock:
    """`RUN/.ncft-lock` for one run: `acquire`, then `release` (or use it as a context).

    Args:
        root: The run directory (created if missing).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / LOCK
        self.me = _me()
        self._stop = threading.Event()
        self._made_root = False
        self._thread: threading.Thread | None = None

    def acquire(self) -> RunLock:
        """Take the lock, taking over a stale one.

        Raises:
            UserError: If a live run holds it (naming host, pid, SLURM job).
        """
        self._made_root = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # each round either wins, refuses, or removes a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                found = holder_of(self.root)
                if found is None:
                    continue  # released meanwhile
                why = stale_reason(*found)
                if why is None:
                    raise _busy(self.root, *found) from None
                self._take_over(found[0], why)
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(self.me, handle)
            self._thread = threading.Thread(target=self._beat, name="ncft-lock", daemon=True)
            self._thread.start()
            return self
        raise UserError(f"output.dir: could not take {self.path}: other runs keep taking it")

    def _take_over(self, holder: dict[str, Any], why: str) -> None:
        aside = self.path.with_name(f"{LOCK}.stale-{self.me['token']}")
        try:
            os.rename(self.path, aside)  # atomic: of two runs taking over, one wins
        except FileNotFoundError:
            return
        aside.unlink(missing_ok=True)
        print(f"ncft: taking over the lock of {self.root} from a run that is gone "
              f"({describe(holder)}): {why}", flush=True)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:  # removed with the directory (a failed run cleans up)
                return

    def owned(self) -> bool:
        """True while the lock file is this object's."""
        found = holder_of(self.root)
        return found is not None and found[0].get("token") == self.me["token"]

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.owned():
            self.path.unlink(missing_ok=True)
        if self._made_root:  # nothing was written (a model that did not convert)
            try:
                self.root.rmdir()
            except OSError:  # not empty: the run's files stay
                pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
