"""IoU overlap of task NeuronSets, whole-model and per decoder layer.

Whole-model IoU is `NeuronSet.iou`: intersection over union of the
`(fqn, axis, index)` triples. Per layer it is the same ratio restricted to the
entries of one layer. With `blocks` given, the sets are read as neuron-unit sets
(`NeuronSet.units`) and the IoU is over `(layer, unit)` pairs instead.

Without blocks, an entry's layer is the first dotted integer in its fqn
(`model.layers.3.mlp.up_proj.weight` -> 3); entries with none (embeddings, lm_head)
count toward the whole-model IoU only. For unit sets of one model the two readings
agree: every unit of a layer owns the same number of triples in both sets, so the
per-layer ratio of triples equals the ratio of units.

A layer where neither set selects anything has IoU `None` (undefined), not 1.

Output of `iou_matrix` (JSON-ready)::

    {"tasks": [name, ...],
     "sizes": [selected count per task],   # units with blocks, else triples
     "unit": "unit" | "triple",
     "whole": [[iou i vs j]],
     "layers": [layer, ...],
     "per_layer": [[[iou i vs j] for one layer], ...],   # aligned with "layers"
     "mean_offdiag": float | None, "mean_offdiag_per_layer": [float | None, ...]}
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ncft.arch import MlpBlock
from ncft.neuron_set import NeuronSet

_LAYER = re.compile(r"\.(\d+)\.")
_ALL = object()  # layer argument meaning "every layer, and entries with no layer"

# Selected items of one set, per layer (None = no layer): sorted unique int64 keys.
Items = dict[int | None, np.ndarray]
_INDEX_BITS = 40  # key = (entry id << 40) | index; no tensor dim reaches 2**40


def layer_of(fqn: str) -> int | None:
    """Decoder layer index of a parameter name, or None if it names no layer."""
    m = _LAYER.search(f".{fqn}.")
    return int(m.group(1)) if m else None


def _triples(s: NeuronSet, ids: Mapping[tuple[str, int], int]) -> Items:
    # Integer keys instead of Python tuples: a 7B model's sets hold ~1e5 items each.
    parts: dict[int | None, list[np.ndarray]] = {}
    for fqn, sel in s.entries.items():
        key = (ids[(fqn, sel.axis)] << _INDEX_BITS) | sel.indices.numpy()
        parts.setdefault(layer_of(fqn), []).append(key)
    return {k: np.unique(np.concatenate(v)) for k, v in parts.items()}


def _units(s: NeuronSet, blocks: Sequence[MlpBlock]) -> Items:
    return {layer: idx.numpy() for layer, idx in s.units(list(blocks)).items()}


def _inter(a: Items, b: Items, layer: Any = _ALL) -> int:
    keys = a.keys() & b.keys() if layer is _ALL else ({layer} & a.keys() & b.keys())
    return sum(np.intersect1d(a[k], b[k], assume_unique=True).size for k in keys)


def _size(a: Items, layer: Any = _ALL) -> int:
    if layer is _ALL:
        return sum(v.size for v in a.values())
    return a[layer].size if layer in a else 0


def _iou(a: Items, b: Items, layer: Any = _ALL) -> float | None:
    inter = _inter(a, b, layer)
    union = _size(a, layer) + _size(b, layer) - inter
    return None if union == 0 else inter / union


def _mean_offdiag(m: list[list[float | None]]) -> float | None:
    vals = [v for i, row in enumerate(m) for j, v in enumerate(row) if i != j and v is not None]
    return sum(vals) / len(vals) if vals else None


def iou_matrix(
    sets: Mapping[str, NeuronSet], blocks: Sequence[MlpBlock] | None = None
) -> dict[str, Any]:
    """Pairwise IoU of task NeuronSets, whole-model and per layer.

    Args:
        sets: `task name -> NeuronSet`, in the order rows/columns should have.
        blocks: MLP blocks of the model (`ArchAdapter.mlp_blocks`); if given, compare
            neuron units via `NeuronSet.units` (`ValueError` if a set is not a unit set).

    Returns:
        The JSON-ready dict described in the module docstring.

    Raises:
        ValueError: If `sets` is empty.

    """
    if not sets:
        raise ValueError("sets must name at least one task")
    names = list(sets)
    if blocks is not None:
        items = [_units(sets[n], blocks) for n in names]
    else:
        pairs = sorted({(f, sel.axis) for s in sets.values() for f, sel in s.entries.items()})
        ids = {p: i for i, p in enumerate(pairs)}
        items = [_triples(sets[n], ids) for n in names]
    layers = sorted({k for it in items for k in it if k is not None})
    whole = [[_iou(a, b) for b in items] for a in items]
    per_layer = [[[_iou(a, b, k) for b in items] for a in items] for k in layers]
    return {
        "tasks": names,
        "sizes": [_size(it) for it in items],
        "unit": "unit" if blocks is not None else "triple",
        "whole": whole,
        "layers": layers,
        "per_layer": per_layer,
        "mean_offdiag": _mean_offdiag(whole),
        "mean_offdiag_per_layer": [_mean_offdiag(m) for m in per_layer],
    }
