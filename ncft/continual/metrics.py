"""Continual-learning metrics over the accuracy matrix (pure functions, no torch).

`a[i][j]` is the score (in [0, 1], see `ncft.evaluate.task_score`) on task i after
training task j, for T tasks trained in order 0..T-1; None where not evaluated (e.g.
`per_task` runs evaluate only the diagonal). Indices below are 0-based.

- Average performance (CL, also AP): `mean_i a[i][T-1]`, the final model's mean score.
- Backward transfer (BWT, Lopez-Paz & Ranzato 2017): `mean_{i<T-1} a[i][T-1] - a[i][i]`;
  negative means forgetting.
- FG_j, Leng & Xiong (COLING 2025) eq. 5, `forgetting(matrix, reference)`:
  `FG_j = mean_{i<j} a[i][j] / A_i`, for j >= 1 (undefined for j = 0), where `A_i`
  is the score on task i after training task i ALONE: the diagonal of a `per_task`
  run (the reference). A retention ratio despite its name: 1 means the earlier tasks
  keep the single-task score, higher is better. Terms with `A_i == 0` or a missing
  entry are left out; FG_j is None when no term remains. Without a reference there
  is no FG: the results key `forgetting` is None.
- Retention against the run's own diagonal, `retention(matrix)`: the same ratio with
  `a[i][i]` (the score just after training task i in THIS sequence) in place of
  `A_i`. Not eq. 5: a sequence that trains task i badly retains easily. Results key
  `retention`.
- Average forgetting F_j (Chaudhry et al. 2018, "Riemannian Walk"; the usual CL
  forgetting), `average_forgetting`: `F_j = mean_{i<j} max_{i<=l<j} a[i][l] - a[i][j]`,
  the best score task i had after it was trained minus its score after stage j (0
  means nothing forgotten, LOWER is better). Missing entries are skipped; F_j is None
  when no term remains. The results key is `average_forgetting`.
- Forward transfer (FWT, Lopez-Paz & Ranzato 2017), optional: with `baseline[i]` the
  untrained model's score on task i, `mean_{i>=1} a[i][i-1] - baseline[i]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real

from ncft.continual.methods import METHODS

Matrix = Sequence[Sequence[float | None]]
FG_NOTE = ("Leng & Xiong eq. 5: FG_j = mean_{i<j} a[i][j] / A_i with A_i the per-task "
           "reference run's score, a retention ratio (1 = kept, higher is better)")
RETENTION_NOTE = ("retention against the run's own diagonal, mean_{i<j} a[i][j] / a[i][i] "
                  "(not FG: eq. 5 divides by a per-task reference run's score)")
AF_NOTE = ("average forgetting: mean_{i<j} max_{i<=l<j} a[i][l] - a[i][j] "
           "(0 = nothing forgotten, lower is better)")


def _check(matrix: Matrix) -> list[list[float | None]]:
    """A validated square copy of `matrix` with float or None entries."""
    rows = [list(r) for r in matrix]
    num = len(rows)
    if num == 0:
        raise ValueError("the accuracy matrix must have at least one task")
    for i, row in enumerate(rows):
        if len(row) != num:
            raise ValueError(f"the accuracy matrix must be {num}x{num}; row {i} has {len(row)}")
        for j, v in enumerate(row):
            if v is not None and (isinstance(v, bool) or not isinstance(v, Real) or v != v):
                raise ValueError(f"matrix[{i}][{j}] must be a number or None, got {v!r}")
            row[j] = None if v is None else float(v)
    return rows


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _required(a: list[list[float | None]], cells: Sequence[tuple[int, int]], what: str):
    missing = [(i, j) for i, j in cells if a[i][j] is None]
    if missing:
        raise ValueError(f"{what} needs matrix entries {missing} (task i after stage j)")


def average_performance(matrix: Matrix) -> float:
    """CL/AP: mean over tasks of the score after the last stage."""
    a = _check(matrix)
    last = len(a) - 1
    _required(a, [(i, last) for i in range(len(a))], "average_performance")
    return _mean([a[i][last] for i in range(len(a))])


def backward_transfer(matrix: Matrix) -> float | None:
    """BWT: mean change of each earlier task's score from its own stage to the last one.

    Returns:
        None for a single task (no earlier task).
    """
    a = _check(matrix)
    last = len(a) - 1
    if last == 0:
        return None
    _required(a, [c for i in range(last) for c in ((i, last), (i, i))], "backward_transfer")
    return _mean([a[i][last] - a[i][i] for i in range(last)])


def _ratios(a: list[list[float | None]], ref: Sequence[float | None]) -> list[float | None]:
    out: list[float | None] = [None]
    for j in range(1, len(a)):
        ratios = [a[i][j] / ref[i] for i in range(j)
                  if a[i][j] is not None and ref[i] is not None and ref[i] != 0]
        out.append(_mean(ratios) if ratios else None)
    return out


def forgetting(matrix: Matrix, reference: Sequence[float | None]) -> list[float | None]:
    """FG_j (eq. 5) for every stage j; entry 0 is always None.

    Args:
        matrix: The accuracy matrix.
        reference: `A_i`, each task's score after training it alone (a `per_task`
            run's diagonal, `reference_scores`).
    """
    a = _check(matrix)
    if len(reference) != len(a):
        raise ValueError(f"reference has {len(reference)} scores for {len(a)} tasks")
    return _ratios(a, reference)


def retention(matrix: Matrix) -> list[float | None]:
    """Retention against the run's own diagonal for every stage j (not FG; see above)."""
    a = _check(matrix)
    return _ratios(a, [a[i][i] for i in range(len(a))])


