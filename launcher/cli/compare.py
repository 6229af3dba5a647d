"""`ncft compare RUN ... [--reference PER_TASK_RUN]`: methods side by side, per read-out.

Scores of different protocols are never put in one table: each read-out gets its own
("raw": classification without calibration, which every run has; "calibrated": the
content-free calibrated read-out, only for runs that used `eval.calibration`). FG
(Leng & Xiong eq. 5) divides by `A_i` from a `per_task` reference run of the same
read-out (`--reference`, or the run's own `eval.reference`); without one, the column is
retention against the run's own diagonal and is called that, not FG.

Runs of the same configuration that differ only in `training.seed` (and their output
directory) form one method with several seeds: the table then gives each seed's AP,
their mean with a 95% interval that resamples seeds and examples together, and the
paired per-seed difference to the first method (`ncft.analysis.bootstrap.seed_interval`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ncft.continual.methods import METHODS
from ncft.continual.metrics import (
    average_forgetting,
    average_performance,
    backward_transfer,
    forgetting,
    reference_read_outs,
    retention,
)
from ncft.run_paths import RunPaths

HEADER_NOTE = ("Forgetting: mean over earlier tasks of best earlier score minus final "
               "(lower = less forgotten). Protocol: classification scoring (rank: label "
               "log-probability ranking; generate: greedy decoding + exact match) and, for "
               "wncft, the mixing query (task or example).")
FG_NOTE = ("FG: Leng & Xiong eq. 5 after the last task, mean a[i][T] / A_i with A_i from "
           "the per-task reference {ref} (a retention ratio, higher = more retained).")
RETENTION_NOTE = ("Retention: mean a[i][T] / a[i][i], against each run's own just-trained "
                  "score. Not FG (eq. 5 divides by a per-task run's A_i: pass --reference).")
READ_OUTS = {"raw": "uncalibrated classification scores",
             "calibrated": "content-free calibrated classification scores"}


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _load(run: Path) -> dict[str, Any]:
    path = RunPaths(run).results
    if not path.is_file():
        raise ValueError(f"{run}: no results.json (is the run finished?)")
    return json.loads(path.read_text())


def _calibrated(res: dict[str, Any]) -> bool:
    return (res.get("protocol") or {}).get("calibration", "none") not in (None, "none")


def read_out_matrix(res: dict[str, Any], read_out: str) -> list | None:
    """A run's matrix of one read-out, or None if the run has no such scores."""
    if read_out == "calibrated":
        return res["matrix"] if _calibrated(res) else None
    return res.get("raw_matrix") if _calibrated(res) else res["matrix"]


def _spec_key(run: Path, res: dict[str, Any]) -> str:
    """What makes runs one method: the resolved spec without seeds and output.

    Every section's `seed` is dropped (a second seed may move the selection's too), and
    fields a run's spec lacks take today's defaults, so a run written before a field
    existed still groups with one written after.
    """
    from pydantic import BaseModel

    from launcher.spec import Spec

    spec_path = RunPaths(run).spec
    if not spec_path.is_file():
        return json.dumps([res.get("method"), res.get("protocol")], sort_keys=True)
    spec = yaml.safe_load(spec_path.read_text()) or {}
    spec.pop("output", None)
    for name, info in Spec.model_fields.items():
        model = info.annotation
        section = spec.get(name, {})  # a section a spec leaves out takes its defaults
        if isinstance(section, dict) and isinstance(model, type) and issubclass(model,
                                                                                 BaseModel):
            defaults = {k: f.default for k, f in model.model_fields.items()
                        if not f.is_required() and f.default_factory is None}
            spec[name] = {k: v for k, v in {**defaults, **section}.items() if k != "seed"}
    return json.dumps(spec, sort_keys=True, default=str)


def _seed(run: Path) -> int | None:
    spec_path = RunPaths(run).spec
    if not spec_path.is_file():
        return None
    return ((yaml.safe_load(spec_path.read_text()) or {}).get("training") or {}).get("seed")


def _reference(path: str | None, run_refs: list[str | None], tasks: list[str],
               protocol: dict) -> tuple[dict | None, str | None]:
    """A_i per read-out from `--reference`, else from the runs' common `eval.reference`."""
    if path is None:
        given = {r for r in run_refs if r}
        if len(given) != 1 or None in run_refs:
            return None, None
        path = given.pop()
    res = _load(Path(path))
    return reference_read_outs(res, tasks, protocol), Path(path).name


def compare_table(run_dirs: Sequence[str], reference: str | None = None,
                  samples: int = 1000) -> str:
    """Markdown tables: one per read-out; a seeds table where a method has several seeds.

    Args:
        run_dirs: Finished run directories (same tasks).
        reference: A finished `per_task` run directory: its diagonal is A_i for FG.
        samples: Bootstrap replicates of the seeds table.

    Raises:
        ValueError: If a run is unfinished, the tasks differ, or the reference is not
            a per_task run of these tasks scored the same way.
    """
    runs = [Path(r) for r in run_dirs]
    results = [_load(r) for r in runs]
    tasks = results[0]["tasks"]
    for run, res in zip(runs, results):
        if res["tasks"] != tasks:
            raise ValueError(f"{run}: tasks {res['tasks']} differ from {tasks}")
    classification = {(r.get("protocol") or {}).get("classification", "rank") for r in results}
    if len(classification) > 1:
        raise ValueError(f"the runs scored classification differently {sorted(classification)};"
                         " compare runs of one protocol")
    own = [_spec_reference(run) for run in runs]
    ref, ref_name = _reference(reference, own, tasks, {"classification": classification.pop()})
    lines: list[str] = []
    for read_out, what in READ_OUTS.items():
        rows = [(run, res, m) for run, res in zip(runs, results)
                if (m := read_out_matrix(res, read_out)) is not None]
        if not rows:
            continue
        a_i = (ref or {}).get(read_out)
        lines += _read_out_table(read_out, what, tasks, rows, a_i, ref_name)
        lines += _seeds_table(read_out, rows, samples)
    lines += _deactivation_tables(runs, results)
    return "\n".join(lines)


