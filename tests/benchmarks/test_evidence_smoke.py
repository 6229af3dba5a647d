"""Smoke test of the evidence pipeline (benchmarks/evidence.py, forgetting_diagnosis.py).

The shipped evidence specs, shrunk to the tiny random Llama and a step or two: the
learning-rate grid on held-out rows, method runs at the chosen rates, the bootstrap
table, the forgetting diagnosis, and the BLEU table of the NeFT-vs-LoRA spec. Checks
the plumbing and the reports' arithmetic, never the (meaningless) scores.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.spawn import REPO, worker_env

EVIDENCE = REPO / "benchmarks" / "evidence.py"
DIAGNOSIS = REPO / "benchmarks" / "forgetting_diagnosis.py"


def _tiny(name: str, tmp_path: Path, **training) -> Path:
    """The shipped spec on the tiny model with 2 training steps and a few examples."""
    spec = yaml.safe_load((REPO / "examples" / name).read_text())
    spec["model"] = {"name_or_path": "tiny-random-llama", "dtype": "float32"}
    for task in spec["tasks"]:
        task.update(train_size=12, eval_size=6, max_length=320)
    spec["training"].update(steps=2, micro_batch_size=2, **training)
    spec["selection"].update(num_examples=4, batch_size=2)
    spec.setdefault("eval", {}).update(max_new_tokens=4)
    if "cosine_steps" in spec["selection"]:
        spec["selection"]["cosine_steps"] = 1
    spec.pop("study", None)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *map(str, args)], env=worker_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.timeout(600)
def test_grid_runs_table_and_diagnosis(tmp_path):
    spec = _tiny("evidence_sst2_agnews.yaml", tmp_path)
    out = tmp_path / "runs"
    _run(EVIDENCE, "grid", spec, "--out", out / "grid", "--heldout", "4", "--extend", "1",
         "--family", "neurons=1e-3,1e-2", "--family", "full=1e-4")
    grid = json.loads((out / "grid" / "grid.json").read_text())
    scores = grid["scores"]
    # Two rates: the best is an end, so one rate beyond it was tried (x3 or /3).
    assert set(scores) == {"neurons", "full"} and len(scores["neurons"]) == 3
    assert len(grid["extended"]["neurons"]) == 1
    assert grid["extended"]["neurons"][0] in ("3e-4", "3e-2")
    best = grid["best"]["neurons"]
    assert scores["neurons"][best] == max(scores["neurons"].values())
    # The held-out rows are the training file's last 4, never the test split.
    held = json.loads((out / "grid" / "neurons_lr1e-3" / "results.json").read_text())
    assert len(held["details"]["sst2"][0]["correct"]) == 4

    _run(EVIDENCE, "run", spec, "--grid", out / "grid" / "grid.json", "--out", out,
         "--prefix", "d_", "--methods", "seqft,ncft")
    ncft = yaml.safe_load((out / "d_ncft" / "spec.resolved.yaml").read_text())
    assert ncft["training"]["lr"] == float(best)  # the family's chosen rate
    text = _run(EVIDENCE, "table", out / "d_ncft", out / "d_seqft", "--samples", "50",
                "--out", tmp_path / "table.json")
    assert "| ncft |" in text and "| seqft |" in text
    rows = json.loads((tmp_path / "table.json").read_text())
    assert rows[0]["vs_first_run"] is None and rows[1]["vs_first_run"] is not None
    assert rows[0]["eval_examples"] == {"sst2": 6, "agnews": 6}
    text = _run(EVIDENCE, "matrices", "--grid", out / "grid" / "grid.json",
                "--table", tmp_path / "table.json")
    assert f"**{best}: " in text and "| sst2 | " in text and "### seqft" in text

    _run(DIAGNOSIS, out / "d_ncft", "--out", tmp_path / "diag.json")
    diag = json.loads((tmp_path / "diag.json").read_text())
    assert sum(diag["prediction_counts"][0].values()) == 6
    assert [m["after"] for m in diag["margins"]] == ["sst2", "agnews"]
    assert 0 <= diag["margins"][1]["auc"] <= 1
    assert 0 <= diag["margins"][1]["accuracy_at_median_threshold"] <= 1
    units = diag["units"]["sst2 units"]["stage1_to_end"]
    assert units["units"] > 0 and units["relative_change"] > 0
    _run(DIAGNOSIS, out / "d_ncft", "--margins-only", "--calibrate", "--out", tmp_path / "cal.json")
    cal = json.loads((tmp_path / "cal.json").read_text())
    for row in cal["margins"]:
        assert math.isfinite(row["content_free_s"]) and 0 <= row["accuracy_calibrated"] <= 1
        assert "_s" not in row


@pytest.mark.timeout(600)
def test_bleu_table_of_neft_and_lora(tmp_path):
    spec = _tiny("evidence_neft_lora.yaml", tmp_path)
    out = tmp_path / "runs"
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"best": {"neurons": "1e-3", "lora": "1e-3"}}))
    _run(EVIDENCE, "run", spec, "--grid", grid, "--out", out, "--prefix", "t_",
         "--methods", "neurons")
    _run(EVIDENCE, "run", spec, "--grid", grid, "--out", out, "--prefix", "t_",
         "--methods", "lora", "--set", "lora.r=2")
    text = _run(EVIDENCE, "bleu", out / "t_neurons", out / "t_lora", "--samples", "20",
                "--out", tmp_path / "bleu.json")
    rows = json.loads((tmp_path / "bleu.json").read_text())
    assert [r["method"] for r in rows] == ["neurons", "lora"] and "| t_lora |" in text
    assert all(0 <= r["bleu"] <= 1 and r["trainable_elements"] > 0 for r in rows)
    assert rows[0]["vs_first_run"] is None and len(rows[1]["vs_first_run"]) == 2


@pytest.mark.timeout(600)
def test_grid_selects_on_heldout_rows_after_the_whole_sequence(tmp_path):
    spec = _tiny("evidence_sst2_agnews.yaml", tmp_path)
    out = tmp_path / "grid"
    _run(EVIDENCE, "grid", spec, "--out", out, "--heldout", "4", "--extend", "0",
         "--select-on", "heldout-sequence", "--family", "full=1e-4")
    grid = json.loads((out / "grid.json").read_text())
    run = json.loads((out / "full_lr1e-4" / "results.json").read_text())
    # The family's continual method ran through every task, each scored on its last 4
    # training rows; the rate's score is the held-out AP after the last stage.
    assert run["method"] == "seqft" and run["tasks"] == ["sst2", "agnews"]
    assert [len(run["details"][t][1]["correct"]) for t in run["tasks"]] == [4, 4]
    assert grid["scores"]["full"]["1e-4"] == run["summary"]["average_performance"]
    assert grid["select_on"] == "heldout-sequence" and grid["best"] == {"full": "1e-4"}
    assert all(t["eval_split"] == "heldout" for t in grid["tasks"])


def _pilot(spec: Path, out: Path, rows: str, *thresholds: str) -> dict:
    """`evidence.py pilot` at lr 1e-4, 3 held-out rows, default threshold 0; its report."""
    _run(EVIDENCE, "pilot", spec, "--out", out, "--rows", rows, "--lr", "1e-4",
         "--heldout", "3", "--default-threshold", "0", *thresholds)
    return json.loads((out / "pilot.json").read_text())


@pytest.mark.timeout(600)
def test_pilot_stops_at_the_first_budget_every_task_passes(tmp_path):
    spec, out = _tiny("protocol_o1_smollm2.yaml", tmp_path), tmp_path / "pilot"
    report = _pilot(spec, out, "6,4")  # threshold 0 passes at once: the smallest only
    assert [b["rows"] for b in report["budgets"]] == [4] and report["passed"]
    assert report["chosen_rows"] == 4
    first = report["budgets"][0]
    assert set(first["scores"]) == {"dbpedia", "amazon", "yahoo", "agnews"}
    assert first["steps"] == {"dbpedia": 2, "amazon": 2, "yahoo": 2, "agnews": 2}
    run = yaml.safe_load((out / "per_task_rows4" / "spec.resolved.yaml").read_text())
    assert run["method"] == "per_task" and run["tasks"][0]["eval_split"] == "heldout"
    # An unreachable threshold tries every budget and falls back to the largest.
    report = _pilot(spec, out, "4,6", "--threshold", "amazon=1.01")
    assert [b["rows"] for b in report["budgets"]] == [4, 6] and not report["passed"]
    assert report["chosen_rows"] == 6 and report["thresholds"]["amazon"] == 1.01
    # Later runs train at the pilot's budget: train_size capped at its chosen rows.
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"best": {"full": "1e-4"}}))
    _run(EVIDENCE, "run", spec, "--grid", grid, "--out", tmp_path / "runs", "--prefix", "p_",
         "--methods", "seqft", "--pilot", out / "pilot.json", "--set", "training.steps=1",
         "--set", "training.epochs=null", "--set", "training.warmup_steps=0")
    seqft = yaml.safe_load((tmp_path / "runs" / "p_seqft" / "spec.resolved.yaml").read_text())
    assert [t["train_size"] for t in seqft["tasks"]] == [6, 6, 6, 6]
