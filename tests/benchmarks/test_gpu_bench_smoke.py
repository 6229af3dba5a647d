"""`make gpu-bench SMOKE=1`: benchmarks/gpu_bench.py end to end at tiny size on CPU.

Every part must run and report: (a) each engine's 2 sparse-delta steps from bf16
files next to the plan's total for the same stage, (b) the four modes, (c) the mask
pieces per engine. Timings on a shared CPU are never asserted.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.support.spawn import REPO, worker_env


@pytest.mark.dist
@pytest.mark.timeout(900)
def test_make_gpu_bench_smoke(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        ["make", "--no-print-directory", "gpu-bench", "SMOKE=1", f"GPU_BENCH_OUT={out}",
         "STAMP=.venv/bin/python"],  # the venv exists: skip the install step's stamp
        env=worker_env(), cwd=REPO, capture_output=True, text=True, timeout=880,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench-smoke" / "gpu_bench.json").read_text())
    assert report["smoke"] is True
    rows = {r["engine"]: r["result"] for r in report["memory"]["rows"]}
    assert set(rows) == {"deepspeed", "fsdp2", "single"}
    for engine, row in rows.items():
        assert row["steps"] == 2 and len(row["step_s"]) == 2, engine
        assert row["plan_total_bytes"] > 0 and row["host_exact_bytes"] in (0, None), engine
    modes = {r["arm"] for r in report["modes"]["result"]["results"]}
    assert modes == {"full", "masked", "sparse_delta", "lora"}
    pieces = {r["engine"] for r in report["pieces"]["result"]["results"]}
    assert pieces == {"deepspeed", "fsdp2", "fsdp1"}
