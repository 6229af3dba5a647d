"""Resume on another world size or engine (a SLURM job requeued onto fewer nodes).

A 2-rank FSDP2 run is killed after step 1 of its second task, with a mid-task
checkpoint of two shards on disk. Resumed on one rank, it cannot use those shards
(a step's global batch depends on the world size), so it says so and restarts the
task from its boundary, the whole-model checkpoint of task 1, and records which
engine trained each stage. A copy of the run without the shards, resumed at the
boundary on the single engine, is the uninterrupted run at the new world size from
that boundary: both must end within the world-size tolerance of the mask tests.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launcher.run.backend import KILL_AT_STEP, KILL_RANK
from tests.support.spawn import REPO, worker_env

pytestmark = pytest.mark.dist

SPEC = REPO / "examples" / "tiny_ncft.yaml"
ATOL, RTOL = 1e-5, 1e-5  # tests/ncft/masks/test_dist.py: engines and world sizes agree
TWO_TASKS = "tasks=[{source: {type: cl_benchmark, name: sst2}}, {source: {type: cl_benchmark, " \
    "name: rte}}]"
SMALL = [TWO_TASKS, "method=seqft", "training.steps=3", "eval.batch_size=4",
         "output.checkpoint_every=1",
         *[f"tasks.{i}.{k}={v}" for i in range(2)
           for k, v in (("train_size", 12), ("eval_size", 4))]]


def _ncft(run: Path, cache: Path, *extra: str, env: dict | None = None, check: bool = True):
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "run", str(SPEC), f"output.dir={run}", *SMALL,
         *extra], env=worker_env({"NCFT_CACHE": str(cache), **(env or {})}), cwd=REPO,
        capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


def test_resume_on_fewer_ranks_restarts_the_task_and_records_the_engines(tmp_path):
    cache, run = tmp_path / "cache", tmp_path / "run"
    killed = _ncft(run, cache, "engine.backend=fsdp2", "engine.nproc_per_node=2",
                   env={KILL_AT_STEP: "2:1", KILL_RANK: "0"}, check=False)
    assert killed.returncode != 0, "the fault hook must kill rank 0"
    shards = run / "checkpoints" / "in-progress" / "02-rte" / "step-00000001"
    assert len(list(shards.glob("rank-*-of-00002.safetensors"))) == 2
    boundary = tmp_path / "boundary"  # the same run, killed at the stage boundary
    shutil.copytree(run, boundary, ignore=shutil.ignore_patterns("in-progress"))

    resumed = _ncft(run, cache, "engine.backend=fsdp2", "engine.nproc_per_node=1",
                    "output.resume=true")
    out = resumed.stdout
    assert f"skipping the mid-task checkpoint {shards}: it was written by 2 ranks on " \
           "engine.backend=fsdp2 and this run has 1 on fsdp2" in out, out[-3000:]
    assert "restarting stage 2 (rte) from its boundary" in out
    assert "after stage 1, on 1 rank(s) with engine.backend=fsdp2 (stage 1 was trained on 2 " \
           "with fsdp2" in out
    _ncft(boundary, cache, "engine.backend=single", "engine.nproc_per_node=1",
          "output.resume=true")

    got, want = (json.loads((r / "results.json").read_text()) for r in (run, boundary))
    assert got["stage_engines"] == [{"backend": "fsdp2", "world_size": 2},
                                    {"backend": "fsdp2", "world_size": 1}]
    assert want["stage_engines"] == [{"backend": "fsdp2", "world_size": 2},
                                     {"backend": "single", "world_size": 1}]
    assert "nproc_per_node: 1" in (run / "spec.resolved.yaml").read_text()
    a, b = (load_file(r / "final" / "model.safetensors") for r in (run, boundary))
    assert a.keys() == b.keys()
    for name in b:
        torch.testing.assert_close(a[name], b[name], atol=ATOL, rtol=RTOL, msg=name)
    flat = [[v for row in r["matrix"] for v in row] for r in (got, want)]
    assert flat[0] == pytest.approx(flat[1], abs=1e-6)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    steps = [(r["stage"], r["step"]) for r in map(json.loads, lines)]
    assert steps == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)], "no step logged twice"
