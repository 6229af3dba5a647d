"""`ncft.score`: select neurons from the user's own model and data loader.

The same gradient attribution as `ncft neurons score` (`ncft.scoring.attribution`):
`R_j = sum |a_j * dL/da_j|` over the answer tokens of every example, with the loss
"sum over examples of the mean answer-token cross-entropy", summed over this rank's
batches, then all-reduced over ranks (a vector of d_ff floats per layer: no
parameter is gathered, no gradient or optimizer state is touched), then the top
`fraction` of units of every layer. Every rank gets the same NeuronSet.

The loader is the user's: each rank iterates its own share (a `DistributedSampler`,
accelerate's prepared loader), so the scores are those of the union of the shares.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ncft import param_shards
from ncft.arch import get_adapter
from ncft.engine import eval_mode
from ncft.neuron_set import NeuronSet
from ncft.scoring.attribution import AGGREGATION, accumulate, probe_activations
from ncft.scoring.groups import unit_groups
from ncft.selection.topk import to_neuron_set, top_k

SCORERS = ("grad_attribution",)


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _root(model: nn.Module) -> nn.Module:
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def score(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    fraction: float = 0.05,
    scorer: str = "grad_attribution",
    positions: str = "answer",
    per_layer: bool = True,
) -> NeuronSet:
    """Score FFN units by gradient attribution on `dataloader`; keep the top `fraction`.

    Collective under a process group: every rank calls it with its own share of the
    data, and all get the same set.

    Args:
        model: The model, plain or wrapped (a DeepSpeed engine, an FSDP module): it is
            called as `model(input_ids=..., attention_mask=...)`.
        dataloader: Batches with `input_ids`, `labels` (-100 on prompt and padding,
            the token elsewhere) and optionally `attention_mask`.
        fraction: Fraction of each layer's units to select (at least one).
        scorer: "grad_attribution" (the other scorers need a fine-tuning probe or a
            reference checkpoint: use `ncft neurons score`).
        positions: "answer" (positions whose logits predict answer tokens) or "all".
        per_layer: Top-k within each layer (as `selection.per_layer`), else globally.

    Returns:
        The selected units as a NeuronSet (gate/up rows, down columns, and biases).

    Raises:
        ValueError: For an unknown scorer, or a loader that yields no batch.
    """
    if scorer not in SCORERS:
        raise ValueError(f"scorer: {scorer!r} is not one of {list(SCORERS)}; the others "
                         "need a fine-tuning probe or a reference checkpoint (ncft neurons "
                         "score)")
    root = _root(model)
    blocks = get_adapter(root).mlp_blocks(root)
    groups = unit_groups(blocks)
    device = _device(root)
    sums = [torch.zeros(b.d_ff, dtype=torch.float64, device=device) for b in blocks]
    batches = 0

    def forward(batch: dict[str, torch.Tensor]) -> Any:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    with eval_mode(root), torch.enable_grad(), probe_activations(root, blocks) as probe:
        for raw in dataloader:
            batch = {k: raw[k].to(device) for k in ("input_ids", "labels")}
            mask = raw.get("attention_mask")
            batch["attention_mask"] = (torch.ones_like(batch["input_ids"]) if mask is None
                                       else mask.to(device))
            accumulate(forward, batch, blocks, probe, sums, positions)
            batches += 1
    flat = torch.cat(sums)
    if dist.is_available() and dist.is_initialized():
        comm = param_shards.comm_device()
        work = flat.to(comm)
        dist.all_reduce(work)
        flat = work.to(device)
        counts = torch.tensor([batches], device=comm)
        dist.all_reduce(counts)
        batches = int(counts.item())
    if batches == 0:
        raise ValueError("dataloader: no batch to score on")
    scores = {g.name: s.cpu() for g, s in zip(groups, flat.split([b.d_ff for b in blocks]))}
    chosen = top_k(scores, groups, fraction=fraction, per_layer=per_layer)
    meta = {"scorer": scorer, "aggregation": AGGREGATION, "positions": positions,
            "fraction": fraction, "per_layer": per_layer, "unit": "neuron",
            "model_id": getattr(getattr(root, "config", None), "_name_or_path", ""),
            "source": "ncft.score"}
    return to_neuron_set(chosen, groups, meta)
