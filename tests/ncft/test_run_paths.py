"""The run directory's paths (docs/architecture.md §7) are named in one module only."""

from __future__ import annotations

import re
from pathlib import Path

from ncft.run_paths import RunPaths
from tests.support.spawn import REPO


def test_layout_is_the_documented_contract():
    run = RunPaths(Path("RUN"))
    got = {name: str(getattr(run, name)) for name in (
        "spec", "neurons", "metrics", "results", "deactivation", "checkpoints", "in_progress",
        "neft", "wncft", "tensorboard", "final", "plots", "analysis", "report")}
    assert got == {
        "spec": "RUN/spec.resolved.yaml", "neurons": "RUN/neurons",
        "metrics": "RUN/metrics.jsonl", "results": "RUN/results.json",
        "deactivation": "RUN/deactivation.json", "checkpoints": "RUN/checkpoints",
        "in_progress": "RUN/checkpoints/in-progress", "neft": "RUN/neft",
        "wncft": "RUN/wncft", "tensorboard": "RUN/tensorboard", "final": "RUN/final",
        "plots": "RUN/plots", "analysis": "RUN/analysis", "report": "RUN/report.md",
    }
    assert str(run.stage_dir(1, "agnews")) == "RUN/checkpoints/02-agnews"
    assert str(run.in_progress_dir(0, "sst2")) == "RUN/checkpoints/in-progress/01-sst2"
    assert str(run.neuron_file("sst2")) == "RUN/neurons/sst2.safetensors"
    assert str(run.neft_scores("sst2", "before")) == "RUN/neft/sst2.before.safetensors"
    assert str(run.neft_shift("sst2")) == "RUN/neft/sst2.rank_shift.json"
    assert RunPaths is RunPaths, "the launcher builds on the same layout"


def test_stage_dirs_lists_checkpoints_in_order(tmp_path):
    run = RunPaths(tmp_path)
    for index, task in ((1, "agnews"), (0, "sst2")):
        run.stage_dir(index, task).mkdir(parents=True)
    run.in_progress_dir(2, "rte").mkdir(parents=True)
    assert list(run.stage_dirs()) == [(0, run.stage_dir(0, "sst2")),
                                      (1, run.stage_dir(1, "agnews"))]


def test_no_other_module_spells_the_run_directory_names():
    names = ("spec.resolved.yaml", "metrics.jsonl", "results.json", "deactivation.json",
             "report.md", "state.json", "in-progress")
    pattern = re.compile("|".join(rf"[\"']{re.escape(n)}[\"']" for n in names))
    owners = {REPO / "ncft" / "run_paths.py"}
    offenders = [
        f"{path.relative_to(REPO)}: {match.group(0)}"
        for package in ("launcher", "ncft")
        for path in sorted((REPO / package).rglob("*.py")) if path not in owners
        for match in pattern.finditer(path.read_text())
    ]
    assert not offenders, offenders
