"""Both templates on a real SLURM (tests/slurm/cluster.py), as a user submits them.

`sbatch slurm/{torchrun,deepspeed}.slurm run examples/tiny_ncft.yaml` on 1 node x 2
ranks and on 2 nodes x 1 rank (a CPU cluster: NCFT_RANKS_PER_NODE, no GPU request),
each from an empty submit directory that must hold only the job's log afterwards.
The 2-node jobs are also the preemption test: each gets SIGTERM from SLURM (`scancel
--signal=TERM`, what `--signal=TERM@120` sends before the time limit), stops at a
checkpoint, requeues itself, and the requeued job resumes by itself and ends
bit-identical to the uninterrupted 1-node job of the same template (same two
ranks, engine and data order).

All four jobs are submitted at once and fit the cluster together (2 nodes x 4
CPUs), so the module costs a few minutes, not one job after another.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launcher.run import preempt
from tests.slurm import cluster as slurm
from tests.support.spawn import REPO, worker_env

# The first test to wait on the jobs bears most of the module's few minutes.
pytestmark = [pytest.mark.slurm, pytest.mark.dist, pytest.mark.timeout(900)]

SPEC = REPO / "examples" / "tiny_ncft.yaml"
SMALL = [
    "training.steps=3", "selection.num_examples=8", "eval.batch_size=8",
    *[f"tasks.{i}.{k}={v}" for i in range(3)
      for k, v in (("train_size", 16), ("eval_size", 8), ("max_length", 176))],
]
BACKEND = {"torchrun": "fsdp2", "deepspeed": "deepspeed"}
PAUSE = "2:1"  # the 2-node jobs are held after step 1 of task 2 until SIGTERM


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = slurm.unavailable()
    if reason:
        pytest.skip(f"real SLURM: {reason}")
    running = slurm.start(tmp_path_factory.mktemp("slurm"))
    yield running
    running.stop()


class Job:
    """One submitted job: its id, submit directory and run directory."""

    def __init__(self, cluster: slurm.Cluster, tmp: Path, template: str, nodes: int,
                 ranks: int, extra_env: dict | None = None) -> None:
        self.cluster, self.template = cluster, template
        self.submit_dir, self.run = tmp / "submit", tmp / "run"
        self.pause = tmp / "paused"  # written by rank 0 where PAUSE holds it
        self.submit_dir.mkdir(parents=True)
        env = worker_env({
            **cluster.env, "NCFT_CACHE": str(tmp / "cache"),
            "NCFT_RANKS_PER_NODE": str(ranks),
            # the venv's torchrun/deepspeed first, as after `source .venv/bin/activate`
            "PATH": f"{Path(sys.executable).parent}:{cluster.env['PATH']}",
            **(extra_env or {}),
        })
        env = {k: v for k, v in env.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
        proc = subprocess.run(
            ["sbatch", "--parsable", f"--nodes={nodes}", f"--cpus-per-task={ranks}",
             str(REPO / "slurm" / f"{template}.slurm"), "run", str(SPEC),
             f"output.dir={self.run}", f"engine.backend={BACKEND[template]}", *SMALL],
            env=env, cwd=self.submit_dir, capture_output=True, text=True, timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        self.id = proc.stdout.strip().split(";")[0]

    def log(self) -> str:
        logs = list(self.submit_dir.glob("*.out"))
        return logs[0].read_text() if logs else "(no log)"

    def wait(self) -> dict[str, str]:
        info = self.cluster.wait(self.id)
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (
            f"{info['JobState']} {info['ExitCode']}\n{self.log()[-8000:]}\n{self.cluster.logs()}")
        return info


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("jobs")
    out = {}
    for template in BACKEND:
        out[template, 1] = Job(cluster, root / f"{template}-1x2", template, 1, 2)
        tmp = root / f"{template}-2x1"
        out[template, 2] = Job(cluster, tmp, template, 2, 1, {
            preempt.PAUSE_AT_STEP: PAUSE, preempt.PAUSE_FILE: str(tmp / "paused")})
    return out


def _check_run(job: Job, nodes: int, ranks: int) -> None:
    resolved = (job.run / "spec.resolved.yaml").read_text()
    assert f"nnodes: {nodes}" in resolved and f"nproc_per_node: {ranks}" in resolved
    results = json.loads((job.run / "results.json").read_text())
    assert len(results["matrix"]) == 3 and all(None not in row for row in results["matrix"])
    for name in ("config.json", "model.safetensors"):
        assert (job.run / "final" / name).is_file(), name
    # Only the job's log: no hostfile or marker left where the user submitted from.
    log = f"{'ncft-ds' if job.template == 'deepspeed' else 'ncft'}-{job.id}.out"
    assert [p.name for p in job.submit_dir.iterdir()] == [log]


@pytest.mark.parametrize("template", list(BACKEND))
def test_one_node_two_ranks_completes(jobs, template):
    job = jobs[template, 1]
    job.wait()
    _check_run(job, 1, 2)


def _preempt_until_requeued(job: Job, cluster: slurm.Cluster) -> None:
    """Wait for rank 0's pause, send SIGTERM as SLURM does, wait until requeued."""
    deadline = time.monotonic() + 600
    while not job.pause.exists() and time.monotonic() < deadline:
        assert cluster.job(job.id)["JobState"] in ("PENDING", "RUNNING"), job.log()[-6000:]
        time.sleep(1)
    assert job.pause.exists(), job.log()[-6000:]
    cluster.cmd("scancel", "--signal=TERM", job.id)  # to the job steps, as --signal=TERM@120
    while time.monotonic() < deadline:
        info = cluster.job(job.id)
        if info["Restarts"] == "1" and info["JobState"] == "PENDING":
            break
        assert info["JobState"] in ("RUNNING", "PENDING", "COMPLETING"), job.log()[-6000:]
        time.sleep(1)
    assert cluster.job(job.id)["Restarts"] == "1", job.log()[-6000:]


