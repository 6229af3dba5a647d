"""`write_report(run_dir)`: every analysis whose inputs exist in a run directory.

Reads (docs/architecture.md §7; each input optional):

* `RUN/results.json`: `tasks`, `matrix`, `summary`, `deactivation` as described in
  `ncft.analysis.results`, plus two optional keys the runner may fill by calling
  our functions:
  - `similarity`: Leng & Xiong's protocol, `ncft.studies.similarity.paper_similarity`;
  - `similarity_final_model`: the dict of `ncft.analysis.similarity.layer_similarity`
    on the final model, with an optional `generalization` matrix indexed like its
    `mean` (`[i][j]`);
  - `neft`: the dict of `ncft.analysis.neft_stats.utilization_shift`, or one such
    dict per task name (what `ncft run` writes).
* `RUN/neurons/*.safetensors` (+ `.json`): NeuronSets, named by file stem.

Writes `RUN/analysis/<name>.json`, `RUN/plots/<name>.png` and `RUN/report.md`, each
atomically. A missing input skips its section with a one-line note; a malformed one
skips it with the error message (and a warning), so one bad input never costs the
rest of the report.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ncft.analysis import plots
from ncft.analysis.overlap import iou_matrix
from ncft.analysis.report_run import (
    Lines,
    ReportRun,
    correlation_table,
    fmt,
    fmt_p,
    matrix_table,
    require_keys,
    table,
)
from ncft.analysis.results import continual_metrics, deactivation_matrix, finetune_summary
from ncft.analysis.similarity import correlation, correlation_per_task
from ncft.continual.metrics import average_forgetting
from ncft.io import write_text
from ncft.neuron_set import NeuronSet


def _continual(run: ReportRun) -> Lines | str:
    res = run.need_results("matrix")
    if isinstance(res, str):
        return res
    cm = continual_metrics(res)
    run.save("continual", cm)
    proto = res.get("protocol") or {}
    calibration = proto.get("calibration") or "none"
    calibrated = calibration != "none"
    out = [f"Classification scored by `{proto.get('classification', 'rank')}`"
           + (f", calibration `{calibration}`" if calibrated else "")
           + (f"; W-NCFT query `{proto['wncft_query']}`" if proto.get("wncft_query")
              else "") + ".", ""]
    if calibrated:
        out += ["### Calibrated read-out", ""]
    out += _metrics_tables(cm)
    if calibrated and res.get("raw_matrix") is not None:
        # The same forwards read without the calibration: its own table, never mixed.
        raw_cm = continual_metrics({**res, "summary": {"forgetting": (
            res.get("raw_summary") or {}).get("forgetting")}}, "raw_matrix")
        run.save("continual_raw", raw_cm)
        out += ["### Uncalibrated (raw) read-out", ""] + _metrics_tables(raw_cm)
    if res.get("in_label_set"):
        out += ["Share of answers inside the task's own label set (task i after task j):",
                ""]
        out += matrix_table("task \\ after", cm["tasks"], cm["tasks"], res["in_label_set"])
    summary = res.get("summary")
    if isinstance(summary, dict) and summary:
        out += ["Runner summary (`results.json` `summary`):", ""]
        out += table(["key", "value"], [[k, _summary_value(v)] for k, v in summary.items()])
    out.append(
        run.figure("accuracy_matrix", "score matrix", lambda p: plots.plot_accuracy_matrix(cm, p))
    )
    out.append(
        run.figure("forgetting", "forgetting per stage", lambda p: plots.plot_forgetting(cm, p))
    )
    return out


def _metrics_tables(cm: dict[str, Any]) -> Lines:
    """One read-out's score matrix and its AP, BWT, FG (or retention), forgetting."""
    tasks = cm["tasks"]
    out = ["Score `a[i][j]` on task i (row) after training task j (column).", ""]
    out += matrix_table("task \\ after", tasks, tasks, cm["matrix"])
    out += table(
        ["metric", "value"],
        [
            ["AP (mean final score)", cm["average_performance"]],
            ["BWT", cm["backward_transfer"]],
        ]
        + ([[f"FG after {t} (stage {j}; eq. 5 against the per-task reference, higher = "
             "more kept)", fg] for j, (t, fg) in enumerate(zip(tasks, cm["fg"]))]
           if cm["fg"] is not None else [])
        + [[f"retention after {t} (stage {j}; / the run's own a[i][i], not FG)", k]
           for j, (t, k) in enumerate(zip(tasks, cm["kept"]))]
        + [[f"forgetting after {t} (stage {j}; max earlier - now, lower = better)", f]
           for j, (t, f) in enumerate(zip(tasks, average_forgetting(cm["matrix"])))],
    )
    return out


