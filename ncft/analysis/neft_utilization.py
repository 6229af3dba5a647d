"""NeFT §6.1 "Utilization of Neurons": max Pearson score, Rank, ΔRank and categories.

The paper (Xu et al. 2025, §6.1, "Metric"):

    "During inference process, we retained the hidden states for each layer and
    calculated the Pearson correlation coefficient for each neuron, recording the
    highest value per neuron. We then ordered the neurons by their maximum Pearson
    score in descending order, denoting the ranking of neurons as Rank. To discern
    the contrast in neuron utilization between models, we compute the rank disparity
    for each neuron across the two models, represented as ΔRank. We then determined
    the mean of the absolute values of these rank differences, Avg(ΔRank) [...]"

and Fig. 3's caption: "The ranks were sorted based on their pairwise Pearson scores in
descending order". Open points, and what we chose:

* What is correlated with what. The paper does not say; "pairwise" and "highest value
  per neuron" say a neuron is correlated with other neurons and its maximum kept. We
  correlate, inside ONE model, a neuron's hidden state with that of every other
  neuron of the same group (one projection's output rows, NeFT's neuron, §4.2; or
  one MLP's FFN units), over the evaluated tokens, and keep the maximum (signed, the
  neuron itself excluded). Per-model scores are what make "Rank" a property of one
  model and ΔRank a comparison of two, as §6.1 describes. We do not pair across the
  whole layer: a layer's every projection together would need a Gram matrix of
  ~42k x 42k per layer at 7B.
* A neuron's hidden state: the output element of its row at each token (rows), or
  the unit's activation entering the down projection (FFN units).
* Tokens: every non-padding position of the evaluated examples (prompt and answer,
  teacher forced): "during inference process".
* A neuron whose activation is constant has no Pearson correlation; it scores -1,
  the lowest possible value, so it ranks last (ties share their average rank).
* Rank: 1 = highest score, over ALL neurons of the model together (the paper's
  threshold of 100,000 ranks and its percentiles "of the overall Pearson scores"
  are global). ΔRank = Rank(second model) - Rank(first model): positive = the neuron
  moved down the ordering.
* Buckets (Fig. 3): by the first model's Rank percentile, "top percentiles of the
  overall Pearson scores"; Fig. 3's exact edges are not given, its text names the
  top 0-0.03% bucket, so we use `BUCKET_EDGES_PCT`.
* Categories (§6.1 "Category of Neurons"): strongly affected = |ΔRank| exceeds the
  threshold, 100,000 at 7B. We scale it by the number of ranked neurons: threshold
  = `STRONG_FRACTION` x N, where `STRONG_FRACTION` = 100,000 / 1,359,872, the number
  of weight rows of Llama-2-7b's linear projections (32 layers x (4 x 4096 q/k/v/o +
  2 x 11008 gate/up + 4096 down)). Suppressed = strongly affected AND decreased in
  rank (ΔRank > 0); indirectly affected = strongly affected AND not trained. Both are
  subsets of strongly affected and may overlap.

`ncft.analysis.neft_stats` keeps the older, different measure (rank shift of weight
movement `1 - cos`), under the name `weight_movement_rank_shift`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

LLAMA2_7B_ROWS = 32 * (4 * 4096 + 2 * 11008 + 4096)  # 1,359,872
STRONG_THRESHOLD_7B = 100_000
STRONG_FRACTION = STRONG_THRESHOLD_7B / LLAMA2_7B_ROWS
BUCKET_EDGES_PCT = (0.0, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
DEFINITION = ("NeFT §6.1: per neuron, the max Pearson correlation of its hidden state with "
              "another neuron of its group (same model, evaluated tokens); Rank over all "
              "neurons, 1 = highest; dRank = Rank(after) - Rank(before)")


def max_pearson(count: float, total: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Each neuron's highest Pearson correlation with another neuron, from moments.

    Args:
        count: Number of observations (tokens).
        total: `[d]` sum of each neuron's values.
        gram: `[d, d]` sum over observations of `x x^T`.

    Returns:
        float64 `[d]`; -1 for a neuron with constant value (or when d == 1).
    """
    total, gram = total.double(), gram.double()
    mean = total / count
    cov = gram / count - torch.outer(mean, mean)
    std = torch.diagonal(cov).clamp(min=0).sqrt()
    corr = cov / torch.outer(std, std)
    corr.fill_diagonal_(float("-inf"))
    corr = torch.where(torch.isfinite(corr), corr.clamp(-1.0, 1.0), float("-inf"))
    best = corr.max(dim=1).values if corr.shape[0] > 1 else torch.full_like(mean, -1.0)
    return torch.where(torch.isfinite(best), best, torch.full_like(best, -1.0))


