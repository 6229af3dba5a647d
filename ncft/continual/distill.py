"""Unit-level distillation without old data (`training.unit_distill_weight`; ncft's own).

Not from Leng & Xiong or NeFT: our regulariser for issue #24 (b). From the second
stage on, it keeps the activations of the units that earlier tasks selected close to
what they were at the start of the stage, measured on the CURRENT task's training
inputs. No earlier task's data is read; only the earlier tasks' saved NeuronSets.

What is compared, and the choices the issue leaves open:

* Units: per layer, the union of the units tasks 0..s-1 selected (`earlier_units`). A
  unit counts as selected when any projection of its block has a selection along that
  projection's unit axis (gate/up/fc_in rows, down/fc_out columns of `nn.Linear`), so
  sets of `selection.unit: row` and sets without the down projection count too; NeFT
  rows that are not unit rows (down rows, attention) have no unit and are ignored.
* Activation: entry `j` of the down projection's input (`ncft.arch`), the quantity
  attribution scores, read by a forward pre-hook on `down_fqn` found inside the
  wrapped model (`ncft.engine.find_module`, as `ncft.scoring.attribution` does).
* Per example, the MEAN over its non-padding tokens (`attention_mask`), not every
  token: the reference is then `[examples, units]` per micro-batch, small fp32 CPU
  tensors (steps x grad_accum x micro_batch_size x units x 4 bytes per rank), where
  per-token activations would grow with the sequence length too.
* Reference: before training, one no-grad forward per training micro-batch of the
  stage with the stage's starting weights, in training order (`record`). So the
  stage costs one extra forward per micro-batch, and at the first step the penalty
  is exactly 0 (same weights, same inputs).
* Penalty of a micro-batch: `weight * mean((current - reference) ** 2)` over its
  examples and all units of all layers (concatenated), added to that micro-batch's
  loss before backward (`ncft.train.train_step`'s `aux_loss`), in the graph.
* Rank-local: each rank records and compares its own micro-batches; no collective
  beyond the engine's own forwards (every rank runs the same number of them).
* Resume: the references of the steps already taken are skipped (the caller passes
  the remaining steps), and `record` must run on the stage's starting weights, i.e.
  before a mid-task checkpoint is restored.
* Stage 0 has no earlier units: the penalty is off there (the loop builds none).

The hooks live only inside `unit_distill`'s context, so evaluation never sees them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ncft.arch import MlpBlock
from ncft.engine import Engine, engine_module, find_module
from ncft.neuron_set import NeuronSet

__all__ = ["UnitDistill", "earlier_units", "selected_units", "unit_distill"]


def selected_units(nset: NeuronSet, block: MlpBlock) -> torch.Tensor:
    """Sorted unit indices of `block` that `nset` selects (module docstring), int64."""
    parts = [sel.indices for p in block.projections
             if (sel := nset.entries.get(p.weight_fqn)) is not None and sel.axis == p.unit_axis]
    if not parts:
        return torch.empty(0, dtype=torch.long)
    return torch.unique(torch.cat(parts).long())


def earlier_units(sets: Sequence[NeuronSet], blocks: Sequence[MlpBlock]) -> dict[int, torch.Tensor]:
    """`layer -> sorted unit indices` selected by any of `sets`; layers without any left out."""
    out = {}
    for block in blocks:
        idx = [selected_units(s, block) for s in sets]
        union = torch.unique(torch.cat(idx)) if idx else torch.empty(0, dtype=torch.long)
        if len(union):
            out[block.layer] = union
    return out


class UnitDistill:
    """Forward hooks, references and the penalty of one stage (module docstring).

    Attributes:
        weight: The penalty's weight (`training.unit_distill_weight`).
        references: One `[examples, units]` fp32 CPU tensor per recorded micro-batch,
            in training order.
        used: References consumed by `aux_loss` so far.
    """

    def __init__(self, engine: Engine, blocks: Sequence[MlpBlock],
                 units: Mapping[int, torch.Tensor], weight: float) -> None:
        self.engine, self.weight = engine, weight
        self.blocks = [b for b in blocks if b.layer in units]
        self.units = {b.layer: units[b.layer] for b in self.blocks}
        self.references: list[torch.Tensor] = []
        self.used = 0
        self._captured: dict[int, torch.Tensor] = {}
        self._handles: list = []

    @property
    def num_units(self) -> int:
        """Units compared, over all layers."""
        return sum(len(v) for v in self.units.values())

    def attach(self) -> None:
        """Register one forward pre-hook per block with earlier units."""
        root = engine_module(self.engine)
        self._handles = [find_module(root, b.down_fqn).register_forward_pre_hook(self._hook(b))
                         for b in self.blocks]

    def detach(self) -> None:
        """Remove the hooks and drop anything captured."""
        for h in self._handles:
            h.remove()
        self._handles, self._captured = [], {}

    def _hook(self, block: MlpBlock):
        idx_cpu = self.units[block.layer]
        on_device: dict[torch.device, torch.Tensor] = {}

        def pre_hook(module: nn.Module, args: tuple) -> None:
            del module
            a_BTF = args[0]
            idx = on_device.setdefault(a_BTF.device, idx_cpu.to(a_BTF.device))
            # Overwritten by every forward: a recompute under activation checkpointing
            # (during backward, after `aux_loss` has read it) is replaced by the next one.
            self._captured[block.layer] = a_BTF.index_select(-1, idx)

        return pre_hook

    def _means(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """`[B, units]` fp32: each example's mean over its non-padding tokens, all layers."""
        missing = [b.layer for b in self.blocks if b.layer not in self._captured]
        if missing:
            raise RuntimeError(f"unit distillation: no activation captured for layers {missing}")
        acts = [self._captured[b.layer] for b in self.blocks]
        self._captured = {}
        mask = batch.get("attention_mask")
        first = acts[0]
        mask_BT1 = (torch.ones(first.shape[:2], device=first.device) if mask is None
                    else mask.to(first.device).float()).unsqueeze(-1)
        count_B1 = mask_BT1.sum(dim=1).clamp(min=1)
        return torch.cat([(a.float() * mask_BT1).sum(dim=1) / count_B1 for a in acts], dim=1)

    @torch.no_grad()
    def record(self, steps: Iterable[Sequence[Mapping[str, torch.Tensor]]]) -> None:
        """One no-grad forward per micro-batch of `steps`: append its references."""
        for micro_batches in steps:
            for batch in micro_batches:
                inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
                self.engine.forward(inputs)
                self.references.append(self._means(batch).cpu())

    def aux_loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The penalty of the micro-batch whose forward just ran (in the graph)."""
        if self.used >= len(self.references):
            raise RuntimeError(f"unit distillation: micro-batch {self.used + 1} has no "
                               f"reference ({len(self.references)} recorded)")
        current = self._means(batch)
        reference = self.references[self.used].to(current.device)
        if reference.shape != current.shape:
            raise RuntimeError(f"unit distillation: micro-batch {self.used + 1} has shape "
                               f"{tuple(current.shape)}, its reference {tuple(reference.shape)}")
        self.used += 1
        return self.weight * (current - reference).pow(2).mean()


@contextmanager
def unit_distill(
    engine: Engine, blocks: Sequence[MlpBlock], units: Mapping[int, torch.Tensor],
    weight: float, steps: Iterable[Sequence[Mapping[str, torch.Tensor]]],
) -> Iterator[UnitDistill]:
    """Hooks on, references of `steps` recorded now (the current weights); hooks off on exit.

    Args:
        engine: The stage's training engine, still on the stage's starting weights.
        blocks: MLP blocks of the unwrapped model.
        units: `layer -> unit indices` to keep (`earlier_units`); must not be empty.
        weight: The penalty's weight (> 0).
        steps: The micro-batch lists the stage will train on, in order (on resume,
            only the steps still to take).
    """
    distill = UnitDistill(engine, blocks, units, weight)
    distill.attach()
    try:
        distill.record(steps)
        yield distill
    finally:
        distill.detach()
