"""Smoke test of benchmarks/rank_eval.py on the tiny random Llama: the report's shape,
and that the shared-prefix and per-label paths give the same scores (no timing asserted).
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support.spawn import REPO, worker_env


def test_rank_eval_tiny_report(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "rank_eval.py"), "--model",
         "tiny-random-llama", "--max-length", "512", "--examples", "2", "--batch", "2",
         "--pairs", "1"],
        env=worker_env({"NCFT_CACHE": str(tmp_path / "cache")}), cwd=REPO,
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert report["task"] == "dbpedia" and report["labels"] == 14 and report["examples"] == 2
    assert report["max_abs_score_diff"] < 1e-4 and report["same_predictions"]
    assert report["median_s"]["per_label"] > 0 and report["median_s"]["shared"] > 0
