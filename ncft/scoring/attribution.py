"""Gradient attribution of FFN units (Leng & Xiong): `R_j = sum |a_j * dL/da_j|`.

`a_j` is entry `j` of the input of a layer's down projection (the unit activation,
see `ncft.arch`), summed over the chosen token positions of every scored example.

Shapes: B batch, T tokens, V vocab, F units of one layer (d_ff).

How the gradient is taken, and why it needs no parameter gather or update:
activations are never sharded (every engine runs whole layers on each rank's own
micro-batch), so a forward pre-hook on the down projection sees the full `a_BTF`.
The scorer then calls `torch.autograd.grad(loss, activations)` instead of
`loss.backward()`: autograd walks only from the loss back to the earliest hooked
activation and builds no parameter gradient at all, so nothing is reduced and the
optimizer state is untouched. The engines' own backward hooks still re-gather the
parameters that this partial backward needs (down/up projections, attention of
later layers) and release them afterwards. Checked on ZeRO-3 (with parameter
partitioning forced on), FSDP2 and FSDP1 at 2 and 3 ranks
(`tests/dist/scoring_worker.py`): scores match one process, no nonzero gradient is
left (ZeRO-3 does allocate its gradient partitions, zero-filled), so a training
step after scoring is unaffected. It also skips the weight-gradient
matmuls, so a scoring pass costs less than a training forward + backward.

Loss: the sum over examples of each example's MEAN token cross-entropy on its
answer tokens. Because each example's term is independent of its batch mates, the
scores are a plain sum over examples, identical for any batch size, world size or
padding (`batches(last="pad")` adds loss-free fillers, which contribute exactly 0).

Positions: "all" sums over every non-padding position; "answer" sums over positions
`t` with `labels[t + 1] != -100`, i.e. the positions whose logits produce the
answer tokens (the last prompt token through the second-to-last answer token).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ncft.arch import MlpBlock
from ncft.data.examples import IGNORE, batches, collate, data_hash
from ncft.engine import Engine, device_of, engine_module, eval_mode, find_module, logits_of
from ncft.scoring.groups import Group, Scores

AGGREGATION = "sum_abs_act_x_grad over tokens"


class ActivationProbe:
    """Forward pre-hooks that keep the input of each down projection, in call order."""

    def __init__(self) -> None:
        self.captured: dict[int, torch.Tensor] = {}

    def hook(self, layer: int):
        """A pre-hook storing `args[0]` for `layer` (made a grad leaf if it needs one)."""

        def pre_hook(module: nn.Module, args: tuple) -> tuple | None:
            del module
            a_BTF = args[0]
            if a_BTF.requires_grad:
                self.captured[layer] = a_BTF
                return None
            # Nothing upstream is trainable (a frozen model): a fresh leaf carries the
            # same value. Exact, because no earlier hooked activation feeds this one
            # (it would require grad if one did).
            leaf = a_BTF.detach().requires_grad_()
            self.captured[layer] = leaf
            return (leaf, *args[1:])

        return pre_hook


@contextmanager
def probe_activations(
    engine_or_model: Engine | nn.Module, blocks: Sequence[MlpBlock]
) -> Iterator[ActivationProbe]:
    """Capture every block's down-projection input during forwards in this context."""
    root = engine_module(engine_or_model)
    probe = ActivationProbe()
    handles = [find_module(root, b.down_fqn).register_forward_pre_hook(probe.hook(b.layer))
               for b in blocks]
    try:
        yield probe
    finally:
        for h in handles:
            h.remove()


def position_mask(batch: Mapping[str, torch.Tensor], positions: str) -> torch.Tensor:
    """`[B, T]` bool: which positions' attributions are summed (module docstring)."""
    if positions == "all":
        return batch["attention_mask"].bool()
    if positions == "answer":
        labels_BT = batch["labels"]
        mask = torch.zeros_like(labels_BT, dtype=torch.bool)
        mask[:, :-1] = labels_BT[:, 1:] != IGNORE
        return mask
    raise ValueError(f"positions must be 'all' or 'answer', got {positions!r}")


