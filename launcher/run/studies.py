"""The studies `ncft run` adds around the training sequence (all ranks take part).

* `deactivation_study`, before the sequence: Leng & Xiong's deactivation grid.
* `neft_rank_shift`, after it: NeFT's utilization rank shift per task.
* `similarity`, after it (rank 0): Leng & Xiong's per-layer parameter similarity.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from launcher.dist import print0
from launcher.run import neft
from launcher.spec import Spec
from ncft.continual.loop import TaskData
from ncft.data.examples import encode
from ncft.io import write_json
from ncft.neuron_set import NeuronSet
from ncft.selection.pipeline import SelectionPipeline

if TYPE_CHECKING:
    from launcher.run.backend import LauncherBackend


def deactivation_study(spec: Spec, backend: LauncherBackend, selector: SelectionPipeline,
                       tasks: list[TaskData]) -> None:
    """Tune on all tasks, select each task's units, switch them off (rank-0 JSON).

    Each task's units are chosen as method ncft would, on their own: not united with
    an earlier task's (whose set does not exist yet) and with no probe scores kept.
    """
    from itertools import islice

    from ncft.arch import get_adapter
    from ncft.studies.deactivation import deactivation_grid
    from ncft.train import train

    out = backend.run.deactivation
    if out.is_file():  # a resumed run keeps its study
        return
    tok, study = backend.tokenizer, spec.study
    model = backend.load_model(None)
    blocks = get_adapter(model).mlp_blocks(model)
    engine = backend.build_engine(model)
    mixed = TaskData("all-tasks", "classification", None,
                     [ex for t in tasks for ex in t.train], [], max(t.max_length for t in tasks))
    print0(f"study: tuning every parameter {study.finetune_steps} steps on all tasks")
    train(engine, islice(selector.train_steps(engine, mixed, -1), study.finetune_steps), None)
    own = replace(selector, method="ncft", save_probe=None,
                  cfg=replace(selector.cfg, union_with_previous=False))  # fmt: skip
    sets = {}
    for stage, task in enumerate(tasks):
        sets[task.name] = own.select(engine, model, task, stage)
        backend.save_neurons(f"study-{task.name}", sets[task.name])
    encoded = {t.name: encode(t.test[: study.eval_examples], tok, t.max_length) for t in tasks}
    grid = deactivation_grid(engine, blocks, sets, encoded, spec.training.seed,
                             spec.eval.batch_size, tok.pad_token_id, log=print0)  # fmt: skip
    if backend.info.is_main_process:
        write_json(out, grid)
    engine.close()
    dist.barrier()


def neft_rank_shift(backend: LauncherBackend, selector: SelectionPipeline,
                    tasks: list[TaskData]) -> dict[str, Any]:
    """NeFT's utilization rank shift of every task (all ranks; rank 0 gets the dict).

    Utilization of a candidate row is NeFT's own probe score, `1 - cos` between the
    weights before and after `selection.cosine_steps` steps of full fine-tuning on the
    task. "Before" is the probe that chose the task's rows (on the task's starting
    model); "after" repeats the same probe, same steps and data order, on the model the
    task ended with. The shift says which rows the selective training made more or
    less utilized: trained rows that gained rank are strongly affected, untrained rows
    that gained rank are indirectly affected, rows that lost rank are suppressed
    (`ncft.analysis.neft_stats`). Stored per task, so a resumed run redoes none.
    """
    from ncft.analysis.neft_stats import selected_from_set, utilization_shift

    out = {}
    for stage, task in enumerate(tasks):
        before_file = backend.run.neft_scores(task.name, "before")
        result_file = backend.run.neft_shift(task.name)
        if not before_file.is_file():
            continue
        if not result_file.is_file():
            model = backend.load_model(stage)
            engine = backend.build_engine(model)
            groups = selector.groups(model)
            print0(f"NeFT rank shift: probing {task.name} after training")
            after, _ = selector.probe(engine, groups, task, stage)
            engine.close()
            if backend.info.is_main_process:
                saved = neft.load_scores(before_file)  # keys come back sorted: model order
                before = {g.name: saved[g.name] for g in groups}
                nset = NeuronSet.load(backend.run.neuron_file(task.name))
                shift = utilization_shift(before, after, selected_from_set(nset, groups))
                shift["utilization"] = "1 - cos(w, w after cosine_steps of full fine-tuning)"
                neft.save_scores(backend.run.neft_scores(task.name, "after"), after)
                write_json(result_file, shift)
            dist.barrier()
        if backend.info.is_main_process:
            out[task.name] = json.loads(result_file.read_text())
    return out


def similarity(backend: LauncherBackend, tasks: list[TaskData], matrix) -> dict | None:
    """Leng & Xiong Fig. 3 on the final model: per-layer cosine of task-neuron params.

    `generalization[i][j]` is the score on task j after training task i (`a[j][i]`),
    so its correlation with the similarity of tasks i and j is the paper's question.
    """
    from ncft.analysis.similarity import layer_similarity
    from ncft.arch import get_adapter

    files = [backend.run.neuron_file(t.name) for t in tasks]
    if not all(f.is_file() for f in files):
        return None
    model = backend.load_model(len(tasks) - 1)
    blocks = get_adapter(model).mlp_blocks(model)
    sets = {t.name: NeuronSet.load(f) for t, f in zip(tasks, files)}
    if any(s.meta.get("unit", "neuron") != "neuron" for s in sets.values()):
        return None  # NeFT row sets have no FFN units to compare
    params = dict(model.named_parameters())
    sim = layer_similarity(blocks, {n: s.units(blocks) for n, s in sets.items()},
                           lambda fqn: params[fqn].detach())  # fmt: skip
    n = len(tasks)
    sim["generalization"] = [[matrix[j][i] for j in range(n)] for i in range(n)]
    return sim
