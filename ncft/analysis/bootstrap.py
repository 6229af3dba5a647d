"""Bootstrap intervals for continual-learning results, from per-example outcomes.

A run's `results.json` keeps, for every evaluated (task i, stage j), the 0/1 outcome of
each evaluation example (`details[task][stage]["correct"]`, `ncft.evaluate`). The same
examples of task i are scored after every stage, so a bootstrap replicate draws ONE
resample of task i's example indices and applies it to every stage (a paired
resample); tasks are resampled independently of each other. Each replicate's matrix
gives AP, BWT and average forgetting (`ncft.continual.metrics`); the interval is the
2.5 and 97.5 percentiles over replicates (percentile bootstrap).

Two runs evaluated on the same examples can be compared on the same replicates (the
indices depend only on the seed and each task's example count), which gives an
interval for the difference that is much tighter than the two intervals side by side
suggest. `compare_runs` does that against a reference run.

Prediction counts per class (`prediction_counts`) show a collapse to one label at a
glance: generate-mode predictions are matched to the normalised label strings, and
anything else counts as "(other)".
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ncft.continual.metrics import average_forgetting, average_performance, backward_transfer
from ncft.generation import normalize_answer
from ncft.run_paths import RunPaths

OTHER = "(other)"
METRICS = ("average_performance", "backward_transfer", "average_forgetting", "diagonal_mean")


def outcomes(results: dict[str, Any], read_out: str = "main") -> dict[tuple[int, int], np.ndarray]:
    """`{(task i, stage j): 0/1 array}` for every evaluated cell that kept its outcomes.

    `read_out="raw"` reads the uncalibrated outcomes a calibrated run keeps beside its
    calibrated ones (`details[...]["raw"]`); a run without calibration has only one.

    Raises:
        ValueError: If a cell's example count differs between stages of one task (the
            paired resample needs the same examples after every stage).
    """
    cells: dict[tuple[int, int], np.ndarray] = {}
    for i, name in enumerate(results["tasks"]):
        for j, detail in enumerate(results["details"].get(name, [])):
            if detail and read_out == "raw" and "raw" in detail:
                detail = detail["raw"]
            if detail and "correct" in detail:
                cells[(i, j)] = np.asarray(detail["correct"], dtype=np.float64)
    for i in {i for i, _ in cells}:
        sizes = {len(v) for (a, _), v in cells.items() if a == i}
        if len(sizes) > 1:
            raise ValueError(f"task {results['tasks'][i]}: evaluated on {sorted(sizes)} "
                             "examples at different stages; a paired bootstrap needs one set")
    return cells


def _metrics(matrix: list[list[float | None]]) -> dict[str, float | None]:
    def lenient(fn):
        try:
            return fn(matrix)
        except ValueError:
            return None

    forgetting = average_forgetting(matrix)[-1] if len(matrix) > 1 else None
    diagonal = [matrix[i][i] for i in range(len(matrix)) if matrix[i][i] is not None]
    return {"average_performance": lenient(average_performance),
            "backward_transfer": lenient(backward_transfer),
            "average_forgetting": forgetting,
            # The just-trained scores: per_task's reference (its only evaluated cells).
            "diagonal_mean": sum(diagonal) / len(diagonal) if diagonal else None}


def cell_replicates(
    cells: dict[tuple[int, int], np.ndarray], samples: int, seed: int
) -> dict[tuple[int, int], np.ndarray]:
    """Each cell's score over `samples` paired replicates (same indices for one task)."""
    counts = {i: len(v) for (i, _), v in cells.items()}
    draws = {i: np.random.default_rng([seed, i]).integers(0, n, size=(samples, n))
             for i, n in counts.items()}
    return {cell: values[draws[cell[0]]].mean(axis=1) for cell, values in cells.items()}


def replicates(
    cells: dict[tuple[int, int], np.ndarray], num_tasks: int, samples: int, seed: int
) -> dict[str, np.ndarray]:
    """Each metric over `samples` paired bootstrap replicates (NaN where undefined).

    Task i's resample indices come from `numpy.random.default_rng([seed, i])`, so two
    runs with the same example counts are resampled identically (`compare_runs`).
    """
    means = cell_replicates(cells, samples, seed)
    out = {m: np.full(samples, np.nan) for m in METRICS}
    for b in range(samples):
        matrix: list[list[float | None]] = [[None] * num_tasks for _ in range(num_tasks)]
        for (i, j), series in means.items():
            matrix[i][j] = float(series[b])
        for name, value in _metrics(matrix).items():
            if value is not None:
                out[name][b] = value
    return out


def interval(values: np.ndarray) -> list[float] | None:
    """The 95% percentile interval of the finite `values`, or None if there are none."""
    finite = values[np.isfinite(values)]
    if not finite.size:
        return None
    return [float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))]


