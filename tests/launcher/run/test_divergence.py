"""Divergence stops at the step (issue #22's reproductions, `training.lr=1e30`).

A run whose loss or gradient norm turns inf/nan exits with `EXIT_DIVERGED` and a
message naming task, stage and step; the diverged step leaves no log line and no
checkpoint, so the previous checkpoint stays the resume point. One rank on the single
engine, tiny sizes: each run costs a few seconds.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.errors import EXIT_DIVERGED
from launcher.spec import SpecError, load_spec
from tests.support.spawn import REPO, worker_env

pytestmark = pytest.mark.dist

SPEC = REPO / "examples" / "tiny_ncft.yaml"
TINY = [
    "engine.backend=single", "engine.nproc_per_node=1", "training.steps=3",
    "selection.num_examples=4", "eval.batch_size=4", "training.lr=1e30",
    *[f"tasks.{i}.{k}={v}" for i in range(3)
      for k, v in (("train_size", 8), ("eval_size", 4))],
]


def _ncft(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=REPO, text=True,
                          env=worker_env({"NCFT_CACHE": str(cache)}), capture_output=True,
                          timeout=600)


def test_seqft_at_lr_1e30_stops_at_the_step_and_keeps_the_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = _ncft(["run", str(SPEC), f"output.dir={run}", "method=seqft",
                  "output.checkpoint_every=1", *TINY], tmp_path / "cache")
    assert proc.returncode == EXIT_DIVERGED, proc.stdout[-2000:] + proc.stderr[-4000:]
    found = re.search(r"training diverged in task sst2 \(stage 1/3\) at step (\d+)",
                      proc.stderr)
    assert found, proc.stderr[-3000:]
    step = int(found.group(1))
    assert step > 1, "step 1 starts from the pretrained weights and is finite"
    # Nothing from the diverged step: no log line, no checkpoint; the step before's
    # mid-task checkpoint is the resume point.
    logged = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, step))
    steps = sorted(p.name for p in (run / "checkpoints/in-progress/01-sst2").iterdir())
    assert steps == [f"step-{step - 1:08d}"]
    assert not (run / "checkpoints" / "01-sst2").exists()
    assert not (run / "results.json").exists()


def test_ncft_at_lr_1e30_stops_at_the_step_not_at_the_next_scoring(tmp_path):
    run = tmp_path / "run"
    proc = _ncft(["run", str(SPEC), f"output.dir={run}", "method=ncft", *TINY],
                 tmp_path / "cache")
    assert proc.returncode == EXIT_DIVERGED, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert re.search(r"training diverged in task sst2 \(stage 1/3\) at step \d", proc.stderr)
    assert "scores contain NaN" not in proc.stderr
    # Nothing was saved: no checkpoint holds the nan weights, and the directory this
    # run created is gone (it had nothing to resume).
    assert not run.exists()


def test_validate_refuses_an_infinite_rate(tmp_path):
    proc = _ncft(["validate", str(SPEC), "training.lr=inf"], tmp_path / "cache")
    assert proc.returncode == 2 and "training.lr" in proc.stderr, proc.stderr


@pytest.mark.parametrize("override", ["training.lr=nan", "training.eps=inf",
                                      "training.grad_clip=inf", "wncft.temperature=inf",
                                      "training.max_skipped_steps=3"])
def test_the_spec_refuses_numbers_that_cannot_be_meant(override):
    with pytest.raises(SpecError, match=re.escape(override.split("=")[0])):
        load_spec(SPEC, [override])
