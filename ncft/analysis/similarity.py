"""Per-layer cosine similarity of task-specific neuron parameters (Leng & Xiong Fig. 3).

A neuron unit `u` of layer `l` owns a parameter vector `w_u`: the concatenation of
its slice of every MLP projection along that projection's unit axis (gate and up
rows, down column for gated MLPs; fc_in row and fc_out column otherwise) and its
input-side bias elements (see `ncft.arch`). Task `t` selects units `U_t^l`.

Two definitions of the similarity of tasks `a` and `b` in layer `l`:

* `"mean"` (default): `cos(mean_{u in U_a} w_u, mean_{u in U_b} w_u)`, the cosine of
  the tasks' mean neuron vectors. It is independent of unit order and of set size,
  and is informative even when the sets are disjoint: it asks whether the two tasks
  recruit neurons that point the same way. Identical sets give 1.
* `"masked"`: the cosine of the layer's parameters with every unit outside the task's
  set zeroed, `sum_{u in U_a & U_b} |w_u|^2 / sqrt(sum_{U_a} |w_u|^2 sum_{U_b} |w_u|^2)`.
  On one model this is a norm-weighted overlap (disjoint sets give 0), i.e. close
  to the IoU of `ncft.analysis.overlap`; it is offered for comparison.

We do not compare the sets' concatenations after sorting by unit score: that pairs
unrelated units by rank, and the value changes with any reordering of ties.
A layer where either task has no unit gives None.

Parameters come from `get_param(fqn) -> Tensor`, the FULL tensor in storage layout,
called once per parameter (so a caller on a sharded engine can gather one parameter
at a time, docs/architecture.md §2, rule 2). Which model's weights to pass (base model, or after
training) is the caller's choice; record it with the result.

Output of `layer_similarity` (JSON-ready)::

    {"tasks": [...], "layers": [...], "method": "mean" | "masked",
     "per_layer": [[[cos for each layer] for task j] for task i],
     "mean": [[mean over layers with a value]]}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ncft.analysis.results import check_matrix
from ncft.arch import MlpBlock

METHODS = ("mean", "masked")
GetParam = Callable[[str], torch.Tensor]


def _pieces(block: MlpBlock) -> list[tuple[str, int]]:
    """`(fqn, unit axis)` of every tensor a unit of `block` owns a slice of."""
    out = []
    for p in block.projections:
        out.append((p.weight_fqn, p.unit_axis))
        if p.bias_fqn is not None and p.role in ("gate", "up", "fc_in"):
            out.append((p.bias_fqn, 0))
    return out


def _as_units(idx: Any, d_ff: int, field: str) -> torch.Tensor:
    idx = torch.as_tensor(idx).to(torch.int64).flatten().unique()
    if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= d_ff):
        raise ValueError(f"{field} has unit indices outside [0, {d_ff})")
    return idx


def _layer_cosines(
    block: MlpBlock, units: list[torch.Tensor], get_param: GetParam, method: str
) -> list[list[float | None]]:
    n = len(units)
    means: list[list[torch.Tensor]] = [[] for _ in range(n)]
    sq_norm = torch.zeros(block.d_ff, dtype=torch.float64)
    for fqn, axis in _pieces(block):
        w = get_param(fqn).detach()
        if w.shape[axis] != block.d_ff:
            raise ValueError(
                f"get_param({fqn!r}) has shape {tuple(w.shape)}; expected {block.d_ff} "
                f"units along axis {axis} (pass the full, unsharded tensor)"
            )
        w = w.to("cpu", torch.float64)
        if w.dim() == 1:
            w = w.unsqueeze(1 - axis)
        if method == "masked":
            sq_norm += (w * w).sum(dim=1 - axis)
            continue
        for t, idx in enumerate(units):
            if idx.numel():
                means[t].append(w.index_select(axis, idx).mean(dim=axis))
    if method == "mean":
        vecs = [torch.cat(m) if m else None for m in means]
        return [[_cos(vecs[a], vecs[b]) for b in range(n)] for a in range(n)]
    return [[_masked_cos(sq_norm, units[a], units[b]) for b in range(n)] for a in range(n)]


def _cos(x: torch.Tensor | None, y: torch.Tensor | None) -> float | None:
    if x is None or y is None:
        return None
    denom = float(x.norm() * y.norm())
    return None if denom == 0.0 else float(x @ y) / denom


def _masked_cos(sq_norm: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float | None:
    if not a.numel() or not b.numel():
        return None
    denom = math.sqrt(float(sq_norm[a].sum()) * float(sq_norm[b].sum()))
    shared = a[torch.isin(a, b)]
    return None if denom == 0.0 else float(sq_norm[shared].sum()) / denom


def layer_similarity(
    blocks: Sequence[MlpBlock],
    units_by_task: Mapping[str, Mapping[int, Any]],
    get_param: GetParam,
    method: str = "mean",
) -> dict[str, Any]:
    """Per-layer cosine similarity of every pair of tasks' neuron parameters.

    Args:
        blocks: MLP blocks (`ArchAdapter.mlp_blocks`), one per layer.
        units_by_task: `task -> {layer: unit indices}` (e.g. `NeuronSet.units(blocks)`).
        get_param: Returns the full tensor of a parameter name; called once per
            parameter of every block.
        method: "mean" or "masked" (module docstring).

    Returns:
        The JSON-ready dict described in the module docstring.

    Raises:
        ValueError: For an unknown `method`, no tasks, or out-of-range units.

    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not units_by_task:
        raise ValueError("units_by_task must name at least one task")
    tasks = list(units_by_task)
    n = len(tasks)
    per_layer: list[list[list[float | None]]] = [[[] for _ in tasks] for _ in tasks]
    for block in blocks:
        units = [
            _as_units(units_by_task[t].get(block.layer, []), block.d_ff, f"units[{t!r}]")
            for t in tasks
        ]
        cos = _layer_cosines(block, units, get_param, method)
        for a in range(n):
            for b in range(n):
                per_layer[a][b].append(cos[a][b])
    mean = [[_mean(per_layer[a][b]) for b in range(n)] for a in range(n)]
    return {
        "tasks": tasks,
        "layers": [b.layer for b in blocks],
        "method": method,
        "per_layer": per_layer,
        "mean": mean,
    }


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def correlation(
    similarity: Any, generalization: Any, exclude_diagonal: bool = True,
    column: int | None = None,
) -> dict[str, Any]:
    """Pearson and Spearman correlation between pairwise similarity and generalization.

    Args:
        similarity: Square matrix `s[i][j]` (e.g. `layer_similarity(...)["mean"]` or one
            layer's values); None entries are skipped.
        generalization: Square matrix of the same size and the SAME indexing, e.g. the
            score on task j of a model trained on task i paired with `s[i][j]`.
        exclude_diagonal: Drop `i == j` pairs (a task with itself says nothing about
            transfer).
        column: Only the pairs of test task `j = column` (across the models i):
            Leng & Xiong's Table 4 correlates per test task (`correlation_per_task`);
            None pools every pair.

    Returns:
        `{"n", "pairs": [[i, j]], "x", "y", "pearson": {"r", "p"}, "spearman": {"r", "p"}}`;
        `r` and `p` are None when fewer than 3 pairs remain or either side is constant.

    Raises:
        ValueError: If the matrices are not square of equal size.

    """
    if not isinstance(similarity, Sequence) or not similarity:
        raise ValueError("similarity must be a non-empty square matrix")
    n = len(similarity)
    s = check_matrix(similarity, "similarity", n)
    g = check_matrix(generalization, "generalization", n)
    pairs, x, y = [], [], []
    for i in range(n):
        for j in range(n):
            if (exclude_diagonal and i == j) or s[i][j] is None or g[i][j] is None:
                continue
            if column is not None and j != column:
                continue
            pairs.append([i, j])
            x.append(s[i][j])
            y.append(g[i][j])
    out: dict[str, Any] = {"n": len(x), "pairs": pairs, "x": x, "y": y}
    # Too few points or a constant side makes r undefined; report None, not NaN.
    ok = len(x) >= 3 and len(set(x)) > 1 and len(set(y)) > 1
    from scipy import stats  # lazily: ~0.7 s to import, and every rank imports this module

    for name, fn in (("pearson", stats.pearsonr), ("spearman", stats.spearmanr)):
        if ok:
            res = fn(x, y)
            out[name] = {"r": float(res.statistic), "p": float(res.pvalue)}
        else:
            out[name] = {"r": None, "p": None}
    return out


def correlation_per_task(similarity: Any, generalization: Any) -> list[dict[str, Any]]:
    """Leng & Xiong's Table 4: one correlation per test task j, over the models i != j.

    Table 4 reports, per test task T_j, Pearson r between the similarity of the
    training task's and T_j's neurons inside each M_i and M_i's score on T_j. Each
    entry is `correlation(similarity, generalization, column=j)`; r is None with fewer
    than 3 models (fewer than 4 tasks here, where the tasks play both roles).
    """
    n = len(similarity)
    return [correlation(similarity, generalization, column=j) for j in range(n)]
