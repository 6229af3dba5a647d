"""Switch neurons off (Leng & Xiong 4.1) and measure what the task loses.

Two ways, which agree exactly for FFN units (a zero gate row and up row give
`act(0) * 0 = 0`, a zero down column drops the unit's contribution):

- `deactivate_activations`: a forward pre-hook zeroes unit inputs of the down
  projection. Works on any engine, touches no weight.
- `deactivate_weights`: zeroes the selected weight elements in place and restores
  the saved values bit for bit on exit. Where it can, it edits the rank-LOCAL
  storage (`Engine.segments()` + `segment_mask`): no gather, no communication.

A segment is the tensor the OPTIMIZER steps, which is not always what the forward
reads: on ZeRO-3 it is the fp32 master partition (a separate copy on CPU and in
bf16 training), and parameters below `stage3_param_persistence_threshold` are kept
whole on every rank. Frozen parameters have no segment at all. So, per parameter:
1. trainable: zero the local segment, then (with `verify`) gather the parameter
   once (`Engine.gathered`, one parameter at a time) and check the forward sees
   zeros; every rank sees the same full tensor, so every rank decides the same;
2. frozen, or failed the check (local zeroing undone first): edit the full tensor
   through `Engine.edited` (one parameter at a time, written back to the shards the
   forward uses; the optimizer's master copy is untouched), and restore it the same
   way on exit.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ncft.arch import MlpBlock
from ncft.data.examples import IGNORE, batches, collate
from ncft.engine import (
    Engine,
    Segment,
    device_of,
    engine_module,
    eval_mode,
    find_module,
    local_view,
    logits_of,
)
from ncft.masks.layout import segment_mask
from ncft.neuron_set import NeuronSet
from ncft.scoring.attribution import answer_loss
from ncft.scoring.controls import group_generator


@contextmanager
def deactivate_activations(
    engine_or_model: Engine | nn.Module,
    blocks: Sequence[MlpBlock],
    units: Mapping[int, torch.Tensor],
) -> Iterator[None]:
    """Zero FFN units `units` (`layer -> indices`) in every forward inside the context."""
    root = engine_module(engine_or_model)
    by_layer = {b.layer: b for b in blocks}
    handles = []
    try:
        for layer, idx in units.items():
            if layer not in by_layer:
                raise ValueError(f"units has layer {layer}; blocks have {sorted(by_layer)}")
            module = find_module(root, by_layer[layer].down_fqn)
            handles.append(module.register_forward_pre_hook(_zero_inputs(idx)))
        yield
    finally:
        for h in handles:
            h.remove()


def _zero_inputs(idx: torch.Tensor):
    idx = idx.to(torch.int64)

    def pre_hook(module: nn.Module, args: tuple) -> tuple:
        del module
        a_BTF = args[0]
        return (a_BTF.index_fill(-1, idx.to(a_BTF.device), 0.0), *args[1:])

    return pre_hook


def _plain_segments(model: nn.Module) -> list[Segment]:
    return [Segment(n, tuple(p.shape), 0, p.numel(), p, 0, lambda: None)
            for n, p in model.named_parameters()]


Saved = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (view, mask, old values)


def _zero_local(segments: Sequence[Segment], entries: Mapping[str, Any]) -> dict[str, Saved]:
    saved: dict[str, Saved] = {}
    with torch.no_grad():
        for seg in segments:
            sel = entries.get(seg.fqn)
            if sel is None or not seg.numel:
                continue
            mask = segment_mask(seg.shape, seg.start, seg.stop, sel.axis, sel.indices, seg.fqn)
            view = local_view(seg)
            mask = mask.to(view.device)
            saved.setdefault(seg.fqn, []).append((view, mask, view[mask].clone()))
            view.masked_fill_(mask, 0.0)
    return saved


def _restore_local(saved: Saved) -> None:
    with torch.no_grad():
        for view, mask, values in saved:
            view.masked_scatter_(mask, values)


def _forward_sees_zeros(engine: Engine, fqn: str, sel) -> bool:
    with engine.gathered([fqn]) as full:
        return not bool(full[fqn].index_select(sel.axis, sel.indices.to(full[fqn].device)).any())


def _zero_edited(engine: Engine, fqn: str, sel) -> torch.Tensor:
    with engine.edited([fqn]) as full:
        idx = sel.indices.to(full[fqn].device)
        old = full[fqn].index_select(sel.axis, idx).clone()
        full[fqn].index_fill_(sel.axis, idx, 0.0)
    return old


def _restore_edited(engine: Engine, fqn: str, sel, old: torch.Tensor) -> None:
    with engine.edited([fqn]) as full:
        full[fqn].index_copy_(sel.axis, sel.indices.to(full[fqn].device), old.to(full[fqn]))


@contextmanager
def deactivate_weights(
    engine_or_model: Engine | nn.Module, neuron_set: NeuronSet, verify: bool = True
) -> Iterator[dict[str, str]]:
    """Zero the set's weight elements; restore them bit for bit on exit.

    Args:
        engine_or_model: An engine (sharded or not) or a plain model.
        neuron_set: What to zero (storage coordinates of the full parameters).
        verify: Check that local edits reach the forward (module docstring); with
            False, trainable parameters are trusted to compute from their segments.

    Yields:
        `fqn -> "local" | "edited"`: how each parameter was switched off.
    """
    entries = neuron_set.entries
    if isinstance(engine_or_model, nn.Module):
        saved = _zero_local(_plain_segments(engine_or_model), entries)
        try:
            yield dict.fromkeys(entries, "local")
        finally:
            for items in saved.values():
                _restore_local(items)
        return
    engine = engine_or_model
    segments = engine.segments()
    trainable = {seg.fqn for seg in segments}  # every rank lists every trainable name
    local = _zero_local(segments, {f: s for f, s in entries.items() if f in trainable})
    edited: dict[str, torch.Tensor] = {}
    try:
        to_edit = [f for f in entries if f not in trainable]
        for fqn in [f for f in entries if f in trainable and verify]:
            if not _forward_sees_zeros(engine, fqn, entries[fqn]):
                _restore_local(local.pop(fqn, []))
                to_edit.append(fqn)
        for fqn in to_edit:
            edited[fqn] = _zero_edited(engine, fqn, entries[fqn])
        yield {f: "edited" if f in to_edit else "local" for f in entries}
    finally:
        for fqn, old in edited.items():
            _restore_edited(engine, fqn, entries[fqn], old)
        for items in local.values():
            _restore_local(items)


def answer_metrics(engine: Engine, encoded, batch_size: int, pad_id: int) -> dict[str, float]:
    """Mean answer loss and exact-match token accuracy over `encoded`, all ranks."""
    device = device_of(engine)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    with torch.no_grad(), eval_mode(engine_module(engine)):
        for share in batches(encoded, batch_size, engine.rank, engine.world_size, "pad"):
            batch = {k: v.to(device) for k, v in collate(share, pad_id).items()}
            out = engine.forward({"input_ids": batch["input_ids"],
                                  "attention_mask": batch["attention_mask"]})
            logits = logits_of(out)
            labels = batch["labels"][:, 1:]
            scored = labels != IGNORE
            hit = (logits[:, :-1].argmax(-1) == labels) | ~scored
            real = scored.any(dim=1)
            totals[0] += float(answer_loss(logits, batch["labels"]))
            totals[1] += float((hit.all(dim=1) & real).sum())
            totals[2] += float(real.sum())
    engine.all_reduce_(totals)
    return {"loss": float(totals[0] / totals[2]), "accuracy": float(totals[1] / totals[2])}


def task_scores(
    engine: Engine, tasks: Sequence[str], encoded_eval, batch_size: int, pad_id: int
) -> tuple[list[float], list[float]]:
    """`answer_metrics` on every task of `tasks`, in order: (accuracies, losses).

    Args:
        engine: The engine holding the model (a collective: every rank calls it).
        tasks: Task names, in order.
        encoded_eval: Task name -> encoded evaluation examples.
        batch_size: Examples per rank per forward.
        pad_id: Padding token id.
    """
    row = [answer_metrics(engine, encoded_eval[t], batch_size, pad_id) for t in tasks]
    return [m["accuracy"] for m in row], [m["loss"] for m in row]


def random_units(units: Mapping[int, torch.Tensor], blocks: Sequence[MlpBlock], seed: int):
    """As many random units per layer as `units` has (seeded, identical on every rank)."""
    d_ff = {b.layer: b.d_ff for b in blocks}
    return {layer: torch.sort(torch.randperm(d_ff[layer], generator=group_generator(
                seed, f"layer{layer}"))[: len(idx)]).values
            for layer, idx in units.items()}