def _spec_reference(run: Path) -> str | None:
    spec_path = RunPaths(run).spec
    if not spec_path.is_file():
        return None
    return ((yaml.safe_load(spec_path.read_text()) or {}).get("eval") or {}).get("reference")


def _read_out_table(read_out, what, tasks, rows, a_i, ref_name) -> list[str]:
    fg_head = "FG (eq. 5, higher better)" if a_i else "retention (own diagonal, not FG)"
    head = ["run", "method", *[f"{t} (final)" for t in tasks], "CL/AP", "BWT", fg_head,
            "forgetting (lower better)", "in label set (final)", "protocol"]
    note = FG_NOTE.format(ref=ref_name) if a_i else RETENTION_NOTE
    out = [f"### {read_out}: {what}", "", HEADER_NOTE, note, "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run, res, matrix in rows:
        final = [row[-1] for row in matrix]
        ap, bwt, fg, af = _summary(res, matrix, a_i)
        share = [row[-1] for row in res.get("in_label_set") or [] if row and row[-1] is not None]
        out.append("| " + " | ".join([
            run.name, res["method"], *map(_fmt, final), _fmt(ap), _fmt(bwt), _fmt(fg),
            _fmt(af), _fmt(sum(share) / len(share) if share else None),
            _protocol(res, read_out)]) + " |")
    return out + [""]


def _lenient(fn, *args):
    try:
        return fn(*args)
    except ValueError:
        return None


def _summary(res, matrix, a_i) -> tuple:
    """AP, BWT, FG (or retention) and forgetting of one read-out's matrix."""
    row = METHODS.get(res.get("method", ""))
    if len(matrix) < 2 or (row is not None and row.from_base):  # each stage from the base
        diagonal = [matrix[i][i] for i in range(len(matrix)) if matrix[i][i] is not None]
        return (sum(diagonal) / len(diagonal) if diagonal else None), None, None, None
    ratio = forgetting(matrix, a_i)[-1] if a_i else retention(matrix)[-1]
    return (_lenient(average_performance, matrix), _lenient(backward_transfer, matrix),
            ratio, average_forgetting(matrix)[-1])


def _seeds_table(read_out: str, rows, samples: int) -> list[str]:
    """Per method with >= 2 seeds: per-seed AP, mean [seed x example CI], paired Δ."""
    from ncft.analysis.bootstrap import seed_interval

    groups: dict[str, list] = {}
    for run, res, _ in rows:
        groups.setdefault(_spec_key(run, res), []).append((_seed(run), run, res))
    if all(len(g) < 2 for g in groups.values()):
        return []
    key = "raw" if read_out == "raw" else "main"
    ordered = [sorted(g, key=lambda x: (x[0] is None, x[0] or 0)) for g in groups.values()]
    base = ordered[0]
    out = [f"Seeds ({read_out}): AP per seed; mean with a 95% interval resampling seeds and "
           f"examples together ({samples} replicates); Δ vs {base[0][2]['method']}: "
           "per-seed paired differences and their interval (same seeds and examples).", "",
           "| method | seeds | AP per seed | AP mean [95%] | ΔAP per seed | ΔAP mean [95%] |",
           "|---|---|---|---|---|---|"]
    for group in ordered:
        res_list = [res for _, _, res in group]
        one = seed_interval(res_list, samples=samples, read_out=key)
        delta = ["-", "-"]
        if group is not base and [s for s, _, _ in group] == [s for s, _, _ in base]:
            d = seed_interval(res_list, samples=samples, read_out=key,
                              against=[res for _, _, res in base])
            delta = [", ".join(map(_fmt, d["paired"])), _with_ci(d)]
        seeds = ", ".join(str(s) for s, _, _ in group)
        out.append(f"| {group[0][2]['method']} | {seeds} | "
                   f"{', '.join(map(_fmt, one['per_seed']))} | {_with_ci(one)} | "
                   f"{delta[0]} | {delta[1]} |")
    return out + [""]


def _with_ci(stat: dict) -> str:
    ci = stat.get("ci95")
    return _fmt(stat["mean"]) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _deactivation_tables(runs, results) -> list[str]:
    lines: list[str] = []
    for run, res in zip(runs, results):
        study = res.get("deactivation")
        if study:
            lines += ["", f"Deactivation study ({run.name}, {study['metric']}):", "",
                      "| units off | " + " | ".join(study["tasks"]) + " |",
                      "|" + "---|" * (len(study["tasks"]) + 1),
                      "| none | " + " | ".join(map(_fmt, study["baseline"])) + " |"]
            for name, off, rnd in zip(study["tasks"], study["task_neurons_off"],
                                      study["random_off"]):
                lines.append(f"| {name} task units | " + " | ".join(map(_fmt, off)) + " |")
                lines.append(f"| random ({name} size) | " + " | ".join(map(_fmt, rnd)) + " |")
    return lines


def _protocol(res: dict, read_out: str) -> str:
    """How the run scored: classification mode, read-out, W-NCFT's query where it mixes."""
    proto = res.get("protocol") or {}
    text = proto.get("classification", "rank")
    if read_out == "calibrated":
        text += f", calibration={proto['calibration']}"
    elif _calibrated(res):
        text += ", uncalibrated read-out"
    if proto.get("wncft_query"):
        text += f", query={proto['wncft_query']}"
    return text
