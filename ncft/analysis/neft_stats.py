"""Weight-movement rank shift: OUR measure, not NeFT's §6.1 utilization.

NeFT's own utilization (max Pearson score of hidden states, Rank, ΔRank, strongly
affected / suppressed / indirectly affected) is `ncft.analysis.neft_utilization`.
This older measure ranks candidates by a per-candidate score of two conditions
(before/after training), higher = more, e.g. NeFT's selection score `1 - cos(w_org,
w_ft)` per row (§4.2, a measure of weight movement, not of utilization) or an
attribution score. Its category names are deliberately not the paper's. Candidates
come in groups (`ncft.selection.Scores`: group name -> 1-D tensor; a group is one
projection's rows or one MLP's units), and `selected` names the candidates that
were trained.

Definitions:

* rank: 0 for the highest score. Ties share their average rank, so rows whose score
  did not move (e.g. untrained rows that all score exactly 0) get no spurious shift
  from tie-breaking. With `scope="group"` rows are ranked within their group (scores
  of different layers need not share a scale); with `"global"` all rows together.
* normalized rank shift `dRank = (rank_before - rank_after) / (n - 1)`, in [-1, 1]:
  positive = the row moved toward the top.
* categories, a partition with one threshold `tau` (`shift_threshold`):
  - gained_trained: selected and dRank >= tau,
  - gained_untrained: NOT selected and dRank >= tau,
  - lost: dRank <= -tau (counted for selected and not),
  - stable: |dRank| < tau.

Output of `weight_movement_rank_shift` (JSON-ready; no per-row arrays, so it stays small)::

    {"scope", "shift_threshold", "num_rows", "num_selected", "groups": [...],
     "counts": {category: {"selected": n, "unselected": n}},
     "counts_per_group": {category: [n per group]},
     "mean_shift": {"selected": x, "unselected": x},
     "hist": {"edges": [...], "counts": {category: [...]}},
     "top_gained_untrained": [[group, index, dRank], ...]}      # largest dRank, unselected
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ncft.neuron_set import NeuronSet

CATEGORIES = ("gained_trained", "gained_untrained", "lost", "stable")
SCOPES = ("group", "global")


def ranks(scores: Any) -> np.ndarray:
    """0-based ranks, 0 = highest score, ties averaged."""
    x = np.asarray(torch.as_tensor(scores, dtype=torch.float64).flatten())
    if np.isnan(x).any():
        raise ValueError("scores must not contain NaN")
    # scipy.stats takes ~0.7 s to import; every rank of `ncft run` imports this module.
    from scipy.stats import rankdata

    return rankdata(-x, method="average") - 1.0


def rank_shift(before: Any, after: Any) -> np.ndarray:
    """Normalized rank shift `(rank_before - rank_after) / (n - 1)` per candidate.

    Args:
        before: 1-D scores of the first condition.
        after: 1-D scores of the second condition, same length.

    Returns:
        float64 array in [-1, 1]; positive = moved toward the top. Zeros if n == 1.

    """
    rb, ra = ranks(before), ranks(after)
    if rb.shape != ra.shape:
        raise ValueError(f"before has {rb.size} scores but after has {ra.size}")
    return (rb - ra) / max(rb.size - 1, 1)


def categorize(shift: np.ndarray, selected: np.ndarray, tau: float) -> np.ndarray:
    """Category index (into `CATEGORIES`) per candidate; see the module docstring."""
    cat = np.full(shift.shape, CATEGORIES.index("stable"))
    up = shift >= tau
    cat[up & selected] = CATEGORIES.index("gained_trained")
    cat[up & ~selected] = CATEGORIES.index("gained_untrained")
    cat[shift <= -tau] = CATEGORIES.index("lost")
    return cat


def _mask(n: int, idx: Any, field: str) -> np.ndarray:
    m = np.zeros(n, dtype=bool)
    idx = np.asarray(torch.as_tensor(idx, dtype=torch.int64).flatten())
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"{field} has indices outside [0, {n})")
    m[idx] = True
    return m


def weight_movement_rank_shift(
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    selected: Mapping[str, Any],
    shift_threshold: float = 0.1,
    scope: str = "group",
    bins: int = 40,
    top: int = 20,
) -> dict[str, Any]:
    """Rank shift and category counts of every candidate between two conditions.

    Args:
        before: `group -> 1-D scores` of the first condition.
        after: `group -> 1-D scores` of the second condition (same groups and sizes).
        selected: `group -> indices of trained candidates`; missing groups = none.
        shift_threshold: `tau` of the categories, in (0, 1].
        scope: "group" (rank within each group) or "global" (rank all rows together).
        bins: Histogram bins over [-1, 1].
        top: How many of the most indirectly-affected rows to list.

    Returns:
        The JSON-ready dict described in the module docstring.

    Raises:
        ValueError: Naming the argument for mismatched groups, sizes or thresholds.

    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if not 0.0 < shift_threshold <= 1.0:
        raise ValueError(f"shift_threshold must be in (0, 1], got {shift_threshold}")
    groups = list(before)
    if not groups or set(groups) != set(after):
        raise ValueError(f"before and after must name the same groups: {groups} vs {list(after)}")
    if extra := set(selected) - set(groups):
        raise ValueError(f"selected names groups not in before/after: {sorted(extra)}")
    b = [np.asarray(torch.as_tensor(before[g], dtype=torch.float64).flatten()) for g in groups]
    a = [np.asarray(torch.as_tensor(after[g], dtype=torch.float64).flatten()) for g in groups]
    for g, x, y in zip(groups, b, a):
        if x.shape != y.shape:
            raise ValueError(f"group {g!r}: before has {x.size} scores, after has {y.size}")
    sel = [_mask(x.size, selected.get(g, []), f"selected[{g!r}]") for g, x in zip(groups, b)]
    if scope == "group":
        shifts = [rank_shift(x, y) for x, y in zip(b, a)]
    else:
        flat = rank_shift(np.concatenate(b), np.concatenate(a))
        shifts = np.split(flat, np.cumsum([x.size for x in b])[:-1])
    cats = [categorize(s, m, shift_threshold) for s, m in zip(shifts, sel)]
    return _summarize(groups, shifts, sel, cats, shift_threshold, scope, bins, top)