def prediction_counts(results: dict[str, Any], labels: dict[str, Sequence[str]] | None = None
                      ) -> dict[str, list[dict[str, int] | None]]:
    """`{task: [per stage {label: count}]}` of what the model answered.

    Args:
        results: A run's results.json.
        labels: Each task's label strings. A prediction that normalises to one of the
            task's own labels counts as that label; one that is ANOTHER task's label
            counts as `"<task>: <label>"` (the model answering the wrong task, a form of
            interference), anything else as "(other)". A task without labels counts its
            predictions as they are.
    """
    labels = labels or {}
    out: dict[str, list[dict[str, int] | None]] = {}
    for name in results["tasks"]:
        foreign = {normalize_answer(lab): f"{other}: {lab}"
                   for other, labs in labels.items() if other != name for lab in labs}
        own = {normalize_answer(lab): lab for lab in labels.get(name, [])}
        per_stage: list[dict[str, int] | None] = []
        for detail in results["details"].get(name, []):
            if not detail or "predictions" not in detail:
                per_stage.append(None)
                continue
            counts: Counter[str] = Counter()
            for pred in detail["predictions"]:
                key = normalize_answer(pred)
                if own:
                    counts[own.get(key) or foreign.get(key) or OTHER] += 1
                else:
                    counts[pred] += 1
            per_stage.append(dict(counts.most_common()))
        out[name] = per_stage
    return out


