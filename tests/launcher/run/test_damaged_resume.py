"""A resume verifies what it continues from (issue #22's reproductions).

Zeroed bytes inside a stage checkpoint or a garbled state.json: the resume skips that
checkpoint, naming the file and why, falls back to the newest one that verifies and
ends exactly where the uninterrupted run ends; with no checkpoint that verifies it
refuses, naming the file. A truncated mid-task rank file or a garbled progress.json:
the stage restarts from its boundary, with a line naming the file. A partial last line
of metrics.jsonl is dropped with a warning. Each killed run's lock is taken over.
Cases run in tests/dist/damage_worker.py (single engine, one rank: bit-identical).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.dist.damage_worker import CASES
from tests.support.rundirs import losses
from tests.support.spawn import run_worker

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("damaged")
    run_worker("damage_worker.py", out, "", {"NCFT_CACHE": str(tmp_path_factory.mktemp("c"))})
    return out


@pytest.fixture(scope="module")
def report(out):
    return json.loads((out / "report.json").read_text())


def _assert_ends_like_reference(out, case):
    got, want = (json.loads((out / r / "results.json").read_text())
                 for r in (case, "reference"))
    assert got["matrix"] == want["matrix"]
    for rel in ("checkpoints/02-rte/model.safetensors", "final/model.safetensors"):
        a, b = (load_file(out / r / rel) for r in (case, "reference"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b), rel
    assert losses(out / case) == losses(out / "reference")


@pytest.mark.parametrize(("case", "why"), [
    ("model", "does not match the SHA-256 in its manifest"),
    ("state", "has"),  # the garbled state.json is shorter: its size already differs
])
def test_a_damaged_stage_checkpoint_is_skipped_and_the_run_ends_right(out, report, case, why):
    got = report[case]
    assert got["signal"] == 9 and got["refused"] is None
    printed = got["printed"]
    assert f"skipping checkpoint {out / case / 'checkpoints' / '02-rte'}: " \
           f"{got['damaged']} {why}" in printed, printed[-3000:]
    assert "resuming after stage 1 (01-sst2), the newest checkpoint that verifies" in printed
    assert "taking over the lock" in printed, "the killed run's lock is stale"
    assert (out / case / "checkpoints-skipped").is_dir()
    _assert_ends_like_reference(out, case)


def test_no_checkpoint_that_verifies_is_refused_naming_the_file(out, report):
    got = report["only"]
    assert got["refused"] is not None
    assert "no checkpoint of" in got["refused"] and got["damaged"] in got["refused"]
    assert not (out / "only" / "results.json").exists()


@pytest.mark.parametrize("case", ["rank", "progress"])
def test_a_damaged_mid_task_checkpoint_restarts_the_stage(out, report, case):
    got = report[case]
    assert got["signal"] == 9 and got["refused"] is None
    printed = got["printed"]
    assert "skipping the mid-task checkpoint" in printed and got["damaged"] in printed, printed
    assert "restarting stage 2 (rte) from its boundary" in printed
    _assert_ends_like_reference(out, case)


def test_a_partial_last_metrics_line_is_dropped_with_a_warning(out, report):
    got = report["metrics"]
    assert f"dropping the partial last line 3 of {got['damaged']}" in got["printed"]
    _assert_ends_like_reference(out, "metrics")


def test_every_case_ran():
    assert set(CASES) == {"model", "state", "only", "rank", "progress", "metrics"}