def _summarize(groups, shifts, sel, cats, tau, scope, bins, top) -> dict[str, Any]:
    shift, s, cat = np.concatenate(shifts), np.concatenate(sel), np.concatenate(cats)
    edges = np.linspace(-1.0, 1.0, bins + 1)
    counts, hist, per_group = {}, {}, {}
    for k, name in enumerate(CATEGORIES):
        in_cat = cat == k
        counts[name] = {"selected": int((in_cat & s).sum()), "unselected": int((in_cat & ~s).sum())}
        hist[name] = np.histogram(shift[in_cat], bins=edges)[0].tolist()
        per_group[name] = [int((c == k).sum()) for c in cats]
    owner = np.concatenate([np.full(x.size, i) for i, x in enumerate(shifts)])
    index = np.concatenate([np.arange(x.size) for x in shifts])
    cand = np.flatnonzero(~s)
    # Stable sort on -shift keeps ties in group/index order, so the list is reproducible.
    order = cand[np.argsort(-shift[cand], kind="stable")][:top]
    return {
        "scope": scope,
        "shift_threshold": tau,
        "num_rows": int(shift.size),
        "num_selected": int(s.sum()),
        "groups": list(groups),
        "counts": counts,
        "counts_per_group": per_group,
        "mean_shift": {
            "selected": float(shift[s].mean()) if s.any() else None,
            "unselected": float(shift[~s].mean()) if (~s).any() else None,
        },
        "hist": {"edges": edges.tolist(), "counts": hist},
        "top_gained_untrained": [
            [groups[int(owner[i])], int(index[i]), float(shift[i])]
            for i in order
            if shift[i] >= tau
        ],
    }


def selected_from_set(neuron_set: NeuronSet, groups: Sequence[Any]) -> dict[str, torch.Tensor]:
    """`group name -> selected candidate indices`, read from a NeuronSet.

    Args:
        neuron_set: The trained set.
        groups: `ncft.selection.Group`-like objects (`name`, `pieces`); a candidate is
            selected if the set selects it in the group's first piece.

    """
    out = {}
    for g in groups:
        fqn, axis = g.pieces[0]
        entry = neuron_set.entries.get(fqn)
        if entry is not None:
            if entry.axis != axis:
                raise ValueError(
                    f"neuron_set entry {fqn!r} has axis {entry.axis}, group wants {axis}"
                )
            out[g.name] = entry.indices.clone()
    return out
