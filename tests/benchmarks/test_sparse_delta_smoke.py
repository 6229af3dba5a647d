"""Smoke test of benchmarks/sparse_delta.py: smallest config, FSDP2, 2 ranks, 1 step.

Checks the report's shape and the state-byte arithmetic only; timings on a shared CPU
are never asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.spawn import REPO, worker_env

SCRIPT = REPO / "benchmarks" / "sparse_delta.py"


@pytest.mark.dist
@pytest.mark.timeout(400)
def test_sparse_delta_benchmark_report(tmp_path):
    out = tmp_path / "sparse_delta.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--configs", "7m", "--engines", "fsdp2",
         "--arms", "full,sparse_delta", "--steps", "1", "--out", str(out)],
        env=worker_env(), cwd=REPO, capture_output=True, text=True, timeout=380,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| engine" in proc.stdout
    report = json.loads(out.read_text())
    full, sparse = report["results"]
    assert (full["arm"], sparse["arm"]) == ("full", "sparse_delta")
    assert sparse["trainable"] < 0.05 * full["trainable"]
    assert sparse["grad_opt_bytes_max_rank"] < 0.05 * full["grad_opt_bytes_max_rank"]
    assert all(r["peak_bytes_max_rank"] > 0 and r["step_s"] > 0 for r in report["results"])
    for r in report["results"]:  # the peak splits into the build and what training adds
        assert 0 < r["built_bytes_at_peak_rank"] <= r["peak_bytes_max_rank"]
        assert r["file_bytes_at_peak_rank"] <= r["peak_bytes_max_rank"]
        assert r["logits_bytes"] == 2 * 128 * 8000 * 4  # micro-batch x seq x vocab x fp32
    assert {"torch", "transformers", "peft"} <= set(report["machine"])