def _summary_value(v: Any) -> str:
    if v is None or isinstance(v, (bool, int, float, str)):
        return fmt(v)
    text = json.dumps(v)
    return f"`{text if len(text) <= 80 else text[:77] + '...'}`"


def _deactivation(run: ReportRun) -> Lines | str:
    res = run.need_results("deactivation")
    if isinstance(res, str):
        return res
    d = deactivation_matrix(res["deactivation"])
    run.save("deactivation", d)
    s, tasks = d["summary"], d["tasks"]
    mode = res["deactivation"].get("mode", "activation")
    how = ("activations zeroed" if mode == "activation" else
           "weights zeroed: gate/up rows and biases, down column")
    out = ["Relative drop `(baseline - off) / baseline` on task j (column) with task i's "
           f"neurons (row) switched off ({how}; Leng & Xiong 4.1).", ""]
    out += matrix_table("off \\ on", tasks, tasks, d["drop"])
    out += _summary_rows(s)
    out.append(run.figure("deactivation", "deactivation", lambda p: plots.plot_deactivation(d, p)))
    if res["deactivation"].get("task_metric") is not None:  # the paper's scoring
        own = deactivation_matrix(res["deactivation"]["task_metric"])
        run.save("deactivation_task_metric", own)
        out += ["", "Scored by each task's own evaluation measure (what the accuracy matrix "
                "stores; Leng & Xiong's scoring), the same relative drop:", ""]
        out += matrix_table("off \\ on", tasks, tasks, own["drop"])
        out += _summary_rows(own["summary"])
    if res["deactivation"].get("finetune_matrix") is not None:
        out += _finetune(run, res["deactivation"]["finetune_matrix"])
    return out


def _summary_rows(s: dict[str, Any]) -> Lines:
    return table(
        ["mean relative drop", "task neurons", "random neurons"],
        [
            ["own task (diagonal)", s["diag"], s["random_diag"]],
            ["other tasks (off-diagonal)", s["offdiag"], s["random_offdiag"]],
            ["specificity (diagonal - off-diagonal)", s["specificity"], None],
            ["all cells", None, s["random_mean"]],
        ],
    )


def _finetune(run: ReportRun, raw: dict[str, Any]) -> Lines:
    f = finetune_summary(raw)
    run.save("finetune_matrix", f)
    s, tasks = f["summary"], f["tasks"]
    out = ["### Fine-tuning matrix (Leng & Xiong Fig. 5, right)", "",
           f"Change `score - zero-shot` on task j (column) after training only task i's "
           f"neurons (row) from the base model, {raw.get('steps')} steps.", ""]
    out += matrix_table("trained \\ on", tasks, tasks, f["change"])
    out += table(["mean change", "task neurons", "random neurons"],
                  [["own task (diagonal)", s["diag"], s["random_diag"]],
                   ["other tasks (off-diagonal)", s["offdiag"], s["random_offdiag"]]])
    out.append(run.figure("finetune_matrix", "fine-tuning matrix",
                          lambda p: plots.plot_finetune_matrix(f, p)))
    if raw.get("task_metric") is not None:  # the paper's scoring
        own = finetune_summary(raw["task_metric"])
        run.save("finetune_matrix_task_metric", own)
        out += ["", "Scored by each task's own evaluation measure, the same change:", ""]
        out += matrix_table("trained \\ on", tasks, tasks, own["change"])
    return out


def _neuron_sets(run: ReportRun) -> dict[str, NeuronSet]:
    files = sorted(run.layout.neurons.glob("*.safetensors"))
    sets = {f.stem: NeuronSet.load(f) for f in files}
    order = (run.results or {}).get("tasks") or []
    # Training order first (as in the score matrix), then any other sets by name.
    names = [t for t in order if isinstance(t, str) and t in sets]
    names += [n for n in sets if n not in names]
    return {n: sets[n] for n in names}


def _overlap(run: ReportRun) -> Lines | str:
    sets = _neuron_sets(run)
    if not sets:
        return "no NeuronSets in neurons/"
    iou = iou_matrix(sets)
    run.save("overlap", iou)
    tasks = iou["tasks"]
    out = table(
        ["set", "selected (fqn, axis, index)", "scorer", "fraction"],
        [[n, s.num_selected(), s.meta.get("scorer"), s.meta.get("fraction")]
         for n, s in sets.items()],
    )
    out += ["Whole-model IoU:", ""]
    out += matrix_table("task", tasks, tasks, iou["whole"])
    out += [f"Mean IoU between different tasks: {fmt(iou['mean_offdiag'])}", ""]
    if iou["layers"]:
        out += table(
            ["layer", "mean off-diagonal IoU"],
            list(zip(iou["layers"], iou["mean_offdiag_per_layer"])),
        )
    out.append(run.figure("iou", "IoU overlap", lambda p: plots.plot_iou(iou, p)))
    return out