def answer_loss(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Sum over examples of the mean next-token cross-entropy on answer tokens.

    Examples without answer tokens (fillers) contribute exactly zero.
    """
    logits = logits_BTV[:, :-1].float()
    target = labels_BT[:, 1:].to(logits.device)
    token_loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
        ignore_index=IGNORE, reduction="none",
    ).view(target.shape)
    counts = (target != IGNORE).sum(dim=1).clamp(min=1)
    return (token_loss.sum(dim=1) / counts).sum()


def accumulate(
    forward: Callable[[dict[str, torch.Tensor]], Any],
    batch: Mapping[str, torch.Tensor],
    blocks: Sequence[MlpBlock],
    probe: ActivationProbe,
    sums: Sequence[torch.Tensor],
    positions: str,
) -> None:
    """Add one batch's `|a * dL/da|` per unit to `sums` (one float64 vector per block).

    `forward` runs the model (an engine's, or a user's wrapped model) on `input_ids`
    and `attention_mask`; `probe` must be capturing the blocks' activations.
    """
    probe.captured.clear()
    output = forward({"input_ids": batch["input_ids"],
                      "attention_mask": batch["attention_mask"]})
    loss = answer_loss(logits_of(output), batch["labels"])
    acts = [probe.captured[b.layer] for b in blocks]
    grads = torch.autograd.grad(loss, acts)
    mask_BT1 = position_mask(batch, positions).unsqueeze(-1)
    for total, a_BTF, g_BTF in zip(sums, acts, grads):
        contrib = (a_BTF.detach().float() * g_BTF.float()).abs() * mask_BT1
        total += contrib.sum(dim=(0, 1)).to(total.device, torch.float64)
    probe.captured.clear()


@dataclass(frozen=True)
class GradAttribution:
    """The Leng & Xiong scorer over FFN units (one `Group` per MLP block).

    Attributes:
        encoded: Encoded task examples (`ncft.data.examples.encode`), the same list
            on every rank; each rank scores its share.
        blocks: MLP blocks of the unwrapped model (computed before wrapping).
        positions: "answer" or "all" (module docstring).
        num_examples: Use the first `num_examples` examples (None = all).
        batch_size: Examples per rank per forward.
        pad_id: Token id used to pad batches.
        model_id: Recorded in metadata.
    """

    encoded: Sequence[Mapping[str, torch.Tensor]]
    blocks: Sequence[MlpBlock]
    positions: Literal["all", "answer"] = "answer"
    num_examples: int | None = None
    batch_size: int = 8
    pad_id: int = 0
    model_id: str = ""
    name: str = "grad_attribution"

    def _used(self) -> Sequence[Mapping[str, torch.Tensor]]:
        return self.encoded if self.num_examples is None else self.encoded[: self.num_examples]

    def score(self, engine: Engine, groups: Sequence[Group]) -> Scores:
        """Sum `|a * dL/da|` per unit over this rank's examples, then over ranks."""
        blocks = self._blocks_for(groups)
        used = self._used()
        if not used:
            raise ValueError("grad_attribution needs at least one example")
        device = device_of(engine)
        sums = [torch.zeros(b.d_ff, dtype=torch.float64, device=device) for b in blocks]
        shares = list(batches(used, self.batch_size, engine.rank, engine.world_size, "pad"))
        root = engine_module(engine)
        with eval_mode(root), torch.enable_grad(), probe_activations(engine, blocks) as probe:
            for share in tqdm(shares, desc="attribution", disable=not engine.is_main_process):
                batch = {k: v.to(device) for k, v in collate(share, self.pad_id).items()}
                self._accumulate(engine, batch, blocks, probe, sums)
        flat = engine.all_reduce_(torch.cat(sums))
        return {g.name: s.cpu() for g, s in zip(groups, flat.split([b.d_ff for b in blocks]))}

    def _accumulate(self, engine, batch, blocks, probe, sums) -> None:
        accumulate(engine.forward, batch, blocks, probe, sums, self.positions)

    def _blocks_for(self, groups: Sequence[Group]) -> list[MlpBlock]:
        by_name = {b.mlp_fqn: b for b in self.blocks}
        missing = [g.name for g in groups if g.name not in by_name]
        if missing:
            raise ValueError(
                f"grad_attribution scores FFN units (unit='neuron'); groups {missing[:3]} "
                "are not MLP unit groups"
            )
        return [by_name[g.name] for g in groups]

    def meta(self) -> dict[str, Any]:
        """What a NeuronSet built from these scores records."""
        used = self._used()
        return {
            "scorer": self.name, "aggregation": AGGREGATION, "positions": self.positions,
            "num_examples": len(used), "data_hash": data_hash(used), "model_id": self.model_id,
            "loss": "sum over examples of mean answer-token cross-entropy",
        }
