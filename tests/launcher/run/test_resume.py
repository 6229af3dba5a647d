"""Every continual method resumes after a SIGKILL to the uninterrupted run's results.

Two kill points per method (tests/dist/resume_worker.py): right after stage 1's
checkpoint, and during stage 2's evaluation (stage 2 trained, evaluated in part, not
committed; for W-NCFT its task store already holds task 2). The resumed run's
results.json (matrix, details, summary) and every committed stage's weights must equal
the reference run's, bit for bit (one rank, same data order and seeds).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.dist.resume_worker import KILLS, METHODS
from tests.support.spawn import run_worker

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume")
    cache = str(tmp_path_factory.mktemp("cache"))
    run_worker("resume_worker.py", out, ",".join(METHODS), {"NCFT_CACHE": cache})
    return out


@pytest.mark.parametrize("point", list(KILLS))
@pytest.mark.parametrize("method", METHODS)
def test_resumed_run_equals_uninterrupted(out, method, point):
    report = json.loads((out / "report.json").read_text())[f"{point}/{method}"]
    assert report["signal"] == 9, "the fault hook must SIGKILL the run"
    assert report["committed"] == ["01-sst2"]  # both kill points leave stage 1 only
    ref, got = out / "reference" / method, out / point / method
    want_res, got_res = (json.loads((r / "results.json").read_text()) for r in (ref, got))
    for key in ("matrix", "details", "summary", "protocol"):
        assert got_res[key] == want_res[key], key
    for stage in ("01-sst2", "02-rte"):
        a, b = (load_file(r / "checkpoints" / stage / "model.safetensors") for r in (got, ref))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b), stage
    a, b = (load_file(r / "final" / "model.safetensors") for r in (got, ref))
    assert all(torch.equal(a[k], b[k]) for k in b)