def reference_scores(reference: dict, tasks: Sequence[str]) -> list[float | None]:
    """`A_i` for `tasks` from a `per_task` run's results.json payload, matched by name.

    Raises:
        ValueError: If the run is not `per_task` or lacks one of `tasks`.
    """
    row = METHODS.get(reference.get("method", ""))
    if row is None or not row.from_base or row.trains != "all":  # not per-task FT
        raise ValueError(f"the FG reference must be a per_task run (A_i: each task trained "
                         f"alone), got method {reference.get('method')!r}")
    names = list(reference.get("tasks", []))
    missing = [t for t in tasks if t not in names]
    if missing:
        raise ValueError(f"the FG reference run has no task {missing}; it has {names}")
    return [reference["matrix"][names.index(t)][names.index(t)] for t in tasks]


def average_forgetting(matrix: Matrix) -> list[float | None]:
    """F_j for every stage j (see the module docstring); entry 0 is always None."""
    a = _check(matrix)
    out: list[float | None] = [None]
    for j in range(1, len(a)):
        drops = []
        for i in range(j):
            earlier = [a[i][k] for k in range(i, j) if a[i][k] is not None]
            if earlier and a[i][j] is not None:
                drops.append(max(earlier) - a[i][j])
        out.append(_mean(drops) if drops else None)
    return out


def forward_transfer(matrix: Matrix, baseline: Sequence[float]) -> float | None:
    """FWT: mean gain on task i from training tasks < i, over the untrained baseline.

    Args:
        matrix: The accuracy matrix.
        baseline: The untrained model's score on each task.

    Returns:
        None for a single task.
    """
    a = _check(matrix)
    if len(baseline) != len(a):
        raise ValueError(f"baseline has {len(baseline)} scores for {len(a)} tasks")
    if len(a) == 1:
        return None
    _required(a, [(i, i - 1) for i in range(1, len(a))], "forward_transfer")
    return _mean([a[i][i - 1] - float(baseline[i]) for i in range(1, len(a))])


