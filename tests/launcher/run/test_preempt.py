"""Preemption: SIGTERM to a real `ncft run` (2 FSDP2 ranks) stops it at a checkpoint;
the "requeued" run (same command, SLURM's restart variables) resumes by itself and
ends bit-identical to an uninterrupted run.

Rank 0 is held after step 1 of task 2 (`NCFT_FAULT_PAUSE_AT_STEP`) so the signal
lands at a known step instead of racing a tiny model's millisecond steps; the signal
itself is a real SIGTERM to the parent `ncft run`, forwarded by torch's elastic agent
like torchrun does under SLURM.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.run import preempt
from launcher.spec import load_spec
from tests.support.rundirs import assert_same_run
from tests.support.spawn import REPO, torchrun, wait_for_file, worker_env

pytestmark = pytest.mark.dist

SPEC = REPO / "examples" / "tiny_ncft.yaml"
SMALL = [
    "engine.backend=fsdp2", "training.steps=3", "selection.num_examples=8",
    "eval.batch_size=8", "output.overwrite=true",
    *[f"tasks.{i}.{k}={v}" for i in range(3)
      for k, v in (("train_size", 16), ("eval_size", 8), ("max_length", 176))],
]


def _cmd(run: Path) -> list[str]:
    return [sys.executable, "-m", "launcher", "run", str(SPEC), f"output.dir={run}", *SMALL]


def _run(run: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cmd(run), env=worker_env(env), cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def test_sigterm_stops_at_a_checkpoint_and_the_requeued_run_resumes_by_itself(tmp_path):
    cache, job = str(tmp_path / "cache"), {"SLURM_JOB_ID": "4711"}
    ref = tmp_path / "ref"
    _run(ref, {"NCFT_CACHE": cache})

    run, pause, stopped = tmp_path / "run", tmp_path / "paused", tmp_path / "stopped"
    env = worker_env({"NCFT_CACHE": cache, **job, preempt.PAUSE_AT_STEP: "2:1",
                      preempt.PAUSE_FILE: str(pause), preempt.STOPPED_FILE: str(stopped)})
    proc = subprocess.Popen(_cmd(run), env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_file(pause, proc)  # held after step 1 of task 2
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == preempt.EXIT_PREEMPTED, out[-6000:]
    assert "stopped on SIGTERM after step 1/3 of stage 2" in out
    assert stopped.is_file(), "NCFT_STOPPED_FILE tells the SLURM template to requeue"
    step_dir = run / "checkpoints" / "in-progress" / "02-agnews" / "step-00000001"
    assert (step_dir / "progress.json").is_file()
    assert len(list(step_dir.glob("rank-*-of-00002.safetensors"))) == 2
    assert not (run / "checkpoints" / "02-agnews").exists()
    assert not (run / "results.json").exists()

    # The requeued job: same command line (output.overwrite=true included), and
    # SLURM's restart count; the run directory belongs to this job, so it resumes.
    resumed = _run(run, {"NCFT_CACHE": cache, **job, "SLURM_RESTART_COUNT": "1"})
    assert "resuming agnews at step 1/3" in resumed.stdout
    assert_same_run(run, ref)


@pytest.mark.parametrize(
    ("env", "resumes"),
    [
        ({"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "1"}, True),
        ({"SLURM_JOB_ID": "8", "SLURM_RESTART_COUNT": "1"}, False),  # another job's run
        ({"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "0"}, False),  # the first start
        ({}, False),  # not under SLURM
    ],
)
def test_only_a_restart_of_the_owning_job_resumes(tmp_path, monkeypatch, env, resumes):
    for key in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    preempt.record_job(tmp_path)
    monkeypatch.delenv("SLURM_JOB_ID")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert preempt.requeued(tmp_path) == resumes
    spec = load_spec(SPEC, [f"output.dir={tmp_path}", "output.overwrite=true"])
    out = preempt.resume_if_requeued(spec).output
    assert (out.resume, out.overwrite) == ((True, False) if resumes else (False, True))


AGREE = """
import os, signal
import torch.distributed as dist
from launcher.dist import init_distributed
from launcher.run import preempt
from launcher.spec import load_spec
info = init_distributed()
preempt.install()
before = preempt.agreed(info.device)
if info.rank == 1:
    os.kill(os.getpid(), signal.SIGTERM)  # only rank 1 is told to stop
after = preempt.agreed(info.device)
print(f"flag on {info.device.type} ({info.backend})", flush=True)
print(f"rank {info.rank}: signalled={preempt._requested} before={before} after={after}",
      flush=True)
dist.destroy_process_group()
"""


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    out = torchrun(script, 2, []).stdout
    assert "rank 0: signalled=False before=False after=True" in out
    assert "rank 1: signalled=True before=False after=True" in out


@pytest.mark.gpu
def test_the_stop_flag_is_a_cuda_tensor_under_nccl(tmp_path):
    # One GPU allows one NCCL rank (two ranks may not share a device), so this checks
    # the flag's device and the NCCL all-reduce of it; the 2-rank agreement is the
    # gloo test above.
    script = tmp_path / "agree.py"
    script.write_text(AGREE.replace("info.rank == 1", "info.rank == 0"))
    out = torchrun(script, 1, []).stdout
    assert "flag on cuda (nccl)" in out
    assert "rank 0: signalled=True before=False after=True" in out
