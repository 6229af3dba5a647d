"""The studies a run adds around its training sequence, on the run's engines and files.

`RunStudies` runs each study of `ncft.studies` for the tasks of one run (all ranks
take part; rank 0 writes the results into the run directory, `ncft.run_paths`):

* `deactivation`, before the sequence: Leng & Xiong's deactivation grid (and, with
  `study.finetune_matrix`, the fine-tuning matrix).
* `neft_utilization`, after it: NeFT §6.1's utilization (max Pearson, ΔRank) per task.
* `rank_shift`, after it: our rank shift of the selection probe's `1 - cos` weight
  movement per task (not NeFT §6.1's measure).
* `final_model_similarity`, after it (rank 0): per-layer parameter similarity in the
  final model (ours, cheap); `per_task_model_similarity` (all ranks): Leng & Xiong's protocol.

Each result is stored as soon as it exists, so a resumed run redoes none. The
services come from a `StudyBackend` (the launcher's `LauncherBackend`); nothing here
imports the launcher.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import islice
from typing import Any, Protocol

from torch import nn

from ncft.analysis.neft_stats import selected_from_set, weight_movement_rank_shift
from ncft.analysis.neft_utilization import utilization_shift
from ncft.analysis.similarity import layer_similarity
from ncft.arch import get_adapter
from ncft.continual.config import StudyConfig
from ncft.continual.methods import method
from ncft.continual.task import TaskData
from ncft.data.examples import encode
from ncft.engine import Engine
from ncft.io import write_json
from ncft.masks.install import freeze_unselected, install
from ncft.neuron_set import NeuronSet
from ncft.run_paths import RunPaths
from ncft.scoring.groups import MLP_ROLES
from ncft.selection.pipeline import SelectionPipeline
from ncft.selection.topk import selected_of
from ncft.studies import score_files
from ncft.studies.deactivation import TaskMetric, deactivation_grid
from ncft.studies.finetune_matrix import finetune_matrix
from ncft.studies.similarity import paper_similarity
from ncft.studies.utilization import pearson_scores
from ncft.train import train

# (engine, task, examples) -> `evaluate_task`'s result under the run's settings.
Evaluate = Callable[[Engine, TaskData, list], dict[str, Any]]


class StudyBackend(Protocol):
    """What the studies need from the launcher: models, engines, files, rank-0 output."""

    tokenizer: Any
    run: RunPaths
    is_main_process: bool

    def load_model(self, stage: int | None) -> nn.Module:
        """The model after stage `stage` (None: the base), as for `build_engine`."""

    def load_full_model(self, stage: int | None) -> nn.Module:
        """The whole model with real weights on this rank."""

    def build_engine(self, model: nn.Module, keep_weights: bool = False) -> Engine:
        """Wrap a model whose frozen parameters are marked."""

    def save_neurons(self, task: str, nset: NeuronSet) -> None:
        """Persist a NeuronSet under `neurons/<task>` (rank 0)."""

    def log_line(self, text: str) -> None:
        """Print a progress line once (rank 0)."""

    def barrier(self) -> None:
        """Wait for every rank (rank 0 has written what the others read next)."""


@dataclass
class RunStudies:
    """The studies of one run (module docstring); every method runs on all ranks.

    Attributes:
        study: The spec's `study` section.
        backend: Models, engines and the run directory.
        selector: The run's selection pipeline (each study reselects with it).
        tasks: The run's tasks, in order.
        method: The run's method (where each stage started).
        seed: `training.seed` (the random controls).
        batch_size: `eval.batch_size` (every study's forward passes).
        evaluate: A task's score by its own evaluation measure under the run's
            settings (`ContinualLoop.evaluate_one`); with `study.task_metric` the
            deactivation and fine-tuning matrices are also scored by it.
    """

    study: StudyConfig
    backend: StudyBackend
    selector: SelectionPipeline
    tasks: list[TaskData]
    method: str
    seed: int
    batch_size: int
    evaluate: Evaluate | None = None

    def deactivation(self) -> None:
        """Tune on all tasks, select each task's units, switch them off (rank-0 JSON).

        Each task's units are chosen as method ncft would, on their own: not united with
        an earlier task's (whose set does not exist yet) and with no probe scores kept.
        With `evaluate` and `study.task_metric`, every cell is also scored by each
        task's own evaluation measure on its first `study.eval_examples` test examples.
        """
        backend, selector, tasks, study = self.backend, self.selector, self.tasks, self.study
        out = backend.run.deactivation
        if out.is_file():  # a resumed run keeps its study
            return
        tok = backend.tokenizer
        model = backend.load_model(None)
        blocks = get_adapter(model).mlp_blocks(model)
        engine = backend.build_engine(model)
        mixed = TaskData("all-tasks", "classification", None,
                         [ex for t in tasks for ex in t.train], [],
                         max(t.max_length for t in tasks))
        backend.log_line(f"study: tuning every parameter {study.finetune_steps} steps on all "
                         "tasks")
        train(engine, islice(selector.train_steps(engine, mixed, -1), study.finetune_steps),
              None)
        own = replace(selector, method="ncft", save_probe=None,
                      cfg=replace(selector.cfg, union_with_previous=False))
        sets = {}
        for stage, task in enumerate(tasks):
            sets[task.name] = own.select(engine, model, task, stage)
            backend.save_neurons(f"study-{task.name}", sets[task.name])
        encoded = {t.name: encode(t.test[: study.eval_examples], tok, t.max_length)
                   for t in tasks}
        metric = self._task_metric()
        grid = deactivation_grid(engine, blocks, sets, encoded, self.seed, self.batch_size,
                                 tok.pad_token_id, log=backend.log_line,
                                 mode=study.deactivation_mode, task_metric=metric)
        engine.close()
        if study.finetune_matrix:
            grid["finetune_matrix"] = self._finetune_matrix(sets, encoded, metric)
        if backend.is_main_process:
            write_json(out, grid)
        backend.barrier()

    def _task_metric(self) -> TaskMetric | None:
        """Every task's score by its own measure on an engine, or None (`task_metric`)."""
        evaluate, tasks, n = self.evaluate, self.tasks, self.study.eval_examples
        if evaluate is None or not self.study.task_metric:
            return None
        return lambda engine: [evaluate(engine, t, t.test[:n])["score"] for t in tasks]

    def _finetune_matrix(self, sets: dict[str, NeuronSet], encoded,
                         metric: TaskMetric | None = None) -> dict:
        """Leng & Xiong Fig. 5 right half (`ncft.studies.finetune_matrix`), all ranks."""
        backend, study = self.backend, self.study
        rates: set[float] = set()  # what the rows' optimizers really used (recorded)

        def make_engine(nset: NeuronSet | None):
            model = backend.load_model(None)
            if nset is None:
                return backend.build_engine(model), None
            freeze_unselected(model, nset.entries)
            engine = backend.build_engine(model)
            if study.finetune_lr is not None:
                for group in engine.optimizer.param_groups:
                    group["lr"] = study.finetune_lr
            rates.update(group["lr"] for group in engine.optimizer.param_groups)
            return engine, install(engine, nset.entries)

        model = backend.load_model(None)
        blocks = get_adapter(model).mlp_blocks(model)
        del model
        backend.log_line(f"study: fine-tuning matrix, {study.finetune_steps} steps per "
                         "task's units")
        matrix = finetune_matrix(
            make_engine, lambda eng, i: self.selector.train_steps(eng, self.tasks[i], i),
            blocks, sets, encoded, study.finetune_steps, self.seed, self.batch_size,
            backend.tokenizer.pad_token_id, log=backend.log_line, task_metric=metric)
        return {**matrix, "lr": sorted(rates)}

    def _source(self, stage: int) -> int | None:
        """The stage whose model a stage starts from (None: the base model)."""
        return None if method(self.method).from_base or stage == 0 else stage - 1

    def neft_utilization(self) -> dict[str, Any]:
        """NeFT §6.1 utilization shift of every task with a neuron set (rank 0 gets the dict).

        The two models compared are the one the task started from and the one it ended
        with (the paper compares two NeFT models, e.g. NeFT_6% vs NeFT_3%; before/after
        is the comparison a continual run has); "trained" neurons are the task's set.
        Definitions: `ncft.analysis.neft_utilization`. Stored per task.
        """
        backend, study, tok = self.backend, self.study, self.backend.tokenizer
        out: dict[str, Any] = {}
        for stage, task in enumerate(self.tasks):
            result_file = backend.run.neft_utilization(task.name)
            nfile = backend.run.neuron_file(task.name)
            if not nfile.is_file():
                continue
            if not result_file.is_file():
                encoded = encode(task.test[: study.eval_examples], tok, task.max_length)
                scores = {}
                for when, source in (("before", self._source(stage)), ("after", stage)):
                    model = backend.load_model(source)
                    groups = self.selector.groups(model)
                    engine = backend.build_engine(model)
                    backend.log_line(f"NeFT utilization: Pearson scores of {task.name}, "
                                     f"{when} training")
                    scores[when] = pearson_scores(engine, groups, encoded, self.batch_size,
                                                  tok.pad_token_id)
                    engine.close()
                if backend.is_main_process:
                    nset = NeuronSet.load(nfile)
                    for when, sc in scores.items():
                        score_files.save_scores(backend.run.neft_pearson(task.name, when), sc)
                    shift = utilization_shift(scores["before"], scores["after"],
                                              selected_of(nset, groups),
                                              study.neft_strong_fraction)
                    write_json(result_file, shift)
                backend.barrier()
            if backend.is_main_process:
                out[task.name] = json.loads(result_file.read_text())
        return out

    def rank_shift(self) -> dict[str, Any]:
        """Our weight-movement rank shift of every task (rank 0 gets the dict).

        NOT NeFT §6.1's utilization (that is `neft_utilization`). The score of a
        candidate row is NeFT's selection probe score (§4.2), `1 - cos` between the
        weights before and after `selection.cosine_steps` steps of full fine-tuning on
        the task. "Before" is the probe that chose the task's rows (on the task's
        starting model); "after" repeats the same probe, same steps and data order, on
        the model the task ended with. The shift says which rows the selective training
        made more or less moved (`ncft.analysis.neft_stats` categories: gained_trained,
        gained_untrained, lost, stable). Stored per task.
        """
        backend, out = self.backend, {}
        for stage, task in enumerate(self.tasks):
            before_file = backend.run.neft_scores(task.name, "before")
            result_file = backend.run.neft_shift(task.name)
            if not before_file.is_file():
                continue
            if not result_file.is_file():
                model = backend.load_model(stage)
                engine = backend.build_engine(model)
                groups = self.selector.groups(model)
                backend.log_line(f"weight-movement rank shift: probing {task.name} after "
                                 "training")
                after, _ = self.selector.probe(engine, groups, task, stage)
                engine.close()
                if backend.is_main_process:
                    saved = score_files.load_scores(before_file)  # sorted keys: model order
                    before = {g.name: saved[g.name] for g in groups}
                    nset = NeuronSet.load(backend.run.neuron_file(task.name))
                    shift = weight_movement_rank_shift(before, after,
                                                       selected_from_set(nset, groups))
                    shift["score"] = "1 - cos(w, w after cosine_steps of full fine-tuning)"
                    score_files.save_scores(backend.run.neft_scores(task.name, "after"), after)
                    write_json(result_file, shift)
                backend.barrier()
            if backend.is_main_process:
                out[task.name] = json.loads(result_file.read_text())
        return out

    def final_model_similarity(self, matrix) -> dict | None:
        """Our cheap variant of Leng & Xiong Fig. 3: task-neuron params in the FINAL model.

        Rank 0 only. Not the paper's protocol (one fine-tuned model per task:
        `per_task_model_similarity`); it goes to `results.similarity_final_model`.
        `generalization[i][j]` is the score on task j after training task i (`a[j][i]`),
        correlated with the similarity of i, j.
        """
        tasks = self.tasks
        files = [self.backend.run.neuron_file(t.name) for t in tasks]
        if not all(f.is_file() for f in files):
            return None
        model = self.backend.load_full_model(len(tasks) - 1)
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

    def per_task_model_similarity(self) -> dict | None:
        """Leng & Xiong Fig. 3 as the paper does it (`ncft.studies.similarity`), all ranks.

        Stored in `RUN/similarity_paper.json`; rank 0 gets the dict.
        """
        backend, selector, tasks = self.backend, self.selector, self.tasks
        out = backend.run.similarity_paper
        if not out.is_file():
            tok, st = backend.tokenizer, self.study
            roles = tuple(m for m in selector.cfg.modules if m in MLP_ROLES) or \
                ("gate", "up", "down")
            # The paper's scorer on FFN units, so no selection fine-tunes M_i (module
            # docstring of ncft.studies.similarity).
            own = replace(selector, method="ncft", save_probe=None, reference=None,
                          cfg=replace(selector.cfg, scorer="grad_attribution", unit="neuron",
                                      modules=roles, union_with_previous=False))

            def make_engine():
                model = backend.load_model(None)
                for p in model.parameters():
                    p.requires_grad_(True)
                return backend.build_engine(model), model

            encoded = {t.name: encode(t.test[: st.eval_examples], tok, t.max_length)
                       for t in tasks}
            result = paper_similarity(
                make_engine, lambda eng, i: selector.train_steps(eng, tasks[i], i),
                lambda eng, model, j: own.select(eng, model, tasks[j], j),
                [t.name for t in tasks], encoded, st.finetune_steps, self.batch_size,
                tok.pad_token_id, log=backend.log_line)
            if backend.is_main_process:
                write_json(out, result)
            backend.barrier()
        return json.loads(out.read_text()) if backend.is_main_process else None
