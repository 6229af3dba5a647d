"""KV-cache evaluation under sharding (gloo): cached generation gives the same tokens as
re-running the prefix, and shared-prefix label scores equal per-label scores.

(The single-process equality of the two paths is tests/ncft/test_evaluate.py's.)

tests/dist/generation_worker.py generates on 2 ranks of each sharded engine, where a
forward is a collective: every rank must run the same number of forwards (ranks with
fewer prompts run dummy batches, and the early exit is agreed by all-reduce).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ncft.data.examples import Example
from tests.support.review_lm import MIXED, SHARED, WORDS, per_pair_scores, sharp_model
from tests.support.spawn import REPO, torchrun_backends
from tests.support.tiny import word_tokenizer

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


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_prefix_scores_equal_per_label_scores_on_two_ranks(results, backend):
    tok, model = word_tokenizer(WORDS), sharp_model()
    examples = [Example(p, SHARED[i % len(SHARED)]) for i, p in enumerate(MIXED)]
    ranks = [json.loads((results / f"{backend}_ws2_rank{r}.json").read_text()) for r in (0, 1)]
    for max_length in (64, 9):  # 9 cuts the prompts, differently per label
        want = per_pair_scores(model, tok, examples, SHARED, max_length)
        for report in ranks:
            got = torch.tensor(report[f"labels{max_length}"], dtype=torch.float64)
            assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()
    # 7 prompts: shares of 3 and 4, so 2 groups of 3 examples x 2 forwards per length.
    assert ranks[0]["label_forwards"] == ranks[1]["label_forwards"] == 2 * 2 * 2
