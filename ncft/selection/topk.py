"""From per-candidate scores to a NeuronSet: top-k, reversed, union, rank agreement.

Pure functions of the scores (no scorer, no task data): `ncft.selection.pipeline`
runs a scorer and hands its scores here.

The candidates and their scores (`Group`, `Scores`) are the scorers' own
(`ncft.scoring.groups`).

Selection is a pure function of the scores: ties are broken by candidate order
(group order, then index ascending) via a stable sort, so equal scores on every
rank give the same set everywhere. `check_identical_across_ranks` proves it at run
time by comparing the set's checksum over the process group.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ncft.engine import Engine, device_of
from ncft.neuron_set import NeuronSet, Selection
from ncft.scoring.groups import Group


def resolve_count(size: int, fraction: float | None, count: int | None) -> int:
    """How many of `size` candidates to take: `count`, or `round(fraction * size)`.

    A positive fraction always takes at least one candidate; the result never
    exceeds `size`. Rounding is half-up, so it is the same on every platform.
    """
    if (fraction is None) == (count is None):
        raise ValueError("give exactly one of fraction or count")
    if count is not None:
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        return min(count, size)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return min(size, max(1, math.floor(fraction * size + 0.5)))


def _order(scores: torch.Tensor, reverse: bool) -> torch.Tensor:
    """Candidate order: score descending (ascending if `reverse`), ties by index."""
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN; cannot rank")
    return torch.sort(scores, descending=not reverse, stable=True).indices


def _check_scores(scores: Mapping[str, torch.Tensor], groups: Sequence[Group]) -> None:
    for g in groups:
        s = scores.get(g.name)
        if s is None or s.shape != (g.size,):
            got = None if s is None else tuple(s.shape)
            raise ValueError(f"scores[{g.name!r}] must have shape ({g.size},), got {got}")


def _pick_per_pool(
    scores: Mapping[str, torch.Tensor],
    groups: Sequence[Group],
    per_layer: bool,
    pick: Callable[[torch.Tensor], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Run `pick` on each pool's scores; split its sorted flat indices into the groups.

    A pool is one layer's groups with `per_layer`, else all groups; `pick` gets the
    pool's float64 scores on CPU, its groups' concatenated in group order.
    """
    pools: dict[Any, list[Group]] = {}
    for g in groups:
        pools.setdefault(g.layer if per_layer else None, []).append(g)
    selected = {g.name: torch.zeros(0, dtype=torch.long) for g in groups}
    for pool in pools.values():
        chosen = pick(torch.cat([scores[g.name].double().cpu() for g in pool]))
        offset = 0
        for g in pool:
            inside = chosen[(chosen >= offset) & (chosen < offset + g.size)]
            selected[g.name] = inside - offset
            offset += g.size
    return selected


def top_k(
    scores: Mapping[str, torch.Tensor],
    groups: Sequence[Group],
    fraction: float | None = None,
    count: int | None = None,
    per_layer: bool = True,
    reverse: bool = False,
) -> dict[str, torch.Tensor]:
    """Pick the highest-scoring candidates, per layer or over all groups.

    Args:
        scores: `group name -> [size]` scores, higher = selected first.
        groups: The candidate groups, in model order (this order breaks ties).
        fraction: Fraction of candidates to take (of each layer, or of all).
        count: Number to take instead (per layer, or in all).
        per_layer: Take `fraction`/`count` within each layer, pooling that layer's
            groups; else one global ranking.
        reverse: Take the LOWEST scores instead (NeFT's "reversed" control).

    Returns:
        `group name -> sorted int64 indices` (every group present, maybe empty).
    """
    _check_scores(scores, groups)

    def pick(flat: torch.Tensor) -> torch.Tensor:
        k = resolve_count(flat.numel(), fraction, count)
        return torch.sort(_order(flat, reverse)[:k]).values

    return _pick_per_pool(scores, groups, per_layer, pick)


