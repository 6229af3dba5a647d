"""KV-cache generation under sharding: same tokens as re-running the prefix (gloo).

(The single-process equality of the two paths is tests/ncft/test_evaluate.py's.)

tests/dist/generation_worker.py generates on 2 ranks of each sharded engine, where a
forward is a collective: every rank must run the same number of forwards (ranks with
fewer prompts run dummy batches, and the early exit is agreed by all-reduce).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.spawn import REPO, torchrun_backends

pytestmark = pytest.mark.dist

WORKER = REPO / "tests" / "dist" / "generation_worker.py"
BACKENDS = ("fsdp2", "deepspeed", "fsdp1")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    return torchrun_backends(tmp_path_factory, "generation", WORKER, BACKENDS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_generation_matches_uncached_on_two_ranks(results, backend):
    # fsdp2's uncached run is the reference every other run must equal
    ref = json.loads((results / "fsdp2_ws2_rank0.json").read_text())
    ranks = [json.loads((results / f"{backend}_ws2_rank{r}.json").read_text()) for r in (0, 1)]
    for report in ranks:
        assert report["cache1"]["texts"] == report["cache0"]["texts"] == ref["cache0"]["texts"]
    assert ranks[0]["cache1"]["forwards"] == ranks[1]["cache1"]["forwards"]
    assert ranks[0]["cache0"]["forwards"] == ranks[1]["cache0"]["forwards"]
    assert any(ref["cache1"]["texts"])
