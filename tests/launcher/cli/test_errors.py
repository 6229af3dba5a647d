"""Run-time user errors read like spec errors: one line naming the field, no traceback.

Each case runs the real `ncft` command as a new user would and checks the exit code,
the one-line message, that no traceback is printed, and that no half-made run
directory is left to block the corrected rerun.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.spawn import REPO, worker_env

pytestmark = pytest.mark.dist

SPEC = REPO / "examples" / "tiny_ncft.yaml"
# One process and a few examples: the corrected rerun only has to finish.
FAST = [
    "engine.backend=single", "engine.nproc_per_node=1", "training.steps=1",
    "selection.num_examples=4",
    *[f"tasks.{i}.{k}={v}" for i in range(3)
      for k, v in (("train_size", 4), ("eval_size", 2), ("max_length", 176))],
]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    hub = tmp_path_factory.mktemp("hf_hub")
    return worker_env({"NCFT_CACHE": str(tmp_path_factory.mktemp("ncft_cache")),
                       "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"})


def _ncft(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", *map(str, args)], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=600)


def _one_line_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The single `ncft: error:` line, after checking exit code and no traceback."""
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ncft: error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_missing_model_leaves_nothing_and_the_rerun_works(env, tmp_path):
    run = tmp_path / "X"
    bad = _ncft(env, "run", SPEC, "model.name_or_path=/nonexistent", f"output.dir={run}", *FAST)
    _one_line_error(bad, 2, "model.name_or_path=/nonexistent", "built-in name",
                    "no directory /nonexistent")
    assert not run.exists(), "a failed preflight must not create the run directory"
    good = _ncft(env, "run", SPEC, f"output.dir={run}", *FAST)
    assert good.returncode == 0, good.stderr[-3000:]
    assert json.loads((run / "results.json").read_text())["tasks"] == ["sst2", "agnews", "rte"]
    again = _ncft(env, "run", SPEC, f"output.dir={run}", *FAST)
    _one_line_error(again, 2, f"output.dir: {run} already holds a run", "output.resume=true",
                    "output.overwrite=true")
    debug = _ncft(env, "--debug", "run", SPEC, f"output.dir={run}", *FAST)
    assert debug.returncode != 0 and "Traceback" in debug.stderr, "--debug keeps tracebacks"
    noted = _ncft(env, "validate", SPEC, f"output.dir={run}", *FAST)
    assert noted.returncode == 0 and "# note: output.dir:" in noted.stdout


def test_uncached_hub_model_offline(env, tmp_path):
    run = tmp_path / "X"
    proc = _ncft(env, "run", SPEC, "model.name_or_path=some-org/some-model", f"output.dir={run}")
    _one_line_error(proc, 2, "model.name_or_path=some-org/some-model", "not in the local cache",
                    "HF_HUB_OFFLINE")
    assert not run.exists()
    checked = _ncft(env, "validate", SPEC, "model.name_or_path=some-org/some-model")
    _one_line_error(checked, 2, "model.name_or_path=some-org/some-model")


def test_model_failing_inside_the_ranks_is_one_line_and_cleaned_up(env, tmp_path):
    model = tmp_path / "broken-model"
    model.mkdir()  # passes preflight (a directory with config.json), fails to load
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": "x"}))
    run = tmp_path / "X"
    proc = _ncft(env, "run", SPEC, f"model.name_or_path={model}", f"output.dir={run}")
    line = _one_line_error(proc, 1, "hidden_size", "NCFT_DEBUG=1")
    assert line.startswith(("ncft: error: rank 0: ", "ncft: error: rank 1: ")), line
    assert not run.exists(), "nothing was checkpointed: the run directory must go"
    rerun = _ncft(env, "validate", SPEC, f"output.dir={run}")
    assert rerun.returncode == 0 and "# note" not in rerun.stdout
