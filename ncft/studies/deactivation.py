"""Leng & Xiong's specificity check (their Fig. 5), on a model tuned on all tasks.

On a zero-shot model the top units of different tasks are mostly shared "answer
the prompt" units (our pilot: IoU 0.38-0.57 between tasks, random sets 0.07), so the
papers deactivate neurons of a model first fine-tuned on the tasks. The study here:
1. fine-tune every parameter for a few steps on the union of the tasks' data;
2. score each task's units by gradient attribution on that model and keep the top
   fraction;
3. evaluate every task with each task's units switched off, and with as many random
   units per layer switched off. Leng & Xiong (4.1) switch neurons off "by setting
   the activation value of these neurons to zero or by directly setting the
   corresponding parameter to zero"; `mode` picks one:
   - "activation": a forward pre-hook zeroes the unit's activation where it enters
     the down projection (`ncft.studies.deactivate.deactivate_activations`), no weight edit;
   - "weights": zero every parameter the unit owns (`ncft.arch.unit_entries`): its
     gate_proj and up_proj ROWS and their bias elements, and its down_proj COLUMN
     (fc_in row and bias, fc_out column for a plain MLP); restored bit for bit after.
   Both give the same logits: with the up (fc_in) row and bias zero the unit's
   activation is exactly `act(gate) * 0 = 0` (`gelu(0) = 0`), and a zero down column
   adds exactly nothing, so the down projection sums the same terms.

The score is teacher-forced answer accuracy (every answer token is the argmax), one
forward per example, so the (tasks + 1) x tasks x 2 grid stays affordable on CPU;
the answer loss is reported beside it. The paper scores each task by its own
evaluation measure (accuracy of the predicted label, ROUGE/BLEU for generation);
given `task_metric` (the run's `evaluate_task` per task, `study.task_metric`), every
cell is also scored that way, under `task_metric` in the same layout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ncft.arch import MlpBlock
from ncft.engine import Engine
from ncft.neuron_set import NeuronSet
from ncft.studies.deactivate import (
    deactivate_activations,
    deactivate_weights,
    random_units,
    task_scores,
)

MODES = ("activation", "weights")
# engine -> every task's score by its own evaluation measure, in task order.
TaskMetric = Callable[[Engine], list[float]]
TASK_METRIC = "each task's own evaluation measure (eval.classification, eval.metrics)"


def deactivation_grid(
    engine: Engine,
    blocks: Sequence[MlpBlock],
    sets: Mapping[str, NeuronSet],
    encoded_eval: Mapping[str, Sequence[Mapping[str, torch.Tensor]]],
    seed: int,
    batch_size: int,
    pad_id: int,
    log=print,
    mode: str = "activation",
    task_metric: TaskMetric | None = None,
) -> dict[str, Any]:
    """Score every task with each task's units off, and with random units off.

    Args:
        engine: The engine holding the (multi-task tuned) model.
        blocks: MLP blocks of the unwrapped model.
        sets: Task name -> that task's unit NeuronSet, in task order.
        encoded_eval: Task name -> encoded evaluation examples.
        seed: Seed of the random control sets (per task: `seed + i`).
        batch_size: Examples per rank per forward.
        pad_id: Padding token id.
        log: Progress printer (rank 0's print).
        mode: "activation" or "weights" (module docstring; `study.deactivation_mode`).
        task_metric: Also score every cell by each task's own measure (a collective).

    Returns:
        The `results.json["deactivation"]` block read by `ncft.analysis`: `tasks`,
        `metric`, `baseline[j]`, `task_neurons_off[i][j]`, `random_off[i][j]`, the
        same three for the answer loss under `loss`, and with `task_metric` the same
        layout (`tasks`, `metric`, `baseline`, ...) under `task_metric`.
    """
    if mode not in MODES:
        raise ValueError(f"study.deactivation_mode must be one of {MODES}, got {mode!r}")
    tasks = list(sets)

    def off(units):
        if mode == "activation":
            return deactivate_activations(engine, blocks, units)
        return deactivate_weights(engine, NeuronSet.from_units(blocks, units))

    own: dict[str, Any] = {"baseline": None, "task_neurons_off": [], "random_off": []}

    def grid_row(key: str) -> tuple[list[float], list[float]]:
        if task_metric is not None:
            scores = task_metric(engine)
            own[key] = scores if key == "baseline" else [*own[key], scores]
        return task_scores(engine, tasks, encoded_eval, batch_size, pad_id)

    base_acc, base_loss = grid_row("baseline")
    log(f"deactivation: baseline accuracy {dict(zip(tasks, base_acc))}")
    off_acc, off_loss, rnd_acc, rnd_loss = [], [], [], []
    for i, name in enumerate(tasks):
        units = sets[name].units(blocks)
        with off(units):
            acc, loss = grid_row("task_neurons_off")
        off_acc.append(acc)
        off_loss.append(loss)
        with off(random_units(units, blocks, seed + i)):
            acc, loss = grid_row("random_off")
        rnd_acc.append(acc)
        rnd_loss.append(loss)
        log(f"deactivation: {name} units off -> {dict(zip(tasks, off_acc[-1]))}, "
            f"random -> {dict(zip(tasks, rnd_acc[-1]))}")
    out = {
        "tasks": tasks, "metric": "teacher-forced answer accuracy", "mode": mode,
        "baseline": base_acc, "task_neurons_off": off_acc, "random_off": rnd_acc,
        "loss": {"baseline": base_loss, "task_neurons_off": off_loss, "random_off": rnd_loss},
        "num_units": {t: sum(len(v) for v in sets[t].units(blocks).values()) for t in tasks},
    }
    if task_metric is not None:
        out["task_metric"] = {"tasks": tasks, "metric": TASK_METRIC, **own}
    return out
