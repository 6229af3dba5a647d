"""The one training loop every method uses: micro-batches, mask, step, log.

Order inside one optimizer step (docs/architecture.md §4; §3, rules 1-3): backward on every
micro-batch, then zero the frozen gradient elements on the local shard, then let
the engine clip (so the norm is the masked gradient's) and take the masked step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from ncft.engine import Engine
from ncft.masks.install import RankMasks


@dataclass(frozen=True)
class StepLog:
    """One optimizer step's record (what `metrics.jsonl` stores).

    Attributes:
        step: 1-based optimizer step.
        loss: Mean micro-batch loss on this rank.
        grad_norm: Global norm of the masked gradient before clipping.
    """

    step: int
    loss: float
    grad_norm: float


def _loss(output) -> torch.Tensor:
    return output.loss if hasattr(output, "loss") else output


# A regulariser applied once per step: adds its gradient to the engine's local gradient
# shards and returns its value (`ncft.olora.add_penalty_grad`).
Penalty = Callable[[Engine], float]


def train_step(
    engine: Engine, micro_batches: Sequence[dict[str, torch.Tensor]], masks: RankMasks | None,
    penalty: Penalty | None = None,
) -> tuple[float, float]:
    """Run one optimizer step over `micro_batches`; return (mean loss, grad norm).

    `penalty(engine)`, when given, runs after the last backward: it adds a
    regulariser's gradient to the local gradient shards (as if the regulariser were
    added to every micro-batch's loss) and returns its value, which the logged loss
    includes (O-LoRA's, `ncft.olora.add_penalty_grad`).
    """
    total = 0.0
    for batch in micro_batches:
        loss = _loss(engine.forward(batch))
        engine.backward(loss)
        total += float(loss.detach())
    if penalty is not None:
        total += penalty(engine) * len(micro_batches)
    if masks is not None:
        masks.apply_to_grads()
    stats = engine.step()
    return total / len(micro_batches), stats.grad_norm


def train(
    engine: Engine,
    steps: Iterable[Sequence[dict[str, torch.Tensor]]],
    masks: RankMasks | None,
    on_step: Callable[[StepLog], None] | None = None,
    start_step: int = 0,
    penalty: Penalty | None = None,
) -> list[StepLog]:
    """Train over an iterable of steps (each a list of micro-batches).

    Args:
        engine: The engine to drive.
        steps: Micro-batch lists, one per optimizer step (already this rank's slice).
        masks: Masks from `ncft.masks.install.install`, or None to train all trainable
            elements.
        on_step: Called after every step (logging, checkpoints, progress bars).
        start_step: Steps already done (for resumed runs' numbering).
        penalty: A regulariser applied once per step (`train_step`).

    Returns:
        One `StepLog` per step taken.
    """
    logs = []
    for i, micro_batches in enumerate(steps, start=start_step + 1):
        loss, norm = train_step(engine, micro_batches, masks, penalty)
        log = StepLog(step=i, loss=loss, grad_norm=norm)
        logs.append(log)
        if on_step is not None:
            on_step(log)
    return logs
