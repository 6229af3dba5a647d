"""`ncft compare RUN ...`: one table of methods from their results.json files."""

from __future__ import annotations

import json
from pathlib import Path

from ncft.continual.methods import METHODS
from ncft.continual.metrics import average_forgetting, forgetting
from ncft.run_paths import RunPaths

HEADER_NOTE = ("FG: Leng & Xiong eq. 5 after the last task, a retention ratio (higher = more "
               "retained). Forgetting: mean over earlier tasks of best earlier score minus "
               "final (lower = less forgotten). Protocol: classification scoring (rank: label "
               "log-probability ranking; generate: greedy decoding + exact match) and, for "
               "wncft, the mixing query (task or example).")


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def compare_table(run_dirs: list[str]) -> str:
    """Markdown table: method, final score per task, CL/AP, BWT, FG, forgetting, protocol.

    FG and forgetting are computed from each run's matrix (`ncft.continual.metrics`),
    so runs written before `average_forgetting` existed compare too.
    """
    rows, header_tasks = [], None
    for run in map(Path, run_dirs):
        path = RunPaths(run).results
        if not path.is_file():
            raise ValueError(f"{run}: no results.json (is the run finished?)")
        res = json.loads(path.read_text())
        tasks, matrix, summary = res["tasks"], res["matrix"], res["summary"]
        header_tasks = header_tasks or tasks
        if tasks != header_tasks:
            raise ValueError(f"{run}: tasks {tasks} differ from {header_tasks}")
        final = [row[-1] for row in matrix]
        fg, af = _forgetting(res)
        rows.append([run.name, res["method"], *map(_fmt, final),
                     _fmt(summary.get("average_performance")),
                     _fmt(summary.get("backward_transfer")), _fmt(fg), _fmt(af),
                     _protocol(res)])
    head = ["run", "method", *[f"{t} (final)" for t in header_tasks], "CL/AP", "BWT",
            "FG (retention, higher better)", "forgetting (lower better)", "protocol"]
    lines = [HEADER_NOTE, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    for run in map(Path, run_dirs):
        study = json.loads(RunPaths(run).results.read_text()).get("deactivation")
        if study:
            lines += ["", f"Deactivation study ({run.name}, {study['metric']}):", "",
                      "| units off | " + " | ".join(study["tasks"]) + " |",
                      "|" + "---|" * (len(study["tasks"]) + 1),
                      "| none | " + " | ".join(map(_fmt, study["baseline"])) + " |"]
            for name, off, rnd in zip(study["tasks"], study["task_neurons_off"],
                                      study["random_off"]):
                lines.append(f"| {name} task units | " + " | ".join(map(_fmt, off)) + " |")
                lines.append(f"| random ({name} size) | " + " | ".join(map(_fmt, rnd)) + " |")
    return "\n".join(lines)


def _forgetting(res: dict) -> tuple[float | None, float | None]:
    """Final FG and average forgetting (None for one task, or stages that start from base)."""
    matrix = res["matrix"]
    row = METHODS.get(res.get("method", ""))
    if len(matrix) < 2 or (row is not None and row.from_base):
        return None, None
    return forgetting(matrix)[-1], average_forgetting(matrix)[-1]


def _protocol(res: dict) -> str:
    """How the run scored: classification mode, and W-NCFT's query where it mixes."""
    proto = res.get("protocol") or {}
    text = proto.get("classification", "rank")
    if proto.get("calibration") not in (None, "none"):
        text += f", calibration={proto['calibration']}"
    if proto.get("wncft_query"):
        text += f", query={proto['wncft_query']}"
    return text
