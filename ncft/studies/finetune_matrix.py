"""Leng & Xiong's fine-tuning matrix (their Fig. 5, right half; §4.1, Table 2).

The paper: "only task-specific neurons were updated with parameters and other
neurons were frozen during training", compared with as many random neurons and with
zero-shot; Fig. 5's entry (i, j) is the change on task j after fine-tuning task i's
neurons. Open points, and what we chose:

* Start: the base (pre-trained) model, whose scores are the zero-shot baseline, as in
  Table 2. The neurons are those the deactivation study found (on the model tuned on
  all tasks), so both halves of Fig. 5 use the same sets.
* Budget: the same number of optimizer steps for every row (`study.finetune_steps`),
  on task i's training data only, with the run's optimizer settings.
* Score: the deactivation study's teacher-forced answer accuracy and loss on each
  task's evaluation examples; the matrix stores raw scores, the change is
  `row - baseline` (`ncft.analysis.results.finetune_matrix`). With `task_metric`,
  also each task's own evaluation measure (as the paper scores), under `task_metric`.
* Control: the same count of random units per layer (seed `seed + i`), trained the
  same way (Table 2's "Random").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import islice
from typing import Any

import torch

from ncft.arch import MlpBlock
from ncft.engine import Engine
from ncft.masks.install import RankMasks
from ncft.neuron_set import NeuronSet
from ncft.studies.deactivate import random_units, task_scores
from ncft.studies.deactivation import TASK_METRIC, TaskMetric
from ncft.train import train

# NeuronSet -> a fresh engine over the base model with only the set's parameters
# trainable and its masks; None -> the base model only to evaluate (masks None).
MakeEngine = Callable[[NeuronSet | None], tuple[Engine, RankMasks | None]]
# (engine, task index) -> endless micro-batch lists of that task's training data.
StepsOf = Callable[[Engine, int], Iterable[Sequence[dict[str, torch.Tensor]]]]


def finetune_matrix(
    make_engine: MakeEngine,
    steps_of: StepsOf,
    blocks: Sequence[MlpBlock],
    sets: Mapping[str, NeuronSet],
    encoded_eval: Mapping[str, Sequence[Mapping[str, torch.Tensor]]],
    num_steps: int,
    seed: int,
    batch_size: int,
    pad_id: int,
    log=print,
    task_metric: TaskMetric | None = None,
) -> dict[str, Any]:
    """Train only task i's units (and, as control, random units), score every task j.

    Args:
        make_engine: Builds a fresh base-model engine training only a set.
        steps_of: Training micro-batches of task i on an engine.
        blocks: MLP blocks of the unwrapped model.
        sets: Task name -> that task's unit NeuronSet, in task order.
        encoded_eval: Task name -> encoded evaluation examples.
        num_steps: Optimizer steps per row.
        seed: Seed of the random control sets (per task: `seed + i`).
        batch_size: Evaluation examples per rank per forward.
        pad_id: Padding token id.
        log: Progress printer (rank 0's print).
        task_metric: Also score by each task's own measure (a collective).

    Returns:
        `results.json["deactivation"]["finetune_matrix"]`: `tasks`, `metric`,
        `steps`, `start`, `baseline[j]` (zero-shot), `task_neurons_trained[i][j]`,
        `random_trained[i][j]`, the same three for the loss under `loss`, and with
        `task_metric` the same layout under `task_metric`.
    """
    tasks = list(sets)
    engine, _ = make_engine(None)
    own: dict[str, Any] = {"baseline": None, "task_neurons_trained": [], "random_trained": []}
    if task_metric is not None:
        own["baseline"] = task_metric(engine)
    base_acc, base_loss = task_scores(engine, tasks, encoded_eval, batch_size, pad_id)
    engine.close()
    log(f"fine-tuning matrix: zero-shot accuracy {dict(zip(tasks, base_acc))}")
    rows: dict[str, list[list[float]]] = {k: [] for k in ("acc", "loss", "racc", "rloss")}
    for i, name in enumerate(tasks):
        units = sets[name].units(blocks)
        control = NeuronSet.from_units(list(blocks), random_units(units, blocks, seed + i))
        for nset, acc_key, loss_key, own_key in (
                (sets[name], "acc", "loss", "task_neurons_trained"),
                (control, "racc", "rloss", "random_trained")):
            engine, masks = make_engine(nset)
            train(engine, islice(steps_of(engine, i), num_steps), masks)
            if task_metric is not None:
                own[own_key].append(task_metric(engine))
            acc, loss = task_scores(engine, tasks, encoded_eval, batch_size, pad_id)
            engine.close()
            rows[acc_key].append(acc)
            rows[loss_key].append(loss)
        log(f"fine-tuning matrix: {name} units trained -> {dict(zip(tasks, rows['acc'][-1]))}, "
            f"random -> {dict(zip(tasks, rows['racc'][-1]))}")
    out = {
        "tasks": tasks, "metric": "teacher-forced answer accuracy", "steps": num_steps,
        "start": "base model (zero-shot baseline)",
        "baseline": base_acc, "task_neurons_trained": rows["acc"], "random_trained": rows["racc"],
        "loss": {"baseline": base_loss, "task_neurons_trained": rows["loss"],
                 "random_trained": rows["rloss"]},
    }
    if task_metric is not None:
        out["task_metric"] = {"tasks": tasks, "metric": TASK_METRIC, **own}
    return out


__all__ = ["finetune_matrix"]