def _similarity(run: ReportRun) -> Lines | str:
    res = run.need_results()
    if isinstance(res, str):
        return res
    if res.get("similarity") is None and res.get("similarity_final_model") is None:
        return "results.json has no `similarity` or `similarity_final_model`"
    out: Lines = []
    if res.get("similarity") is not None:
        out += _similarity_paper(run, res["similarity"])
    if res.get("similarity_final_model") is not None:
        out += _similarity_final(run, res["similarity_final_model"])
    return out


def _similarity_paper(run: ReportRun, sim: dict[str, Any]) -> Lines:
    require_keys(sim, ("tasks", "layers", "per_layer", "mean", "performance"),
                  "results.similarity")
    tasks = sim["tasks"]
    out = ["### Leng & Xiong's protocol (§5.2, Fig. 3, Table 4)", "",
           f"M_i: the base model fully fine-tuned on task i ({sim.get('steps')} steps). Cosine "
           "(method `mean`) between task i's and task j's neuron parameters, both selected "
           "and read inside M_i, mean over layers (row: M_i, column: T_j):", ""]
    out += matrix_table("M_i \\ T_j", tasks, tasks, sim["mean"])
    out += [f"M_i's score on T_j ({sim.get('metric', 'score')}):", ""]
    out += matrix_table("M_i \\ T_j", tasks, tasks, sim["performance"])
    corr = correlation(sim["mean"], sim["performance"])
    per_layer = []
    for k, layer in enumerate(sim["layers"]):
        layer_sim = [[None if c is None else c[k] for c in row] for row in sim["per_layer"]]
        per_layer.append([layer, correlation(layer_sim, sim["performance"])["pearson"]["r"]])
    out += correlation_table("correlation with M_i's score on T_j (i != j)", corr)
    # Table 4 correlates per test task (over the models M_i), the pooled r above pools all.
    per_task = correlation_per_task(sim["mean"], sim["performance"])
    out += table(["test task T_j (Table 4)", "Pearson r over M_i, i != j", "p", "models"],
                 [[t, c["pearson"]["r"], fmt_p(c["pearson"]["p"]), c["n"]]
                  for t, c in zip(tasks, per_task)])
    out += table(["layer", "Pearson r of that layer's similarity"], per_layer)
    out.append(run.figure("similarity_paper_layers", "similarity per layer (paper protocol)",
                          lambda p: plots.plot_paper_similarity(sim, p)))
    out.append(run.figure("similarity_paper_correlation", "similarity vs performance",
                          lambda p: plots.plot_correlation(corr, p, tasks)))
    run.save("similarity", {**sim, "correlation": corr, "per_layer_pearson": per_layer,
                            "correlation_per_task": per_task})
    return out + [""]


def _similarity_final(run: ReportRun, sim: dict[str, Any]) -> Lines:
    require_keys(sim, ("tasks", "layers", "method", "per_layer", "mean"),
                  "results.similarity_final_model")
    tasks = sim["tasks"]
    out = ["### Final-model variant (ours, not the paper's protocol)", "",
           f"Cosine similarity of task-neuron parameters (method `{sim['method']}`) read in "
           "the final model of the sequence, mean over layers:", ""]
    out += matrix_table("task", tasks, tasks, sim["mean"])
    out.append(run.figure("similarity_layers", "similarity per layer",
                          lambda p: plots.plot_layer_similarity(sim, p)))
    data = dict(sim)
    if sim.get("generalization") is not None:
        corr = correlation(sim["mean"], sim["generalization"])
        data["correlation"] = corr
        out += [""] + correlation_table("correlation with generalization", corr)
        out.append(run.figure("similarity_correlation", "similarity vs generalization",
                              lambda p: plots.plot_correlation(corr, p, tasks)))
    else:
        out += ["", "No `similarity_final_model.generalization` matrix: correlation skipped."]
    run.save("similarity_final_model", data)
    return out


def _per_task(data: dict[str, Any], marker: str) -> dict[str, Any]:
    """One analysis dict (key `marker` present) or, as `ncft run` writes, one per task."""
    return {"": data} if marker in data else data