def reference_read_outs(
    reference: dict, tasks: Sequence[str], protocol: dict | None = None
) -> dict[str, list[float | None]]:
    """A per_task run's `A_i` for each read-out it recorded: "raw" and "calibrated".

    "raw" is the uncalibrated score (its `raw_matrix` when it ran with calibration, its
    `matrix` otherwise); "calibrated" exists only for a calibrated reference. A run
    divides its scores by the reference of the same read-out, never by the other.

    Args:
        reference: The per_task run's results.json payload.
        tasks: Task names of the run FG is computed for.
        protocol: If given, `{"classification": ...}` the run used; a reference scored
            another way (rank vs generate) is refused.

    Raises:
        ValueError: See `reference_scores`, or a different classification protocol.
    """
    ref_protocol = reference.get("protocol") or {}
    want = (protocol or {}).get("classification")
    have = ref_protocol.get("classification", "rank")
    if want is not None and want != have:
        raise ValueError(f"the reference run scored classification by {have!r}, this run "
                         f"by {want!r}; FG must divide scores of one protocol")
    calibrated = ref_protocol.get("calibration", "none") != "none"
    out = {"raw": reference_scores({**reference, "matrix": reference.get("raw_matrix")
                                    if calibrated else reference["matrix"]}, tasks)}
    if calibrated:
        out["calibrated"] = reference_scores(reference, tasks)
    return out


def cl_summary(
    matrix: Matrix, task_names: Sequence[str], baseline: Sequence[float] | None = None,
    reference: Sequence[float | None] | None = None,
) -> dict:
    """All continual metrics, JSON-ready; a metric whose entries are missing is None.

    Args:
        matrix: `a[i][j]`, score on task i after training task j.
        task_names: Name of each task, in training order.
        baseline: Optional untrained scores per task (adds forward transfer).
        reference: Optional `A_i` per task (a `per_task` run's diagonal): adds FG.

    Returns:
        `{"tasks", "matrix", "average_performance", "backward_transfer",
        "forgetting": {"per_stage": {task: FG_j}, "final": FG_{T-1}, "note",
        "reference"} or None, "retention": {"per_stage", "final", "note"},
        "average_forgetting": {"per_stage": {task: F_j}, "final": F_{T-1}, "note"},
        "diagonal_mean", "forward_transfer"}`. `forgetting` is Leng & Xiong's FG
        (eq. 5, a retention ratio: higher = more retained), None without a
        reference; `retention` divides by the run's own diagonal instead;
        `average_forgetting` is the usual max-drop forgetting (lower = less
        forgotten). `diagonal_mean` is the mean just-trained score, the number
        `per_task` runs report.
    """
    a = _check(matrix)
    if len(task_names) != len(a) or len(set(task_names)) != len(task_names):
        raise ValueError(f"task_names must be {len(a)} distinct names, got {list(task_names)}")

    def lenient(fn, *args):
        try:
            return fn(*args)
        except ValueError:
            return None

    kept, af = retention(a), average_forgetting(a)
    fg = None
    if reference is not None:
        per_stage = forgetting(a, reference)
        fg = {"per_stage": dict(zip(task_names, per_stage)), "final": per_stage[-1],
              "note": FG_NOTE, "reference": [None if r is None else float(r)
                                            for r in reference]}
    diagonal = [a[i][i] for i in range(len(a)) if a[i][i] is not None]
    return {
        "tasks": list(task_names),
        "matrix": a,
        "average_performance": lenient(average_performance, a),
        "backward_transfer": lenient(backward_transfer, a),
        "forgetting": fg,
        "retention": {"per_stage": dict(zip(task_names, kept)), "final": kept[-1],
                      "note": RETENTION_NOTE},
        "average_forgetting": {"per_stage": dict(zip(task_names, af)), "final": af[-1],
                               "note": AF_NOTE},
        "diagonal_mean": _mean(diagonal) if diagonal else None,
        "forward_transfer": None if baseline is None else lenient(forward_transfer, a, baseline),
    }
