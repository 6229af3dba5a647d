"""The one training loop every method uses: micro-batches, mask, step, log.

Order inside one optimizer step (docs/architecture.md §4; §3, rules 1-3): backward on every
micro-batch, then zero the frozen gradient elements on the local shard, then let
the engine clip (so the norm is the masked gradient's) and take the masked step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

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
    skipped: bool = False  # inf/nan loss or gradient: the update was not applied


@dataclass(frozen=True)
class NonFinite:
    """What a step whose loss or gradient norm is inf/nan does (`training.on_nonfinite`).

    Attributes:
        action: "stop" raises `Diverged` at that step; "skip_step" goes on without
            the update (the engines skip it: `launcher.engines.common.step_if_finite`).
        limit: With "skip_step", raise `Diverged` once more than this many steps of
            one `train` call were skipped; None: no limit.
        loss_scaler: The engine scales fp16 losses (DeepSpeed float16): an inf/nan
            gradient norm with a finite loss is the scaler's own overflow step, which
            it skips and recovers from, so it is counted but never stopped on.
    """

    action: Literal["stop", "skip_step"] = "stop"
    limit: int | None = None
    loss_scaler: bool = False


class Diverged(RuntimeError):
    """Training produced an inf/nan loss or gradient norm and the policy says stop.

    Nothing from the step was saved: it is raised before the step's log line and
    checkpoint hooks run, so the last checkpoint stays the resume point.

    Attributes:
        log: The step that diverged.
        where: Where it happened, filled in by the caller (`at`).
    """

    def __init__(self, log: StepLog, why: str, where: str = "") -> None:
        self.log, self.why, self.where = log, why, where
        super().__init__(
            f"training diverged{' in ' + where if where else ''} at step {log.step}: {why} "
            f"(loss {log.loss}, gradient norm {log.grad_norm}); nothing from this step was "
            "saved, the last checkpoint is the resume point. Lower training.lr (or raise "
            "training.warmup_steps), or set training.on_nonfinite: skip_step to step over "
            "isolated bad batches"
        )

    def at(self, where: str) -> Diverged:
        """The same divergence, its message naming `where` (task and stage)."""
        return Diverged(self.log, self.why, where)


def _nonfinite(engine: Engine, loss: float, norm: float) -> tuple[bool, bool]:
    """Whether any rank saw an inf/nan (loss, norm), in one collective.

    The loss is per rank, and every rank must reach the same verdict.
    """
    flags = torch.tensor([float(not math.isfinite(loss)), float(not math.isfinite(norm))])
    loss_bad, norm_bad = engine.all_reduce_(flags).tolist()
    return loss_bad > 0, norm_bad > 0


def check_finite(
    engine: Engine, log: StepLog, policy: NonFinite, skipped: int
) -> StepLog:
    """Apply `policy` to one step (collective); return its log, marked if skipped.

    Args:
        engine: The engine that took the step (its `all_reduce_` agrees the verdict).
        log: The step's record.
        policy: What to do about an inf/nan loss or gradient norm.
        skipped: Steps skipped before this one in the same `train` call.

    Raises:
        Diverged: If the policy stops on this step.
    """
    loss_bad, norm_bad = _nonfinite(engine, log.loss, log.grad_norm)
    if not (loss_bad or norm_bad):
        return log
    if not norm_bad:
        # The engines skip an update only on a bad norm: this one was applied.
        raise Diverged(log, "the loss is not finite (with a finite gradient norm, so the "
                       "update was applied)")
    scaler_step = policy.loss_scaler and not loss_bad
    if policy.action == "stop" and not scaler_step:
        raise Diverged(log, "the loss or gradient norm is not finite "
                       "(training.on_nonfinite: stop)")
    if policy.limit is not None and not scaler_step and skipped + 1 > policy.limit:
        raise Diverged(log, f"{skipped + 1} steps skipped for an inf/nan loss or gradient, "
                       f"more than training.max_skipped_steps={policy.limit}")
    return replace(log, skipped=True)


def _loss(output) -> torch.Tensor:
    return output.loss if hasattr(output, "loss") else output


# A regulariser applied once per step: adds its gradient to the engine's local gradient
# shards and returns its value (`ncft.olora.add_penalty_grad`).
Penalty = Callable[[Engine], float]
# An in-graph term of one micro-batch, called right after that micro-batch's forward
# with the micro-batch itself; its value joins the loss before backward
# (`ncft.continual.distill.UnitDistill.aux_loss`).
AuxLoss = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def train_step(
    engine: Engine, micro_batches: Sequence[dict[str, torch.Tensor]], masks: RankMasks | None,
    penalty: Penalty | None = None, aux_loss: AuxLoss | None = None,
) -> tuple[float, float]:
    """Run one optimizer step over `micro_batches`; return (mean loss, grad norm).

    `penalty(engine)`, when given, runs after the last backward: it adds a
    regulariser's gradient to the local gradient shards (as if the regulariser were
    added to every micro-batch's loss) and returns its value, which the logged loss
    includes (O-LoRA's, `ncft.olora.add_penalty_grad`). `aux_loss(batch)`, when given,
    runs right after each micro-batch's forward (so it can read what forward hooks
    captured) and is added to that micro-batch's loss before backward; the logged
    loss includes it too.
    """
    total = 0.0
    for batch in micro_batches:
        loss = _loss(engine.forward(batch))
        if aux_loss is not None:
            loss = loss + aux_loss(batch)
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
    nonfinite: NonFinite | None = None,
    aux_loss: AuxLoss | None = None,
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
        nonfinite: What an inf/nan loss or gradient norm does (`NonFinite`); default
            stop. Checked on every rank before `on_step`, so a stop saves nothing.
        aux_loss: An in-graph term added to every micro-batch's loss (`train_step`).

    Returns:
        One `StepLog` per step taken (skipped steps marked).

    Raises:
        Diverged: At the step the policy stops on.
    """
    policy = nonfinite or NonFinite()
    logs: list[StepLog] = []
    for i, micro_batches in enumerate(steps, start=start_step + 1):
        loss, norm = train_step(engine, micro_batches, masks, penalty, aux_loss)
        skipped = sum(log.skipped for log in logs)
        log = check_finite(engine, StepLog(step=i, loss=loss, grad_norm=norm), policy, skipped)
        logs.append(log)
        if on_step is not None:
            on_step(log)
    return logs
