"""Collect NeFT §6.1's max Pearson scores on an engine (forward hooks, all ranks).

The definitions and the open points are in `ncft.analysis.neft_utilization`; this
module only gathers the moments it needs. Each candidate group's hidden states are
read by a forward hook on the engine's own module (a row group: the projection's
output; an FFN-unit group: the input of its down projection, the column-owning
piece), so no parameter is gathered. Per group we sum, over this rank's tokens,
the count, `sum x` and `sum x x^T` in float64 on the engine's device, then sum
them over the data-parallel ranks (`Engine.all_reduce_`). Groups are processed in
chunks whose Gram matrices fit `max_elements`, one pass over the data per chunk.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ncft.analysis.neft_utilization import max_pearson
from ncft.data.examples import IGNORE, batches, collate
from ncft.engine import Engine, device_of, engine_module, eval_mode, find_module
from ncft.scoring.groups import Group, Scores


def hidden_state_site(group: Group) -> tuple[str, str]:
    """`(module fqn, "input" | "output")` where a group's hidden states are read.

    A group with a column-owning piece (axis 1: the down / fc_out projection of an
    FFN-unit group) is read at that projection's input; otherwise the first piece's
    projection output holds one element per candidate row.
    """
    for fqn, axis in group.pieces:
        if axis == 1:
            return fqn.rsplit(".", 1)[0], "input"
    return group.pieces[0][0].rsplit(".", 1)[0], "output"


def _chunks(groups: Sequence[Group], max_elements: int) -> list[list[Group]]:
    out: list[list[Group]] = [[]]
    used = 0
    for g in groups:
        if out[-1] and used + g.size**2 > max_elements:
            out.append([])
            used = 0
        out[-1].append(g)
        used += g.size**2
    return out


class _Moments:
    """Per-group token count, sum and Gram matrix, fed by forward hooks."""

    def __init__(self, groups: Sequence[Group], device: torch.device) -> None:
        self.sum = {g.name: torch.zeros(g.size, dtype=torch.float64, device=device)
                    for g in groups}
        self.gram = {g.name: torch.zeros(g.size, g.size, dtype=torch.float64, device=device)
                     for g in groups}
        self.count = torch.zeros(1, dtype=torch.float64, device=device)
        self.keep: torch.Tensor | None = None  # [B, T] tokens of real examples

    def add(self, name: str, h_BTD: torch.Tensor) -> None:
        assert self.keep is not None
        x = h_BTD[self.keep.to(h_BTD.device)].double()
        self.sum[name] += x.sum(dim=0)
        self.gram[name] += x.T @ x

    def hook(self, name: str, site: str):
        if site == "input":
            return lambda module, args: self.add(name, args[0])
        return lambda module, args, out: self.add(name, out)


def _register(root: nn.Module, moments: _Moments, groups: Sequence[Group]) -> list[Any]:
    handles = []
    for g in groups:
        fqn, site = hidden_state_site(g)
        module = find_module(root, fqn)
        hook = moments.hook(g.name, site)
        handles.append(module.register_forward_pre_hook(hook) if site == "input"
                       else module.register_forward_hook(hook))
    return handles


def pearson_scores(
    engine: Engine,
    groups: Sequence[Group],
    encoded: Sequence[Mapping[str, torch.Tensor]],
    batch_size: int,
    pad_id: int,
    max_elements: int = 2**26,
) -> Scores:
    """`group name -> [size]` max Pearson scores (NeFT §6.1) of the engine's model.

    Args:
        engine: The engine holding the model (any backend; every rank calls this).
        groups: Candidate groups (`ncft.selection.pipeline.candidate_groups`).
        encoded: Evaluation examples; each rank reads its share, filler copies (no
            labels) are left out, so the result does not depend on the world size.
        batch_size: Examples per rank per forward.
        pad_id: Padding token id.
        max_elements: Gram-matrix elements held at once (float64); more groups
            than fit take another pass over the data.

    Returns:
        float64 scores on the CPU, identical on every rank.
    """
    root = engine_module(engine)
    device = device_of(engine)
    out: Scores = {}
    for chunk in _chunks(groups, max_elements):
        moments = _Moments(chunk, device)
        handles = _register(root, moments, chunk)
        try:
            with torch.no_grad(), eval_mode(root):
                for share in batches(encoded, batch_size, engine.rank, engine.world_size, "pad"):
                    batch = collate(share, pad_id)
                    real = (batch["labels"] != IGNORE).any(dim=1, keepdim=True)
                    moments.keep = (batch["attention_mask"] == 1) & real
                    moments.count += moments.keep.sum()
                    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
                    engine.forward({"input_ids": ids, "attention_mask": mask})
        finally:
            for h in handles:
                h.remove()
        engine.all_reduce_(moments.count)
        count = float(moments.count)
        if count < 2:
            raise ValueError("NeFT utilization needs at least 2 evaluated tokens")
        for g in chunk:
            engine.all_reduce_(moments.sum[g.name])
            engine.all_reduce_(moments.gram[g.name])
            out[g.name] = max_pearson(count, moments.sum[g.name], moments.gram[g.name]).cpu()
    return out


__all__ = ["hidden_state_site", "pearson_scores"]
