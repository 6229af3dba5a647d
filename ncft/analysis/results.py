"""Analyses of the score matrices in `RUN/results.json`: continual metrics, deactivation.

Keys read (docs/architecture.md §7; `None`/null marks a score that was not evaluated)::

    {"tasks": [name, ...],                       # T task names, training order
     "matrix": [[a_ij]],                          # T x T: score on task i after training task j
     "summary": {...},                            # runner's scalars, shown as given
     "deactivation": {                            # optional
         "tasks": [name, ...],                    # N tasks (need not equal "tasks")
         "baseline": [s_j],                       # score on task j, nothing switched off
         "task_neurons_off": [[s_ij]],            # N x N: task j with task i's neurons off
         "random_off": [[r_ij]]}}                 # optional, N x N: random set of |task i|

Continual metrics (AP, BWT, FG_j) are those of `ncft.continual.metrics`, the one
owner of their definitions: FG_j = mean_{i<j} a[i][j] / a[i][i] (retention after
stage j, None for j = 0); AP and BWT are None when an entry they need is missing.

Deactivation (Leng & Xiong Fig. 5): relative drop `d[i][j] = (b_j - s_ij) / b_j`, the
fraction of task j's baseline score lost when task i's neurons are off (0 = no effect,
1 = score fell to 0, negative = improved). `b_j == 0` makes the ratio undefined (None).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ncft.continual.metrics import cl_summary, forgetting, retention

Matrix = list[list[float | None]]


def check_matrix(value: Any, field: str, rows: int, cols: int | None = None) -> Matrix:
    """Validate a `rows x cols` list of lists of numbers or None; return float copies.

    Raises:
        ValueError: Naming `field` if the shape or an entry is wrong.

    """
    cols = rows if cols is None else cols
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != rows:
        raise ValueError(f"{field} must be a list of {rows} rows")
    out: Matrix = []
    for i, row in enumerate(value):
        if not isinstance(row, Sequence) or isinstance(row, str) or len(row) != cols:
            raise ValueError(f"{field}[{i}] must be a list of {cols} entries")
        out.append([_number(v, f"{field}[{i}][{j}]") for j, v in enumerate(row)])
    return out


def check_vector(value: Any, field: str, n: int) -> list[float | None]:
    """Validate a list of `n` numbers or None; return float copies."""
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != n:
        raise ValueError(f"{field} must be a list of {n} entries")
    return [_number(v, f"{field}[{i}]") for i, v in enumerate(value)]


def _number(v: Any, field: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        raise ValueError(f"{field} must be a number or null, got {v!r}")
    return float(v)


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def continual_metrics(results: dict[str, Any], matrix_key: str = "matrix") -> dict[str, Any]:
    """Continual metrics from `results["tasks"]` and `results[matrix_key]`.

    FG (eq. 5) needs `A_i`: the run's `summary.forgetting.reference` when it was given
    one (`eval.reference`), else FG is None and only `kept` (retention against the
    run's own diagonal) is there.

    Returns:
        `ncft.continual.metrics.cl_summary(...)` plus `"final"` (`a[i][T-1]` per task),
        `"fg"` (the FG_j list, entry 0 None; None without a reference) and `"kept"`
        (the retention list).

    Raises:
        ValueError: If `tasks` or `matrix` is missing or malformed.

    """
    tasks = results.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise ValueError("results.tasks must be a non-empty list of task names")
    n = len(tasks)
    a = check_matrix(results.get(matrix_key), f"results.{matrix_key}", n)
    fg = ((results.get("summary") or {}).get("forgetting") or {})
    reference = fg.get("reference") if isinstance(fg, dict) else None
    out = cl_summary(a, tasks, reference=reference)
    fg = None if reference is None else forgetting(a, reference)
    out.update(final=[a[i][n - 1] for i in range(n)], fg=fg, kept=retention(a))
    return out


def _drops(baseline: list[float | None], off: Matrix) -> Matrix:
    def drop(b: float | None, s: float | None) -> float | None:
        if b is None or s is None or b == 0.0:
            return None
        return (b - s) / b

    return [[drop(baseline[j], s) for j, s in enumerate(row)] for row in off]


def _diag_split(m: Matrix) -> tuple[float | None, float | None]:
    diag = [m[i][i] for i in range(len(m))]
    off = [v for i, row in enumerate(m) for j, v in enumerate(row) if i != j]
    return _mean(diag), _mean(off)


def deactivation_matrix(deact: dict[str, Any]) -> dict[str, Any]:
    """Relative-drop matrices and their diagonal/off-diagonal summary.

    Args:
        deact: `results["deactivation"]` as described in the module docstring.

    Returns:
        `{"tasks", "baseline", "drop": [[d_ij]], "random_drop": [[...]] | None,
        "summary": {"diag", "offdiag", "specificity", "random_diag", "random_offdiag",
        "random_mean"}}` where `specificity = diag - offdiag` (how much more a task's
        own neurons matter to it than to other tasks) and the random entries are
        None without `random_off`.

    Raises:
        ValueError: Naming the field if a key is missing or malformed.

    """
    if not isinstance(deact, dict):
        raise ValueError("results.deactivation must be an object")
    tasks = deact.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise ValueError("deactivation.tasks must be a non-empty list of task names")
    n = len(tasks)
    baseline = check_vector(deact.get("baseline"), "deactivation.baseline", n)
    drop = _drops(
        baseline, check_matrix(deact.get("task_neurons_off"), "deactivation.task_neurons_off", n)
    )
    random_drop = None
    if deact.get("random_off") is not None:
        random_drop = _drops(
            baseline, check_matrix(deact["random_off"], "deactivation.random_off", n)
        )
    diag, offdiag = _diag_split(drop)
    r_diag, r_off = _diag_split(random_drop) if random_drop is not None else (None, None)
    summary = {
        "diag": diag,
        "offdiag": offdiag,
        "specificity": None if diag is None or offdiag is None else diag - offdiag,
        "random_diag": r_diag,
        "random_offdiag": r_off,
        "random_mean": _mean([v for row in random_drop for v in row]) if random_drop else None,
    }
    return {
        "tasks": tasks,
        "baseline": baseline,
        "drop": drop,
        "random_drop": random_drop,
        "summary": summary,
    }


def finetune_summary(ft: dict[str, Any]) -> dict[str, Any]:
    """Leng & Xiong Fig. 5 right half: the change on task j after training task i's neurons.

    Args:
        ft: `results["deactivation"]["finetune_matrix"]`
            (`ncft.studies.finetune_matrix.finetune_matrix`).

    Returns:
        `{"tasks", "baseline", "change": [[row_ij - baseline_j]], "random_change",
        "summary": {"diag", "offdiag", "random_diag", "random_offdiag"}}`.

    Raises:
        ValueError: Naming the field if a key is missing or malformed.
    """
    if not isinstance(ft, dict):
        raise ValueError("results.deactivation.finetune_matrix must be an object")
    tasks = ft.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise ValueError("finetune_matrix.tasks must be a non-empty list of task names")
    n = len(tasks)
    base = check_vector(ft.get("baseline"), "finetune_matrix.baseline", n)

    def change(key: str) -> Matrix:
        m = check_matrix(ft.get(key), f"finetune_matrix.{key}", n)
        return [[None if v is None or b is None else v - b for v, b in zip(row, base)]
                for row in m]

    ch, rnd = change("task_neurons_trained"), change("random_trained")
    diag, off = _diag_split(ch)
    r_diag, r_off = _diag_split(rnd)
    return {"tasks": tasks, "baseline": base, "change": ch, "random_change": rnd,
            "summary": {"diag": diag, "offdiag": off, "random_diag": r_diag,
                        "random_offdiag": r_off}}