def global_ranks(scores: Mapping[str, Any], names: Sequence[str]) -> np.ndarray:
    """1-based ranks of all neurons of `names` together, 1 = highest, ties averaged."""
    x = np.concatenate([np.asarray(torch.as_tensor(scores[n], dtype=torch.float64).flatten())
                        for n in names])
    if np.isnan(x).any():
        raise ValueError("Pearson scores must not contain NaN")
    # scipy.stats takes ~0.7 s to import; every rank of `ncft run` imports this module.
    from scipy.stats import rankdata

    return rankdata(-x, method="average")


def _trained_mask(names: Sequence[str], sizes: Sequence[int],
                  selected: Mapping[str, Any]) -> np.ndarray:
    masks = []
    for name, size in zip(names, sizes):
        m = np.zeros(size, dtype=bool)
        idx = np.asarray(torch.as_tensor(selected.get(name, []), dtype=torch.int64).flatten())
        if idx.size and (idx.min() < 0 or idx.max() >= size):
            raise ValueError(f"selected[{name!r}] has indices outside [0, {size})")
        m[idx] = True
        masks.append(m)
    return np.concatenate(masks)


def utilization_shift(
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    selected: Mapping[str, Any],
    strong_fraction: float = STRONG_FRACTION,
    edges_pct: Sequence[float] = BUCKET_EDGES_PCT,
) -> dict[str, Any]:
    """NeFT's ΔRank between two models, per-bucket Avg(|ΔRank|) and the categories.

    Args:
        before: `group -> [size]` max Pearson scores of the first model.
        after: The same for the second model (same groups and sizes).
        selected: `group -> indices` of the neurons that were trained.
        strong_fraction: |ΔRank| threshold of "strongly affected" as a fraction of
            the number of neurons (module docstring: the paper's 100,000 at 7B).
        edges_pct: Bucket edges, percentiles of the first model's Rank.

    Returns:
        JSON-ready: `num_neurons`, `avg_abs_delta_rank` (and `_normalized`, / N),
        `strong_threshold` (in ranks), `counts` (strongly_affected, suppressed,
        indirectly_affected, trained), `buckets` ({edges_pct, avg_abs_delta_rank,
        count}) and `per_group` (`names`, Avg(|ΔRank|) and the three category counts).
    """
    names = list(before)
    if not names or set(names) != set(after):
        raise ValueError(f"before and after must name the same groups: {names} vs {list(after)}")
    if extra := set(selected) - set(names):
        raise ValueError(f"selected names groups not in before/after: {sorted(extra)}")
    sizes = [int(torch.as_tensor(before[n]).numel()) for n in names]
    if sizes != [int(torch.as_tensor(after[n]).numel()) for n in names]:
        raise ValueError("before and after must have the same number of neurons per group")
    if not 0 < strong_fraction <= 1:
        raise ValueError(f"strong_fraction must be in (0, 1], got {strong_fraction}")
    r_before, r_after = global_ranks(before, names), global_ranks(after, names)
    delta = r_after - r_before
    n = delta.size
    threshold = strong_fraction * n
    strong = np.abs(delta) > threshold
    trained = _trained_mask(names, sizes, selected)
    pct = (r_before - 1) / n * 100.0
    edges = list(edges_pct)
    b_avg, b_count = [], []
    for k, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        inside = (pct >= lo) & ((pct < hi) if k < len(edges) - 2 else (pct <= hi))
        b_count.append(int(inside.sum()))
        b_avg.append(float(np.abs(delta[inside]).mean()) if inside.any() else None)
    bounds = np.cumsum([0, *sizes])
    return {
        "definition": DEFINITION,
        "num_neurons": int(n),
        "avg_abs_delta_rank": float(np.abs(delta).mean()),
        "avg_abs_delta_rank_normalized": float(np.abs(delta).mean() / n),
        "strong_fraction": strong_fraction,
        "strong_threshold": threshold,
        "counts": {
            "strongly_affected": int(strong.sum()),
            "suppressed": int((strong & (delta > 0)).sum()),
            "indirectly_affected": int((strong & ~trained).sum()),
            "trained": int(trained.sum()),
        },
        "buckets": {"edges_pct": edges, "avg_abs_delta_rank": b_avg, "count": b_count},
        "per_group": {
            "names": names,
            "avg_abs_delta_rank": [float(np.abs(delta[a:b]).mean()) if b > a else None
                                   for a, b in zip(bounds[:-1], bounds[1:])],
            **{name: [int(m[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])]
               for name, m in (("strongly_affected", strong),
                               ("suppressed", strong & (delta > 0)),
                               ("indirectly_affected", strong & ~trained))},
        },
    }


__all__ = ["BUCKET_EDGES_PCT", "STRONG_FRACTION", "global_ranks", "max_pearson",
           "utilization_shift"]
