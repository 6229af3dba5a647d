"""`ncft eval`: a finished run evaluated again under inference settings, training nothing.

W-NCFT trains exactly as NCFT does, so `ncft eval NCFT_RUN method=wncft` must give the
results of a full W-NCFT run: same accuracy matrix and per-example records. Overrides
that would change training are refused, naming the key, before anything is written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.errors import UserError
from launcher.run.reevaluate import changed_keys, check_inference_only, eval_spec
from launcher.spec import load_spec
from tests.support.spawn import REPO, worker_env

SPEC = REPO / "examples" / "tiny_ncft.yaml"
# Two tasks, one process, a few steps: small enough for the default suite.
SMALL = [
    "engine.backend=single", "engine.nproc_per_node=1", "training.steps=2",
    "selection.num_examples=4", "eval.batch_size=4", "wncft.num_samples=4",
    "wncft.temperature=0.5", "tasks=[{source: {type: cl_benchmark, name: sst2}, "
    "train_size: 8, eval_size: 6, max_length: 176}, {source: {type: cl_benchmark, "
    "name: agnews}, train_size: 8, eval_size: 6, max_length: 176}]",
]


def _ncft(args: list[str], cache: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "launcher", *args], cwd=REPO,
                          env=worker_env({"NCFT_CACHE": str(cache)}), capture_output=True,
                          text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reevaluate")
    cache = root / "cache"
    out = {name: root / name for name in ("ncft", "wncft", "eval")}
    _ncft(["run", str(SPEC), *SMALL, f"output.dir={out['ncft']}"], cache)
    _ncft(["run", str(SPEC), *SMALL, "method=wncft", f"output.dir={out['wncft']}"], cache)
    _ncft(["eval", str(out["ncft"]), "method=wncft", f"output.dir={out['eval']}"], cache)
    out["cache"] = cache
    return out


def _results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def test_wncft_evaluation_of_an_ncft_run_equals_a_full_wncft_run(runs):
    full, again = _results(runs["wncft"]), _results(runs["eval"])
    assert again["method"] == "wncft" and again["evaluated_from"] == str(runs["ncft"])
    assert again["matrix"] == full["matrix"]
    assert again["details"] == full["details"]
    assert again["summary"] == full["summary"] and again["protocol"] == full["protocol"]
    # Mixing did something: W-NCFT's records differ from NCFT's own.
    assert full["details"] != _results(runs["ncft"])["details"]
    assert "mixing_weights" in full["details"]["agnews"][1]
    assert not list((runs["eval"] / "checkpoints").iterdir())  # nothing was trained


def test_eval_refuses_training_overrides_and_the_run_itself(runs):
    proc = _ncft(["eval", str(runs["ncft"]), "training.lr=0.1",
                  f"output.dir={runs['ncft'].parent / 'refused'}"], runs["cache"], check=False)
    assert proc.returncode == 2 and "training.lr" in proc.stderr
    assert not (runs["ncft"].parent / "refused").exists()
    with pytest.raises(UserError, match="output.dir: .* is the run being evaluated"):
        eval_spec(runs["ncft"], ["method=wncft"])
    with pytest.raises(UserError, match=r"^method: "):
        eval_spec(runs["ncft"], ["method=seqft", "output.dir=/tmp/x"])


def test_changed_keys_name_the_leaf():
    before = load_spec(SPEC)
    after = load_spec(SPEC, ["tasks.1.train_size=5", "eval.classification=generate"])
    assert changed_keys(before, after) == ["eval.classification", "tasks.1.train_size"]
    with pytest.raises(UserError, match=r"^tasks\.1\.train_size: "):
        check_inference_only(before, after)
    check_inference_only(before, load_spec(SPEC, ["eval.calibration=content_free",
                                                  "wncft.temperature=2", "method=wncft"]))
    check_inference_only(before, load_spec(SPEC, ["wncft.query=example", "engine.nnodes=2"]))
