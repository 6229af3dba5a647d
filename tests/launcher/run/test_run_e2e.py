"""`ncft run` end to end on the tiny random Llama: real ranks, real data, real files.

NCFT over sst2 -> agnews -> rte (the data root's real cl_benchmark files) on 2 ranks,
on FSDP2 and on ZeRO-3; the same with `training.update: sparse_delta` on ZeRO-3,
compared with its masked run; then a ZeRO-3 run whose rank 0 is SIGKILLed mid-task
between two mid-task checkpoints, refused without `output.resume`, resumed and
compared with the uninterrupted run. (A kill at a stage boundary, for every method:
tests/launcher/run/test_resume.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launcher.run.backend import KILL_AT_STEP, KILL_RANK
from ncft.neuron_set import NeuronSet
from tests.support.rundirs import assert_same_run
from tests.support.spawn import REPO, worker_env

pytestmark = pytest.mark.dist

SPEC = REPO / "examples" / "tiny_ncft.yaml"
SMALL = [
    "training.steps=3", "selection.num_examples=8", "eval.batch_size=8",
    *[f"tasks.{i}.{k}={v}" for i in range(3)
      for k, v in (("train_size", 16), ("eval_size", 8), ("max_length", 176))],
]


def _ncft(args: list[str], cache: Path, extra_env: dict | None = None, check=True):
    env = worker_env({"NCFT_CACHE": str(cache), **(extra_env or {})})
    proc = subprocess.run([sys.executable, "-m", "launcher", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ncft_cache")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache) -> dict[str, Path]:
    out = {}
    for backend in ("fsdp2", "deepspeed"):
        run = tmp_path_factory.mktemp("runs") / backend
        _ncft(["run", str(SPEC), f"output.dir={run}", f"engine.backend={backend}", *SMALL],
              cache)
        out[backend] = run
    return out


def _outside_union_moved(base: dict, final: dict, sets: list[NeuronSet]) -> dict[str, int]:
    union = sets[0]
    for s in sets[1:]:
        union = union.union(s)
    moved = {}
    for name, before in base.items():
        allowed = union.dense_mask(name, before.shape)
        bad = int(((final[name] != before) & ~allowed).sum())
        if bad:
            moved[name] = bad
    return moved


@pytest.mark.parametrize("backend", ["fsdp2", "deepspeed"])
def test_ncft_run_directory_and_untouched_weights(runs, cache, backend):
    run = runs[backend]
    for rel in ("spec.resolved.yaml", "metrics.jsonl", "results.json", "final/config.json",
                "final/model.safetensors"):
        assert (run / rel).is_file(), rel
    stages = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert stages == ["01-sst2", "02-agnews", "03-rte"]
    results = json.loads((run / "results.json").read_text())
    matrix = results["matrix"]
    assert len(matrix) == 3 and all(len(r) == 3 for r in matrix)
    assert all(0.0 <= v <= 1.0 for row in matrix for v in row)
    assert results["summary"]["average_performance"] == pytest.approx(
        sum(row[-1] for row in matrix) / 3)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in lines] == [(s, k) for s in range(3) for k in (1, 2, 3)]
    sets = [NeuronSet.load(run / "neurons" / f"{t}.safetensors") for t in ("sst2", "agnews",
                                                                             "rte")]
    assert all(s.meta["scorer"] == "grad_attribution" for s in sets)
    assert results["similarity_final_model"]["tasks"] == ["sst2", "agnews", "rte"]
    base = load_file(cache / "tiny-random-llama" / "model.safetensors")
    final = load_file(run / "final" / "model.safetensors")
    assert _outside_union_moved(base, final, sets) == {}
    changed = sum(int((final[n] != base[n]).sum()) for n in base)
    assert changed > 0, "training changed nothing"


# ZeRO-3 only: its flat partitions cut rows, the harder case; FSDP2's sparse-delta
# exactness is tests/ncft/test_sparse_delta_dist.py's (1-3 ranks) and masked-train's.
@pytest.mark.parametrize("backend", ["deepspeed"])
def test_sparse_delta_run_equals_masked_run(runs, cache, tmp_path, backend):
    """`training.update: sparse_delta` on 2 real ranks against the masked run above.

    Sharded loading builds each stage's model on meta and fills every rank's shard from
    the files; the deltas' start values come from their base rows
    (`launcher.run.delta_weights`). Every stage checkpoint and `final/` must equal the
    masked run's on the same engine within atol 1e-5 (fp32; see
    tests/ncft/test_sparse_delta_dist.py for why not bit for bit). It reuses the masked
    runs of `runs` (same spec and overrides) instead of training them again.
    """
    sparse = tmp_path / "sparse_delta"
    proc = _ncft(["run", str(SPEC), f"output.dir={sparse}", f"engine.backend={backend}",
                  *SMALL, "training.update=sparse_delta"], cache)
    # A sharded build prints one load line per rank (`loading.report`); a rank that
    # loads the whole model says so (`LauncherBackend.load_model`).
    lines = proc.stdout.splitlines()
    assert sum(line.startswith(f"[rank 1] {backend} load from") for line in lines) >= 3
    assert not any("whole model loaded" in line for line in lines)
    masked = runs[backend]
    stages = sorted(p.name for p in (masked / "checkpoints").iterdir())
    assert len(stages) == 3
    for rel in [f"checkpoints/{s}/model.safetensors" for s in stages] + ["final/model.safetensors"]:
        a, b = load_file(sparse / rel), load_file(masked / rel)
        assert a.keys() == b.keys(), rel
        for key in b:
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0, msg=f"{rel} {key}")


def test_resume_mid_task_after_sigkill_matches_uninterrupted(runs, cache, tmp_path):
    run = tmp_path / "killed-mid-task"
    args = ["run", str(SPEC), f"output.dir={run}", "engine.backend=deepspeed",
            "output.checkpoint_every=2", *SMALL]
    # Rank 0 dies after step 3 of task 2, one step past the step-2 checkpoint and
    # before the task's own checkpoint: the resume must replay step 3 exactly.
    killed = _ncft(args, cache, {KILL_AT_STEP: "2:3", KILL_RANK: "0"}, check=False)
    assert killed.returncode != 0, "the fault hook must kill rank 0"
    step_dir = run / "checkpoints" / "in-progress" / "02-agnews" / "step-00000002"
    assert (step_dir / "progress.json").is_file()
    assert len(list(step_dir.glob("rank-*-of-00002.safetensors"))) == 2
    assert not (run / "checkpoints" / "in-progress" / "01-sst2").exists(), "superseded"
    assert not (run / "checkpoints" / "02-agnews").exists()
    assert not (run / "results.json").exists()
    refused = _ncft(args, cache, check=False)  # an existing run is never overwritten
    assert refused.returncode != 0 and "output.resume" in refused.stderr
    resumed = _ncft([*args, "output.resume=true"], cache)
    assert "resuming agnews at step 2/3" in resumed.stdout
    assert not (run / "checkpoints" / "in-progress").exists()
    ref = runs["deepspeed"]
    assert_same_run(run, ref)


def test_validate_prints_stages_and_rejects_bad_spec(cache):
    ok = _ncft(["validate", str(SPEC)], cache)
    assert "planned stages" in ok.stdout and "sst2" in ok.stdout
    bad = _ncft(["validate", str(SPEC), "selection.fraction=1.5"], cache, check=False)
    assert bad.returncode == 2 and "selection.fraction" in bad.stderr
    multi = _ncft(["run", str(SPEC), "engine.nnodes=2", f"output.dir={os.devnull}x"], cache,
                  check=False)
    assert multi.returncode != 0 and "engine.nnodes" in multi.stderr
