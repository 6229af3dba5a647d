"""Smoke test of benchmarks/mask_overhead.py: tiny config, 2 ranks, a few steps.

Checks the report's shape only; timings on a shared CPU are never asserted.
"""

from __future__ import annotations

import json

import pytest

from tests.support.spawn import REPO, torchrun

SCRIPT = REPO / "benchmarks" / "mask_overhead.py"
ENGINES = {"deepspeed", "fsdp2", "fsdp1"}


@pytest.mark.dist
@pytest.mark.timeout(180)
def test_mask_overhead_tiny_report(tmp_path):
    out = tmp_path / "mask_overhead.json"
    proc = torchrun(
        SCRIPT, 2, ["--configs", "tiny", "--warmup", "1", "--pairs", "2", "--out", str(out)],
        timeout=170,
    )
    assert "| engine" in proc.stdout  # the table is printed
    report = json.loads(out.read_text())
    assert report["world_size"] == 2
    assert report["fraction"] == pytest.approx(0.05)
    results = report["results"]
    assert {r["engine"] for r in results} == ENGINES
    assert len(results) == len(ENGINES)
    for r in results:
        assert r["config"] == "tiny"
        assert r["params"] > r["trainable_params"] > r["selected_params"] > 0
        assert r["pairs"] == 2 and r["warmup_steps"] == 1
        for key in ("median_unmasked_s", "median_masked_s", "ratio"):
            assert r[key] > 0, key
        for key in ("step_unmasked_s", "step_masked_s"):
            assert r[key]["n"] == 2 and all(t > 0 for t in r[key]["samples"])
        assert r["paired_ratio"]["median"] > 0
        assert r["cpu_ratio"] > 0
        for clock in ("wall", "thread_cpu"):
            pieces = r["pieces_rank0"][clock]
            for key in ("apply_to_grads_s", "opt_step_masked_s", "opt_step_unmasked_s"):
                assert pieces[key]["median"] > 0, (clock, key)
            assert "mask_cost_fraction" in pieces
        assert all(v > 0 for v in r["pieces_wall_max_over_ranks"].values())