def run_table(run_dir: Path, samples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """One run's matrix, metrics with 95% bootstrap intervals, and prediction counts."""
    layout = RunPaths(Path(run_dir))
    results = json.loads(layout.results.read_text())
    cells = outcomes(results)
    num = len(results["tasks"])
    matrix = results["matrix"]
    point = _metrics(matrix)
    reps = replicates(cells, num, samples, seed)
    labels = _labels(layout)
    wall = Path(run_dir) / "wall_seconds.txt"
    return {
        "run": str(run_dir), "method": results["method"], "tasks": results["tasks"],
        "lr": _spec_value(layout, ("training", "lr")),
        "matrix": matrix, "point": point,
        "ci95": {m: interval(reps[m]) for m in METRICS},
        "cell_ci95": {f"{i},{j}": interval(v)
                      for (i, j), v in cell_replicates(cells, samples, seed).items()},
        "eval_examples": {results["tasks"][i]: len(v) for (i, _), v in cells.items()},
        "prediction_counts": prediction_counts(results, labels),
        "samples": samples, "seed": seed,
        "wall_seconds": float(wall.read_text()) if wall.is_file() else None,
        "_replicates": reps,
    }


def compare_runs(rows: Sequence[dict[str, Any]], reference: int = 0) -> list[dict | None]:
    """Each row's metric minus the reference row's, with paired 95% intervals.

    Rows must come from `run_table` with the same seed and sample count, on runs with
    the same evaluation examples; None for the reference itself and incomparable rows.
    """
    ref = rows[reference]
    out: list[dict | None] = []
    for k, row in enumerate(rows):
        same = (row["eval_examples"] == ref["eval_examples"] and row["seed"] == ref["seed"]
                and row["samples"] == ref["samples"])
        if k == reference or not same:
            out.append(None)
            continue
        diff = {}
        for m in METRICS:
            a, b = row["point"][m], ref["point"][m]
            diff[m] = {"delta": None if a is None or b is None else a - b,
                       "ci95": interval(row["_replicates"][m] - ref["_replicates"][m])}
        out.append(diff)
    return out


def seed_interval(
    runs: Sequence[dict[str, Any]], metric: str = "average_performance", samples: int = 1000,
    seed: int = 0, against: Sequence[dict[str, Any]] | None = None, read_out: str = "main",
) -> dict[str, Any]:
    """A metric over several seeds of one method, with seeds and examples resampled together.

    Each replicate b draws the seed runs with replacement (as many as there are) and,
    for every task, one resample of its evaluation examples (`cell_replicates`: the
    same indices at every stage and in every run, as all seeds score the same
    examples); the replicate's value is the mean of the drawn runs' metric on that
    example resample. The interval so covers both seed-to-seed and example noise.

    With `against` (the other method's seed runs, same seeds), the difference is
    paired: the same seed draw and example draw for both, and `paired` lists each
    seed's own difference. Seeds are paired by position (sort runs by seed first).

    Args:
        runs: results.json payloads of one method, one per seed, same tasks and
            evaluation examples.
        metric: One of `METRICS`.
        samples: Bootstrap replicates.
        seed: Seed of the resampling.
        against: Optional baseline method's runs: the result is then the difference.
        read_out: "main" or "raw" outcomes (`outcomes`).

    Returns:
        `{"per_seed": [value per run], "mean", "ci95", "paired": [per-seed difference]
        (with `against`), "seeds": count}`.

    Raises:
        ValueError: If `against` has another number of runs, or runs differ in examples.
    """
    if not runs:
        raise ValueError("seed_interval needs at least one run")
    if against is not None and len(against) != len(runs):
        raise ValueError(f"paired seeds need as many runs on each side, got {len(runs)} "
                         f"and {len(against)}")

    def per_run(group: Sequence[dict[str, Any]]) -> tuple[list, np.ndarray]:
        points, reps = [], []
        for res in group:
            cells = outcomes(res, read_out)
            points.append(_metrics(_read_matrix(res, read_out))[metric])
            reps.append(replicates(cells, len(res["tasks"]), samples, seed)[metric])
        return points, np.stack(reps)  # [S, samples]

    points, reps_SB = per_run(runs)
    paired = None
    if against is not None:
        base_points, base_SB = per_run(against)
        if reps_SB.shape != base_SB.shape:
            raise ValueError("the two methods' runs were evaluated on different examples")
        reps_SB = reps_SB - base_SB
        paired = [None if a is None or b is None else a - b
                  for a, b in zip(points, base_points)]
        points = paired
    num = len(runs)
    draws_BS = np.random.default_rng([seed, 1 << 20]).integers(0, num, size=(samples, num))
    values_B = reps_SB[draws_BS, np.arange(samples)[:, None]].mean(axis=1)
    known = [p for p in points if p is not None]
    out: dict[str, Any] = {"per_seed": points, "seeds": num,
                           "mean": sum(known) / len(known) if known else None,
                           "ci95": interval(values_B)}
    if paired is not None:
        out["paired"] = paired
    return out


def _read_matrix(results: dict[str, Any], read_out: str) -> list[list[float | None]]:
    """The score matrix of a read-out: `raw_matrix` for "raw" when the run has one."""
    if read_out == "raw" and results.get("raw_matrix") is not None:
        return results["raw_matrix"]
    return results["matrix"]


def bleu_replicates(hypotheses: Sequence[str], references: Sequence[str], samples: int,
                    seed: int) -> np.ndarray:
    """Corpus BLEU / 100 (sacrebleu, as `ncft.evaluate.text_scores`) over resampled sentences.

    Sentence indices come from `numpy.random.default_rng([seed, 0])`, so two systems
    scored on the same references share their resamples (paired differences).
    """
    import sacrebleu

    if len(hypotheses) != len(references) or not references:
        raise ValueError(f"need as many hypotheses as references (>0), got "
                         f"{len(hypotheses)} and {len(references)}")
    n = len(references)
    draws = np.random.default_rng([seed, 0]).integers(0, n, size=(samples, n))
    return np.asarray([sacrebleu.corpus_bleu([hypotheses[k] for k in idx],
                                             [[references[k] for k in idx]]).score / 100
                       for idx in draws])


def table_markdown(rows: Sequence[dict[str, Any]], reference: int = 0) -> str:
    """A Markdown table of `run_table` rows, with paired differences vs `reference`."""

    def fmt(value, ci) -> str:
        if value is None:
            return "-"
        return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f}"

    diffs = compare_runs(rows, reference)
    ref = rows[reference]["method"]
    lines = [f"| method | lr | AP | BWT | forgetting | just trained (diag.) | ΔAP vs {ref} | "
             "wall (min) |", "|---|---|---|---|---|---|---|---|"]
    for row, diff in zip(rows, diffs):
        p, ci = row["point"], row["ci95"]
        delta = "-" if diff is None else fmt(diff["average_performance"]["delta"],
                                             diff["average_performance"]["ci95"])
        wall = f"{row['wall_seconds'] / 60:.1f}" if row["wall_seconds"] else "-"
        lines.append(f"| {row['method']} | {row['lr']} | "
                     f"{fmt(p['average_performance'], ci['average_performance'])} | "
                     f"{fmt(p['backward_transfer'], ci['backward_transfer'])} | "
                     f"{fmt(p['average_forgetting'], ci['average_forgetting'])} | "
                     f"{fmt(p['diagonal_mean'], ci['diagonal_mean'])} | {delta} | {wall} |")
    return "\n".join(lines)


def _spec_value(layout: RunPaths, keys: tuple[str, ...]) -> Any:
    if not layout.spec.is_file():
        return None
    node: Any = yaml.safe_load(layout.spec.read_text())
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node


def _labels(layout: RunPaths) -> dict[str, list[str]]:
    """Each classification task's labels, from the resolved spec."""
    if not layout.spec.is_file():
        return {}
    spec = yaml.safe_load(layout.spec.read_text())
    return {t["name"]: t["labels"] for t in spec.get("tasks", []) if t.get("labels")}
