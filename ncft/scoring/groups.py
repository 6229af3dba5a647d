"""The candidates a scorer scores: `Group`s of FFN units or weight rows, and `Scores`.

A `Group` is one vector of candidates that a scorer scores together: the FFN units
of one MLP (`unit="neuron"`), or the output rows of one projection (`unit="row"`,
NeFT's neuron). `Scores` maps a group's name to one float per candidate, higher =
selected first (a scorer whose natural order is "lower first", like NeFT's cosine
similarity, negates or complements it). Scorers produce `Scores` over groups;
`ncft.selection` turns them into a NeuronSet, so selection imports scoring and
never the reverse.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ncft.arch import MlpBlock, get_adapter, make_projection, row_entries
from ncft.neuron_set import Selection

Scores = dict[str, torch.Tensor]  # group name -> [group.size] float scores
MLP_ROLES = ("gate", "up", "down", "fc_in", "fc_out")


@dataclass(frozen=True)
class Group:
    """Candidates scored together; candidate `i` is slice `i` of every piece.

    Attributes:
        name: The MLP module name (units) or the projection module name (rows).
        layer: Decoder layer index (what `per_layer` selection pools by).
        size: Number of candidates.
        pieces: `(parameter fqn, storage axis)` pairs; candidate `i` owns index `i`
            along `axis` of each (a unit: gate/up rows, down column, biases).
    """

    name: str
    layer: int
    size: int
    pieces: tuple[tuple[str, int], ...]

    def entries(self, indices: torch.Tensor) -> dict[str, Selection]:
        """NeuronSet entries for candidates `indices` (sorted, unique)."""
        idx = torch.unique(indices.to(torch.int64), sorted=True)
        return {fqn: Selection(axis, idx) for fqn, axis in self.pieces}


def unit_groups(blocks: Sequence[MlpBlock], roles: Sequence[str] = MLP_ROLES) -> list[Group]:
    """One group per MLP: its FFN units, owning the pieces of the projections in `roles`.

    The output-side bias belongs to no unit and is never a piece (see `ncft.arch`).
    """
    groups = []
    for block in blocks:
        pieces = []
        for p in block.projections:
            if p.role not in roles:
                continue
            pieces.append((p.weight_fqn, p.unit_axis))
            if p.bias_fqn is not None and p.role in ("gate", "up", "fc_in"):
                pieces.append((p.bias_fqn, 0))
        if not pieces:
            raise ValueError(f"modules {list(roles)} name no projection of {block.mlp_fqn}")
        groups.append(Group(block.mlp_fqn, block.layer, block.d_ff, tuple(pieces)))
    return groups


def row_groups(model: nn.Module, modules: Sequence[str]) -> list[Group]:
    """One group per projection: its output rows (NeFT neurons) and their bias elements.

    Args:
        model: The unwrapped model (or a ZeRO-3 module: shapes come from `ds_shape`).
        modules: MLP roles to include, plus "attention" for every attention projection.
    """
    adapter = get_adapter(model)
    attn = adapter.attention_projections(model) if "attention" in modules else []
    groups = []
    for block in adapter.mlp_blocks(model):
        layer_prefix = block.mlp_fqn.rsplit(".", 1)[0] + "."
        projs = [make_projection(model, f, "attn") for f in attn if f.startswith(layer_prefix)]
        projs += [p for p in block.projections if p.role in modules]
        for p in projs:
            entries = row_entries(p, torch.zeros(0, dtype=torch.long))
            size = _shape(model, p.weight_fqn)[entries[p.weight_fqn][0]]
            pieces = tuple((fqn, axis) for fqn, (axis, _) in entries.items())
            groups.append(Group(p.module_fqn, block.layer, size, pieces))
    if not groups:
        raise ValueError(f"modules {list(modules)} name no projection of the model")
    return groups


def _shape(model: nn.Module, fqn: str) -> tuple[int, ...]:
    param = model.get_parameter(fqn)
    ds_shape = getattr(param, "ds_shape", None)
    return tuple(ds_shape) if ds_shape is not None else tuple(param.shape)


__all__ = ["MLP_ROLES", "Group", "Scores", "row_groups", "unit_groups"]
