"""`ncft compare RUN ...`: one table of methods from their results.json files."""

from __future__ import annotations

import json
from pathlib import Path

from ncft.run_layout import RunLayout


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def compare_table(run_dirs: list[str]) -> str:
    """Markdown table: method, final score per task, CL/AP, BWT, and study summary."""
    rows, header_tasks = [], None
    for run in map(Path, run_dirs):
        path = RunLayout(run).results
        if not path.is_file():
            raise ValueError(f"{run}: no results.json (is the run finished?)")
        res = json.loads(path.read_text())
        tasks, matrix, summary = res["tasks"], res["matrix"], res["summary"]
        header_tasks = header_tasks or tasks
        if tasks != header_tasks:
            raise ValueError(f"{run}: tasks {tasks} differ from {header_tasks}")
        final = [row[-1] for row in matrix]
        rows.append([run.name, res["method"], *map(_fmt, final),
                     _fmt(summary.get("average_performance")),
                     _fmt(summary.get("backward_transfer"))])  # fmt: skip
    head = ["run", "method", *[f"{t} (final)" for t in header_tasks], "CL/AP", "BWT"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    for run in map(Path, run_dirs):
        study = json.loads(RunLayout(run).results.read_text()).get("deactivation")
        if study:
            lines += ["", f"Deactivation study ({run.name}, {study['metric']}):", "",
                      "| units off | " + " | ".join(study["tasks"]) + " |",
                      "|" + "---|" * (len(study["tasks"]) + 1),
                      "| none | " + " | ".join(map(_fmt, study["baseline"])) + " |"]  # fmt: skip
            for name, off, rnd in zip(study["tasks"], study["task_neurons_off"],
                                      study["random_off"]):  # fmt: skip
                lines.append(f"| {name} task units | " + " | ".join(map(_fmt, off)) + " |")
                lines.append(f"| random ({name} size) | " + " | ".join(map(_fmt, rnd)) + " |")
    return "\n".join(lines)