def top_and_bottom(
    scores: Mapping[str, torch.Tensor],
    groups: Sequence[Group],
    fraction: float | None,
    count: int | None,
    reversed_fraction: float,
    per_layer: bool = True,
) -> dict[str, torch.Tensor]:
    """NeFT's `NeFT_x%+Reversed_y%` (§6.2): the x% highest plus the y% lowest scores.

    With NeFT's score `1 - cos(w_org, w_ft)` (higher = moved more, `WeightCosine`),
    the top `fraction`/`count` are NeFT_x% (the lowest cosine similarity, §4.2) and
    the bottom `reversed_fraction` are Reversed_y%, "neurons with high similarity
    scores" (§6.2). The paper states x and y as percentages of the model's parameters
    (`top_by_parameters`, `selection.fraction_of: parameters`); here both are fractions
    of the candidates of each pool (each layer with `per_layer`, else all). The
    Reversed part is taken from the candidates NeFT_x% left, so the two never overlap
    (x% + y% in all, capped at the pool); ties are broken as in `top_k` (ascending
    score, then index).

    Returns:
        `group name -> sorted int64 indices` (every group present, maybe empty).
    """
    _check_scores(scores, groups)
    if not 0 < reversed_fraction <= 1:
        raise ValueError(f"reversed_fraction must be in (0, 1], got {reversed_fraction}")

    def pick(flat: torch.Tensor) -> torch.Tensor:
        n = flat.numel()
        top = _order(flat, False)[: resolve_count(n, fraction, count)]
        taken = torch.zeros(n, dtype=torch.bool)
        taken[top] = True
        rest = _order(flat, True)
        rest = rest[~taken[rest]]
        bottom = rest[: min(resolve_count(n, reversed_fraction, None), rest.numel())]
        return torch.sort(torch.cat([top, bottom])).values

    return _pick_per_pool(scores, groups, per_layer, pick)


def candidate_parameters(
    groups: Sequence[Group], shapes: Mapping[str, Sequence[int]]
) -> dict[str, int]:
    """Parameters one candidate of each group owns: `group name -> elements`.

    A candidate owns index i along `axis` of each of its group's pieces, so a piece
    contributes `numel / shape[axis]` elements (a row of a [out, in] matrix: `in`).
    """
    out = {}
    for g in groups:
        total = 0
        for fqn, axis in g.pieces:
            shape = tuple(shapes[fqn])
            total += math.prod(shape) // shape[axis]
        out[g.name] = total
    return out


def _within(order: torch.Tensor, sizes: torch.Tensor, budget: int) -> torch.Tensor:
    """The longest prefix of `order` whose candidates own at most `budget` parameters.

    At least one candidate: a positive fraction always selects something.
    """
    fits = int((sizes[order].cumsum(0) <= budget).sum())
    return order[: max(1, fits)]


def top_by_parameters(
    scores: Mapping[str, torch.Tensor],
    groups: Sequence[Group],
    fraction: float,
    sizes: Mapping[str, int],
    model_parameters: int,
    reverse: bool = False,
    reversed_fraction: float | None = None,
) -> dict[str, torch.Tensor]:
    """NeFT's NeFT_x% as the paper counts it: x% of the MODEL's parameters.

    All candidates are ranked together (no per-layer pools) and taken in score order
    while the parameters they own stay within `fraction * model_parameters`
    (NeFT §5: "when a certain percentage x% of the model parameters were trained, we
    denoted this as NeFT_x%"; e.g. NeFT_3% trains 204.8M of Llama-2-7b's 6.7B). With
    `reversed_fraction` (NeFT_x%+Reversed_y%), the lowest-scoring of the remaining
    candidates are added up to `reversed_fraction * model_parameters` more. `top_k`'s
    `fraction` is instead a fraction of the candidates (of each layer with per_layer).

    Args:
        scores: `group name -> [size]` scores, higher = selected first.
        groups: The candidate groups, in model order (this order breaks ties).
        fraction: x, a fraction of `model_parameters` in (0, 1].
        sizes: Parameters one candidate of each group owns (`candidate_parameters`).
        model_parameters: The model's parameter count.
        reverse: Take the LOWEST scores instead (NeFT's "reversed" control).
        reversed_fraction: y of NeFT_x%+Reversed_y%, or None.

    Returns:
        `group name -> sorted int64 indices` (every group present, maybe empty).
    """
    _check_scores(scores, groups)
    for name, value in (("fraction", fraction), ("reversed_fraction", reversed_fraction)):
        if value is not None and not 0 < value <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {value}")
    flat_sizes = torch.cat([torch.full((g.size,), sizes[g.name], dtype=torch.int64)
                            for g in groups])

    def budget(f: float) -> int:
        return math.floor(f * model_parameters + 0.5)

    def pick(flat: torch.Tensor) -> torch.Tensor:
        top = _within(_order(flat, reverse), flat_sizes, budget(fraction))
        if reversed_fraction is None:
            return torch.sort(top).values
        taken = torch.zeros(flat.numel(), dtype=torch.bool)
        taken[top] = True
        rest = _order(flat, True)
        rest = rest[~taken[rest]]
        bottom = _within(rest, flat_sizes, budget(reversed_fraction)) if rest.numel() else rest
        return torch.sort(torch.cat([top, bottom])).values

    return _pick_per_pool(scores, groups, False, pick)


