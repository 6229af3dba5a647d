"""Preemption: stop on SIGTERM at an optimizer-step boundary, checkpoint, exit for requeue.

SLURM preemption and time limits send SIGTERM, then SIGKILL after a grace period
(`GraceTime`, `KillWait`, or the lead the job asked for with `--signal=TERM@secs`).
Each rank's handler only raises a flag; the run acts on it at the next point where
every rank is in step:

- after every optimizer step (`LauncherBackend.after_step`): the ranks all-reduce the
  flag (MAX, one int on the engine's device, so NCCL gets a CUDA tensor), so a signal
  that reaches the ranks a step apart still stops them all after the *same* step;
  then each rank writes its mid-task shard (`launcher.run.progress`) and the run
  exits with `EXIT_PREEMPTED`;
- after every stage checkpoint (`LauncherBackend.save_stage`): the stage is already
  on disk, so the run just exits.

A stopped rank touches the file named by `NCFT_STOPPED_FILE` (when set): the SLURM
templates requeue the job when it exists, because launchers (torchrun, DeepSpeed's)
do not pass a worker's exit code through. A requeued job resumes by itself:
`resume_if_requeued` turns the spec's output policy into "resume" when SLURM says
this is a restart (`SLURM_RESTART_COUNT` > 0) of the job that created the run directory
(`RUN/.slurm-job`), so the command line never needs editing.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from launcher.dist import all_reduce_

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"
STOPPED_FILE = "NCFT_STOPPED_FILE"
# torch elastic's agent forwards SIGTERM to its workers and SIGKILLs them after this
# many seconds (its default is 30): long enough for one step plus a checkpoint.
GRACE_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
GRACE_S = "110"
_JOB_FILE = ".slurm-job"

_requested = False


class Preempted(Exception):
    """Raised on every rank once the run has stopped at a checkpoint."""


def _on_signal(signum: int, frame) -> None:
    global _requested
    _requested = True
    # print() is not safe inside a signal handler; one write(2) is.
    os.write(2, f"ncft: got signal {signum}; stopping after this optimizer step\n".encode())


def install() -> None:
    """Make SIGTERM a stop request on this rank (call from the main thread).

    An inherited "ignore" disposition is replaced too: the templates start
    DeepSpeed's launcher with SIGTERM ignored so that only the ranks act on it.
    """
    global _requested
    _requested = False
    signal.signal(signal.SIGTERM, _on_signal)


def agreed(device: torch.device) -> bool:
    """Whether any rank got SIGTERM (collective: every rank calls it at the same point).

    Args:
        device: Where the flag lives; the engine's device (CUDA under NCCL).
    """
    flag = torch.tensor([1 if _requested else 0], dtype=torch.int32)
    if dist.is_initialized():  # through the placement helper, like every collective
        all_reduce_(flag, device, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def stop(where: str) -> None:
    """Leave the run after its checkpoint: touch `NCFT_STOPPED_FILE`, raise `Preempted`.

    Raises:
        Preempted: Always; `run_rank` turns it into exit code `EXIT_PREEMPTED`.
    """
    marker = os.environ.get(STOPPED_FILE)
    if marker:
        try:
            Path(marker).touch()
        except OSError:  # the templates' marker directory exists on the first node only
            pass
    raise Preempted(f"stopped on SIGTERM {where}; the checkpoint is written")


def requeued(root: Path) -> bool:
    """True in a restart (`SLURM_RESTART_COUNT` > 0) of the SLURM job that owns `root`."""
    job, restarts = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_RESTART_COUNT", "0")
    recorded = Path(root) / _JOB_FILE
    return bool(job) and restarts.isdigit() and int(restarts) > 0 and recorded.is_file() \
        and recorded.read_text().strip() == job


def resume_if_requeued(spec):
    """The spec with `output.resume` on (and `overwrite` off) in a requeued job's restart.

    Args:
        spec: The validated `launcher.spec.Spec`.

    Returns:
        `spec` itself, or a copy whose output policy resumes the job's own run: its
        command line still says what the first start said (`output.overwrite=true`
        included), which must not wipe the progress the job made.
    """
    out = spec.output
    if out.resume or not requeued(out.dir):
        return spec
    if os.environ.get("RANK", "0") == "0":  # under a launcher every rank gets here
        print(f"ncft: SLURM job {os.environ['SLURM_JOB_ID']} restart "
              f"{os.environ['SLURM_RESTART_COUNT']}: resuming {out.dir}", flush=True)
    output = out.model_copy(update={"resume": True, "overwrite": False})
    return spec.model_copy(update={"output": output})


def record_job(root: Path) -> None:
    """Note which SLURM job owns the run directory (nothing outside SLURM)."""
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        (Path(root) / _JOB_FILE).write_text(job + "\n")


# Fault injection for the preemption tests: at "N:K" (after optimizer step K of stage
# N, 1-based) rank 0 touches PAUSE_FILE and waits for SIGTERM, so a test can signal
# the run at a known step instead of racing it.
PAUSE_AT_STEP = "NCFT_FAULT_PAUSE_AT_STEP"
PAUSE_FILE = "NCFT_FAULT_PAUSE_FILE"


def fault_pause(point: str, rank: int, timeout_s: float = 600.0) -> None:
    """Hold rank 0 at `point` until SIGTERM when `NCFT_FAULT_PAUSE_AT_STEP` names it.

    Once per pause file: a requeued job keeps its environment, and one that restarts
    the task from its boundary passes the same step again.
    """
    if rank != 0 or os.environ.get(PAUSE_AT_STEP) != point or \
            Path(os.environ[PAUSE_FILE]).exists():
        return
    Path(os.environ[PAUSE_FILE]).touch()
    deadline = time.monotonic() + timeout_s
    while not _requested and time.monotonic() < deadline:
        time.sleep(0.05)