@pytest.mark.parametrize("template", list(BACKEND))
def test_two_nodes_stop_on_sigterm_requeue_and_resume_by_themselves(jobs, cluster, template):
    job = jobs[template, 2]
    _preempt_until_requeued(job, cluster)
    step_dir = job.run / "checkpoints" / "in-progress" / "02-agnews" / "step-00000001"
    assert (step_dir / "progress.json").is_file(), job.log()[-6000:]
    # SLURM holds a requeued job for 120 s (its fixed requeue delay); start it now.
    cluster.cmd("scontrol", "update", f"JobId={job.id}", "StartTime=now")
    job.wait()
    _check_run(job, 2, 1)
    log = job.log()
    assert "stopped on SIGTERM after step 1/3 of stage 2" in log
    assert f"requeueing job {job.id}" in log and "resuming agnews at step 1/3" in log
    # The same two ranks, data order and engine as the 1-node job: bit-identical.
    ref = jobs[template, 1]
    ref.wait()
    got, want = (json.loads((r / "results.json").read_text()) for r in (job.run, ref.run))
    assert got["matrix"] == want["matrix"]
    a, b = (load_file(r / "final" / "model.safetensors") for r in (job.run, ref.run))
    for name in b:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def shrinking_job(cluster, tmp_path_factory) -> Job:
    tmp = tmp_path_factory.mktemp("shrink")
    return Job(cluster, tmp, "torchrun", 2, 1, {
        preempt.PAUSE_AT_STEP: PAUSE, preempt.PAUSE_FILE: str(tmp / "paused")})


def test_a_job_requeued_onto_fewer_nodes_resumes_by_itself(shrinking_job, cluster):
    # Preempted on 2 nodes mid-task, requeued, and started again on 1 node: the test
    # plays the scheduler that has one node left ("1-1": a bare "1" means 1 to 2 nodes;
    # one task per node, so 1 task). No ncft command line or spec is edited.
    job = shrinking_job
    _preempt_until_requeued(job, cluster)
    cluster.cmd("scontrol", "update", f"JobId={job.id}", "NumNodes=1-1", "NumTasks=1")
    cluster.cmd("scontrol", "update", f"JobId={job.id}", "StartTime=now")
    job.wait()
    _check_run(job, 1, 1)
    log = job.log()
    assert "restarting stage 2 (agnews) from its boundary" in log, log[-6000:]
    results = json.loads((job.run / "results.json").read_text())
    assert results["stage_engines"] == [{"backend": "fsdp2", "world_size": 2},
                                        {"backend": "fsdp2", "world_size": 1},
                                        {"backend": "fsdp2", "world_size": 1}]