def to_neuron_set(
    selected: Mapping[str, torch.Tensor], groups: Sequence[Group], meta: Mapping[str, Any]
) -> NeuronSet:
    """Turn `group name -> indices` into a NeuronSet with `meta`."""
    entries: dict[str, Selection] = {}
    for g in groups:
        idx = selected.get(g.name)
        if idx is None or not idx.numel():
            continue
        for fqn, sel in g.entries(idx).items():
            if fqn in entries:  # a parameter in two groups would be ambiguous
                raise ValueError(f"parameter {fqn} is a piece of two groups")
            entries[fqn] = sel
    return NeuronSet(entries, meta)


def selected_of(nset: NeuronSet, groups: Sequence[Group]) -> dict[str, torch.Tensor]:
    """Recover `group name -> indices` from a set (via each group's first piece)."""
    out = {}
    for g in groups:
        fqn, axis = g.pieces[0]
        sel = nset.entries.get(fqn)
        if sel is not None and sel.axis != axis:
            raise ValueError(f"{fqn}: set selects axis {sel.axis}, group {g.name} uses {axis}")
        out[g.name] = sel.indices.clone() if sel is not None else torch.zeros(0, dtype=torch.long)
    return out


def union_with_previous(new: NeuronSet, previous: NeuronSet | None) -> NeuronSet:
    """`new` plus the earlier set's neurons, keeping `new`'s metadata (and noting the union)."""
    if previous is None:
        return new
    merged = new.union(previous)
    meta = {**new.meta, "union_with": previous.checksum()}
    return NeuronSet(merged.entries, meta)


def _digest_words(text_hex: str) -> torch.Tensor:
    """A hex digest as 16-bit words in int64 (sums over ranks cannot overflow)."""
    raw = hashlib.sha256(text_hex.encode()).digest()
    return torch.tensor([int.from_bytes(raw[i : i + 2], "little") for i in range(0, 32, 2)],
                        dtype=torch.int64)


def check_identical_across_ranks(engine: Engine, nset: NeuronSet) -> str:
    """Raise on every rank unless all ranks hold a set with the same checksum.

    Each rank compares the sum of everyone's digest words with `world_size` times its
    own; they all match only if all digests are equal. A second all-reduce shares
    the verdict so no rank goes on alone (and hangs the others).

    Returns:
        The checksum.
    """
    checksum = nset.checksum()
    if engine.world_size == 1:
        return checksum
    device = device_of(engine)
    mine = _digest_words(checksum).to(device)
    total = engine.all_reduce_(mine.clone())
    bad = torch.tensor([int(not torch.equal(total, mine * engine.world_size))],
                       dtype=torch.int64, device=device)
    engine.all_reduce_(bad)
    if int(bad):
        raise RuntimeError(
            f"NeuronSet differs across ranks ({int(bad)} rank(s) disagree; rank "
            f"{engine.rank} has {checksum}): scores were not identical everywhere"
        )
    return checksum


__all__ = [
    "candidate_parameters", "check_identical_across_ranks", "resolve_count", "selected_of",
    "to_neuron_set", "top_and_bottom", "top_by_parameters", "top_k", "union_with_previous",
]
