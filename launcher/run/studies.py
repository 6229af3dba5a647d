"""The studies `ncft run` adds around the training sequence (all ranks take part).

* `deactivation_study`, before the sequence: Leng & Xiong's deactivation grid.
* `neft_utilization`, after it: NeFT §6.1's utilization (max Pearson, ΔRank) per task.
* `weight_movement_rank_shift`, after it: our rank shift of the selection probe's
  `1 - cos` weight movement per task (not NeFT §6.1's measure).
* `similarity`, after it (rank 0): per-layer parameter similarity in the final model
  (ours, cheap); `paper_similarity` (all ranks): Leng & Xiong's own protocol.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from launcher.dist import barrier, print0
from launcher.run import neft
from launcher.spec import Spec
from ncft.analysis.neft_stats import selected_from_set
from ncft.analysis.neft_stats import weight_movement_rank_shift as movement_shift
from ncft.analysis.neft_utilization import utilization_shift
from ncft.analysis.similarity import layer_similarity
from ncft.arch import get_adapter
from ncft.continual.loop import TaskData
from ncft.data.examples import encode
from ncft.io import write_json
from ncft.masks.plan import freeze_unselected, install
from ncft.neuron_set import NeuronSet
from ncft.selection.pipeline import SelectionPipeline
from ncft.selection.topk import MLP_ROLES, selected_of
from ncft.studies.deactivation import deactivation_grid
from ncft.studies.finetune_matrix import finetune_matrix
from ncft.studies.similarity import paper_similarity as study
from ncft.studies.utilization import pearson_scores
from ncft.train import train

if TYPE_CHECKING:
    from launcher.run.backend import LauncherBackend


def deactivation_study(spec: Spec, backend: LauncherBackend, selector: SelectionPipeline,
                       tasks: list[TaskData]) -> None:
    """Tune on all tasks, select each task's units, switch them off (rank-0 JSON).

    Each task's units are chosen as method ncft would, on their own: not united with
    an earlier task's (whose set does not exist yet) and with no probe scores kept.
    """
    from itertools import islice


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
                  cfg=replace(selector.cfg, union_with_previous=False))
    sets = {}
    for stage, task in enumerate(tasks):
        sets[task.name] = own.select(engine, model, task, stage)
        backend.save_neurons(f"study-{task.name}", sets[task.name])
    encoded = {t.name: encode(t.test[: study.eval_examples], tok, t.max_length) for t in tasks}
    grid = deactivation_grid(engine, blocks, sets, encoded, spec.training.seed,
                             spec.eval.batch_size, tok.pad_token_id, log=print0,
                             mode=study.deactivation_mode)
    engine.close()
    if study.finetune_matrix:
        grid["finetune_matrix"] = _finetune_matrix(spec, backend, selector, tasks, sets, encoded)
    if backend.info.is_main_process:
        write_json(out, grid)
    barrier()


def _finetune_matrix(spec: Spec, backend: LauncherBackend, selector: SelectionPipeline,
                     tasks: list[TaskData], sets: dict[str, NeuronSet], encoded) -> dict:
    """Leng & Xiong Fig. 5 right half (`ncft.studies.finetune_matrix`), all ranks."""
    rates: set[float] = set()  # what the rows' optimizers really used (recorded)

    def make_engine(nset: NeuronSet | None):
        model = backend.load_model(None)
        if nset is None:
            return backend.build_engine(model), None
        freeze_unselected(model, nset.entries)
        engine = backend.build_engine(model)
        if spec.study.finetune_lr is not None:
            for group in engine.optimizer.param_groups:
                group["lr"] = spec.study.finetune_lr
        rates.update(group["lr"] for group in engine.optimizer.param_groups)
        return engine, install(engine, nset.entries)

    model = backend.load_model(None)
    blocks = get_adapter(model).mlp_blocks(model)
    del model
    print0(f"study: fine-tuning matrix, {spec.study.finetune_steps} steps per task's units")
    matrix = finetune_matrix(make_engine, lambda eng, i: selector.train_steps(eng, tasks[i], i),
                             blocks, sets, encoded, spec.study.finetune_steps, spec.training.seed,
                             spec.eval.batch_size, backend.tokenizer.pad_token_id, log=print0)
    return {**matrix, "lr": sorted(rates)}


def stage_source(method: str, stage: int) -> int | None:
    """The stage whose model a stage starts from (None: the base model)."""
    return None if method == "per_task" or stage == 0 else stage - 1


def neft_utilization(spec: Spec, backend: LauncherBackend, selector: SelectionPipeline,
                     tasks: list[TaskData]) -> dict[str, Any]:
    """NeFT §6.1 utilization shift of every task with a neuron set (all ranks; rank 0 dict).

    The two models compared are the one the task started from and the one it ended
    with (the paper compares two NeFT models, e.g. NeFT_6% vs NeFT_3%; before/after
    is the comparison a continual run has); "trained" neurons are the task's set.
    Definitions: `ncft.analysis.neft_utilization`. Stored per task, so a resumed run
    redoes none.
    """
    out: dict[str, Any] = {}
    study, tok = spec.study, backend.tokenizer
    for stage, task in enumerate(tasks):
        result_file = backend.run.neft_utilization(task.name)
        nfile = backend.run.neuron_file(task.name)
        if not nfile.is_file():
            continue
        if not result_file.is_file():
            encoded = encode(task.test[: study.eval_examples], tok, task.max_length)
            scores = {}
            for when, source in (("before", stage_source(spec.method, stage)), ("after", stage)):
                model = backend.load_model(source)
                groups = selector.groups(model)
                engine = backend.build_engine(model)
                print0(f"NeFT utilization: Pearson scores of {task.name}, {when} training")
                scores[when] = pearson_scores(engine, groups, encoded, spec.eval.batch_size,
                                              tok.pad_token_id)
                engine.close()
            if backend.info.is_main_process:
                nset = NeuronSet.load(nfile)
                for when, sc in scores.items():
                    neft.save_scores(backend.run.neft_pearson(task.name, when), sc)
                shift = utilization_shift(scores["before"], scores["after"],
                                          selected_of(nset, groups), study.neft_strong_fraction)
                write_json(result_file, shift)
            barrier()
        if backend.info.is_main_process:
            out[task.name] = json.loads(result_file.read_text())
    return out


def weight_movement_rank_shift(backend: LauncherBackend, selector: SelectionPipeline,
                               tasks: list[TaskData]) -> dict[str, Any]:
    """Our weight-movement rank shift of every task (all ranks; rank 0 gets the dict).

    NOT NeFT §6.1's utilization (that is `neft_utilization`). The score of a
    candidate row is NeFT's selection probe score (§4.2), `1 - cos` between the
    weights before and after `selection.cosine_steps` steps of full fine-tuning on the
    task. "Before" is the probe that chose the task's rows (on the task's starting
    model); "after" repeats the same probe, same steps and data order, on the model the
    task ended with. The shift says which rows the selective training made more or
    less moved (`ncft.analysis.neft_stats` categories: gained_trained,
    gained_untrained, lost, stable). Stored per task, so a resumed run redoes none.
    """
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
            print0(f"weight-movement rank shift: probing {task.name} after training")
            after, _ = selector.probe(engine, groups, task, stage)
            engine.close()
            if backend.info.is_main_process:
                saved = neft.load_scores(before_file)  # keys come back sorted: model order
                before = {g.name: saved[g.name] for g in groups}
                nset = NeuronSet.load(backend.run.neuron_file(task.name))
                shift = movement_shift(before, after, selected_from_set(nset, groups))
                shift["score"] = "1 - cos(w, w after cosine_steps of full fine-tuning)"
                neft.save_scores(backend.run.neft_scores(task.name, "after"), after)
                write_json(result_file, shift)
            barrier()
        if backend.info.is_main_process:
            out[task.name] = json.loads(result_file.read_text())
    return out


def similarity(backend: LauncherBackend, tasks: list[TaskData], matrix) -> dict | None:
    """Our cheap variant of Leng & Xiong Fig. 3: task-neuron params in the FINAL model.

    Not the paper's protocol (one fine-tuned model per task: `paper_similarity`); it
    goes to `results.similarity_final_model`. `generalization[i][j]` is the score on
    task j after training task i (`a[j][i]`), correlated with the similarity of i, j.
    """
    files = [backend.run.neuron_file(t.name) for t in tasks]
    if not all(f.is_file() for f in files):
        return None
    model = backend.load_full_model(len(tasks) - 1)
    blocks = get_adapter(model).mlp_blocks(model)
    sets = {t.name: NeuronSet.load(f) for t, f in zip(tasks, files)}
    if any(s.meta.get("unit", "neuron") != "neuron" for s in sets.values()):
        return None  # NeFT row sets have no FFN units to compare
    params = dict(model.named_parameters())
    sim = layer_similarity(blocks, {n: s.units(blocks) for n, s in sets.items()},
                           lambda fqn: params[fqn].detach())
    n = len(tasks)
    sim["generalization"] = [[matrix[j][i] for j in range(n)] for i in range(n)]
    sim["protocol"] = "final_model"
    return sim


def paper_similarity(spec: Spec, backend: LauncherBackend, selector: SelectionPipeline,
                     tasks: list[TaskData]) -> dict | None:
    """Leng & Xiong Fig. 3 as the paper does it (`ncft.studies.similarity`), all ranks.

    Stored in `RUN/similarity_paper.json`, so a resumed run does not redo it; rank 0
    gets the dict.
    """
    out = backend.run.similarity_paper
    if not out.is_file():
        tok, st = backend.tokenizer, spec.study
        roles = tuple(m for m in selector.cfg.modules if m in MLP_ROLES) or ("gate", "up", "down")
        # The paper's scorer on FFN units, so no selection fine-tunes M_i (module docstring).
        own = replace(selector, method="ncft", save_probe=None, reference=None,
                      cfg=replace(selector.cfg, scorer="grad_attribution", unit="neuron",
                                  modules=roles, union_with_previous=False))

        def make_engine():
            model = backend.load_model(None)
            for p in model.parameters():
                p.requires_grad_(True)
            return backend.build_engine(model), model

        encoded = {t.name: encode(t.test[: st.eval_examples], tok, t.max_length) for t in tasks}
        result = study(make_engine, lambda eng, i: selector.train_steps(eng, tasks[i], i),
                       lambda eng, model, j: own.select(eng, model, tasks[j], j),
                       [t.name for t in tasks], encoded, st.finetune_steps,
                       spec.eval.batch_size, tok.pad_token_id, log=print0)
        if backend.info.is_main_process:
            write_json(out, result)
        barrier()
    return json.loads(out.read_text()) if backend.info.is_main_process else None
