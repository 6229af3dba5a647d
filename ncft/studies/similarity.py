"""Leng & Xiong's parameter-similarity protocol (§5.2, Fig. 3, Table 4).

The paper: six full-parameter fine-tuned models M_1..M_6, one per training task; "In
a particular layer, for model M_i and test task T_j, P_i^i and P_j^i are used to
denote the task-specific neuron parameters of training task i and test task j in
M_i respectively. Cosine similarity between P_i^i and P_j^i is then computed", then
correlated with M_i's performance on T_j (Table 4, Pearson r). What we do, per task i
of the run (its tasks play both roles; the paper's test tasks were out-of-domain):

1. M_i: the base model with every parameter fine-tuned on task i for
   `study.finetune_steps` steps (the run's optimizer settings and data order);
2. on M_i, select the neurons of EVERY task j (P_j^i: "task j's neurons in M_i"),
   with Leng & Xiong's own scorer (§3, gradient attribution; FFN units) and the
   run's fraction, per-layer choice, token positions and example count, so a
   selection never fine-tunes M_i (NeFT's weight probe would);
3. per layer, the cosine of P_i^i and P_j^i read in M_i
   (`ncft.analysis.similarity.layer_similarity`, method "mean": the sets differ in
   membership, so the paper's "cosine between parameter sets" is taken between the
   sets' mean unit vectors; see that module);
4. M_i's teacher-forced answer accuracy (and loss) on every task j.

The report correlates mean-over-layers similarity with performance over the pairs
i != j (Pearson and Spearman), and per layer. Parameters are read one at a time
through `Engine.gathered` (full tensors on every rank, docs/architecture.md §2, rule 2).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import islice
from typing import Any

import torch
from torch import nn

from ncft.analysis.similarity import layer_similarity
from ncft.arch import get_adapter
from ncft.engine import Engine
from ncft.neuron_set import NeuronSet
from ncft.studies.deactivate import task_scores
from ncft.train import train

# () -> a fresh engine over the base model with every parameter trainable, and the model.
MakeEngine = Callable[[], tuple[Engine, nn.Module]]
# (engine, task index) -> endless micro-batch lists of that task's training data.
StepsOf = Callable[[Engine, int], Iterable[Sequence[dict[str, torch.Tensor]]]]
# (engine, model, task index) -> that task's unit NeuronSet, scored on the engine's model.
Select = Callable[[Engine, nn.Module, int], NeuronSet]


def _reader(engine: Engine) -> Callable[[str], torch.Tensor]:
    def get_param(fqn: str) -> torch.Tensor:
        with engine.gathered([fqn]) as full:
            return full[fqn].detach().to("cpu", copy=True)

    return get_param


def paper_similarity(
    make_engine: MakeEngine,
    steps_of: StepsOf,
    select: Select,
    tasks: Sequence[str],
    encoded_eval: Mapping[str, Sequence[Mapping[str, torch.Tensor]]],
    num_steps: int,
    batch_size: int,
    pad_id: int,
    log=print,
) -> dict[str, Any]:
    """Per task i: fine-tune M_i, select every task's neurons on it, compare, evaluate.

    Args:
        make_engine: Builds a fresh, fully trainable engine over the base model.
        steps_of: Training micro-batches of task i on an engine.
        select: Selects task j's units on the engine's (fine-tuned) model.
        tasks: Task names, in order.
        encoded_eval: Task name -> encoded evaluation examples.
        num_steps: Full fine-tuning steps of each M_i.
        batch_size: Evaluation examples per rank per forward.
        pad_id: Padding token id.
        log: Progress printer (rank 0's print).

    Returns:
        `results.json["similarity_paper"]`: `protocol`, `tasks`, `layers`, `steps`,
        `method`, `per_layer[i][j]` (per-layer cosine of P_i and P_j inside M_i),
        `mean[i][j]` (over layers), `performance[i][j]` (M_i's accuracy on T_j),
        `loss[i][j]`, `metric`, `num_units[i][j]`.
    """
    per_layer, mean, perf, loss, counts = [], [], [], [], []
    layers: list[int] = []
    for i, name in enumerate(tasks):
        engine, model = make_engine()
        log(f"similarity (paper): fine-tuning M_{i} on {name}, {num_steps} steps")
        train(engine, islice(steps_of(engine, i), num_steps), None)
        blocks = get_adapter(model).mlp_blocks(model)
        sets = {t: select(engine, model, j) for j, t in enumerate(tasks)}
        units = {t: s.units(blocks) for t, s in sets.items()}
        sim = layer_similarity(blocks, units, _reader(engine), method="mean")
        layers = sim["layers"]
        per_layer.append(sim["per_layer"][i])
        mean.append(sim["mean"][i])
        acc, task_loss = task_scores(engine, tasks, encoded_eval, batch_size, pad_id)
        perf.append(acc)
        loss.append(task_loss)
        counts.append([sum(len(v) for v in units[t].values()) for t in tasks])
        engine.close()
        log(f"similarity (paper): M_{i} mean similarity {dict(zip(tasks, mean[-1]))}, "
            f"accuracy {dict(zip(tasks, perf[-1]))}")
    return {
        "protocol": "paper", "tasks": list(tasks), "layers": layers, "steps": num_steps,
        "method": "mean", "per_layer": per_layer, "mean": mean, "performance": perf,
        "loss": loss, "metric": "teacher-forced answer accuracy", "num_units": counts,
    }


__all__ = ["paper_similarity"]