def _per_task_results(run: ReportRun, key: str, marker: str,
                      required: Sequence[str]) -> dict[str, Any] | str:
    """`results[key]` per task, each checked for `required` and saved; or a skip note.

    The raw `results[key]` is saved as analysis `key` once every task's dict passed.
    """
    res = run.need_results(key)
    if isinstance(res, str):
        return res
    data = res[key]
    per_task = _per_task(data, marker)
    for task, shift in per_task.items():
        require_keys(shift, required, f"results.{key}" + ("." + task if task else ""))
    run.save(key, data)
    return per_task


def _neft(run: ReportRun) -> Lines | str:
    per_task = _per_task_results(run, "neft", "buckets", (
        "counts", "buckets", "avg_abs_delta_rank", "strong_threshold", "num_neurons"))
    if isinstance(per_task, str):
        return per_task
    out = ["NeFT §6.1 (`ncft.analysis.neft_utilization`): Rank of each neuron by its max "
           "Pearson correlation with another neuron of its group, on each task's model "
           "before and after training it; ΔRank = Rank(after) - Rank(before). Strongly "
           "affected: |ΔRank| > threshold (the paper's 100,000 at 7B, scaled by the neuron "
           "count); suppressed and indirectly affected are subsets of it.", ""]
    for task, shift in per_task.items():
        name = f"neft_utilization_{task}" if task else "neft_utilization"
        c = shift["counts"]
        out += [f"Task `{task or '-'}`: {shift['num_neurons']} neurons, {c['trained']} trained, "
                f"Avg(|ΔRank|) {shift['avg_abs_delta_rank']:.1f} "
                f"({shift['avg_abs_delta_rank_normalized']:.4f} of N), strongly affected "
                f"threshold {shift['strong_threshold']:.1f} ranks.", ""]
        out += table(["category", "neurons"],
                      [[k, c[k]] for k in ("strongly_affected", "suppressed",
                                            "indirectly_affected")])
        out.append(run.figure(name, f"NeFT utilization {task}".strip(),
                              lambda p, d=shift: plots.plot_neft_utilization(d, p)))
    return out


def _weight_movement(run: ReportRun) -> Lines | str:
    per_task = _per_task_results(run, "weight_movement_rank_shift", "counts",
                                 ("counts", "hist", "shift_threshold", "scope"))
    if isinstance(per_task, str):
        return per_task
    out = ["Our measure, not NeFT §6.1's: rank shift of the selection probe's `1 - cos` "
           "weight movement (`ncft.analysis.neft_stats`).", ""]
    for task, shift in per_task.items():
        name = f"weight_movement_rank_shift_{task}" if task else "weight_movement_rank_shift"
        if task:
            out += [f"Task `{task}`: {shift['num_selected']} of {shift['num_rows']} candidates "
                    f"trained, threshold {shift['shift_threshold']}.", ""]
        out += table(
            ["category", "selected", "not selected"],
            [[c, v["selected"], v["unselected"]] for c, v in shift["counts"].items()],
        )
        out.append(run.figure(name, f"weight-movement rank shift {task}".strip(),
                              lambda p, d=shift: plots.plot_rank_shift(d, p)))
    return out


SECTIONS: tuple[tuple[str, Callable[[ReportRun], Lines | str]], ...] = (
    ("Accuracy matrix and continual metrics", _continual),
    ("Deactivation", _deactivation),
    ("Neuron overlap (IoU)", _overlap),
    ("Parameter similarity", _similarity),
    ("NeFT utilization (§6.1)", _neft),
    ("Weight-movement rank shift (ours)", _weight_movement),
)


def write_report(run_dir: str | os.PathLike[str]) -> Path:
    """Run every analysis whose inputs exist in `run_dir`; write JSON, PNGs, report.md.

    Args:
        run_dir: A run directory (docs/architecture.md §7).

    Returns:
        Path of `RUN/report.md`.

    Raises:
        ValueError: If `run_dir` is not a directory.

    """
    root = Path(run_dir)
    if not root.is_dir():
        raise ValueError(f"run_dir {str(root)!r} is not a directory")
    run = ReportRun(root)
    lines = [f"# Report: {root.resolve().name}", ""]
    for title, build in SECTIONS:
        lines += [f"## {title}", ""]
        try:
            body = build(run)
        except (ValueError, KeyError, TypeError) as e:
            warnings.warn(f"report section {title!r} skipped: {e}", stacklevel=2)
            body = f"error: {e}"
        lines += [f"_Skipped: {body}._", ""] if isinstance(body, str) else [*body, ""]
    return write_text(run.layout.report, "\n".join(lines).rstrip() + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m ncft.analysis.report RUN_DIR")
    print(write_report(sys.argv[1]))
