"""The SLURM templates, run for real with fake SLURM commands on loopback.

`scontrol`, `srun` and `ssh` are replaced by small shims: `srun` starts one copy of
its command per "node" (SLURM_NNODES) and fails if any copy fails, `ssh` runs its
command locally. Everything else (torchrun's c10d rendezvous across two "nodes",
the DeepSpeed launcher with a hostfile, our CLI) is the real thing.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.dist import free_port
from tests.support.spawn import REPO, worker_env
from tests.support.tiny import SAMPLE_TEXT, save_tiny_model_dir

pytestmark = pytest.mark.dist

SCONTROL = """#!/bin/bash
# scontrol show hostnames "a,b" -> one host per line
echo "$3" | tr ',' '\\n'
"""
SRUN = """#!/bin/bash
echo "$@" >> "$SHIM_LOG"
if [[ "$*" == *"hostname --ip-address"* ]]; then echo 127.0.0.1; exit 0; fi
while [[ "$1" == -* ]]; do
  case "$1" in -w|--nodelist) shift 2;; *) shift;; esac
done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
  SLURM_NODEID=$node SLURM_PROCID=$node "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
"""
SSH = """#!/bin/bash
while [[ "$1" == -* ]]; do
  case "$1" in -o|-p) shift 2;; *) shift;; esac
done
shift
exec bash -c "$*"
"""


def _shims(tmp_path: Path) -> Path:
    shim_dir = tmp_path / "shims"
    shim_dir.mkdir()
    for name, body in {"scontrol": SCONTROL, "srun": SRUN, "ssh": SSH}.items():
        path = shim_dir / name
        path.write_text(body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return shim_dir


def _job(tmp_path: Path, backend: str) -> list[str]:
    model = save_tiny_model_dir(tmp_path / "model")
    data = tmp_path / "train.txt"
    data.write_text(SAMPLE_TEXT)
    return [
        "masked-train", "--model", str(model), "--data", str(data), "--out",
        str(tmp_path / "out"), "--backend", backend, "--steps", "2", "--seq-len", "12",
    ]


def _run(script: str, tmp_path: Path, env_extra: dict, args: list[str], report=True):
    env = worker_env(env_extra)
    # shims first; then the venv's bin (torchrun, deepspeed) as `make test` has it
    env["PATH"] = os.pathsep.join([str(_shims(tmp_path)), str(Path(sys.executable).parent),
                                   env["PATH"]])
    env["SHIM_LOG"] = str(tmp_path / "srun.log")
    proc = subprocess.run(
        ["bash", str(REPO / "slurm" / script), *args], env=env, cwd=REPO,
        capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    if report:
        return json.loads((tmp_path / "out" / "report.json").read_text())
    return proc


def test_torchrun_template_two_nodes_on_loopback(tmp_path):
    port = free_port()
    report = _run(
        "torchrun.slurm", tmp_path,
        {
            "SLURM_JOB_NODELIST": "127.0.0.1,127.0.0.1", "SLURM_NNODES": "2",
            "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "1", "NCFT_RDZV_PORT": str(port),
            "NCFT_TORCHRUN_ARGS": "--local-addr 127.0.0.1",
        },
        _job(tmp_path, "fsdp2"),
    )
    assert report["world_size"] == 2 and report["backend"] == "fsdp2"
    assert all(v["outside_selection_changed"] == 0 for v in report["parameters"].values())
    launched = (tmp_path / "srun.log").read_text()
    assert "--nnodes 2" in launched and "--rdzv-backend c10d" in launched
    assert f"--rdzv-endpoint 127.0.0.1:{port}" in launched and "-m launcher" in launched


def test_torchrun_template_runs_a_spec_as_ranks(tmp_path):
    """`sbatch slurm/torchrun.slurm run SPEC`: each rank runs `python -m launcher run`,
    rank 0 prepares the run dir, and node counts come from SLURM (2 nodes x 1)."""
    run = tmp_path / "run"
    small = [f"tasks.{i}.{k}={v}" for i in range(3)
             for k, v in (("train_size", 8), ("eval_size", 4), ("max_length", 64))]
    _run(
        "torchrun.slurm", tmp_path,
        {
            "SLURM_JOB_NODELIST": "127.0.0.1,127.0.0.1", "SLURM_NNODES": "2",
            "SLURM_JOB_ID": "4244", "SLURM_GPUS_ON_NODE": "1",
            "NCFT_RDZV_PORT": str(free_port()), "NCFT_TORCHRUN_ARGS": "--local-addr 127.0.0.1",
            "NCFT_CACHE": str(tmp_path / "cache"),
        },
        ["run", str(REPO / "examples" / "tiny_ncft.yaml"), f"output.dir={run}",
         "training.steps=1", "selection.num_examples=4", "eval.batch_size=4", *small],
        report=False,
    )
    resolved = (run / "spec.resolved.yaml").read_text()
    assert "nnodes: 2" in resolved and "nproc_per_node: 1" in resolved
    results = json.loads((run / "results.json").read_text())
    assert len(results["matrix"]) == 3 and (run / "final" / "config.json").is_file()


def test_deepspeed_template_hostfile(tmp_path):
    hostfile = tmp_path / "hostfile"
    report = _run(
        "deepspeed.slurm", tmp_path,
        {
            "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1", "SLURM_JOB_ID": "4243",
            "SLURM_GPUS_ON_NODE": "2", "NCFT_RDZV_PORT": str(free_port()),
            "NCFT_HOSTFILE": str(hostfile),
        },
        _job(tmp_path, "deepspeed"),
    )
    assert hostfile.read_text().strip() == "localhost slots=2"
    assert report["world_size"] == 2 and report["backend"] == "deepspeed"
    assert all(v["outside_selection_changed"] == 0 for v in report["parameters"].values())
