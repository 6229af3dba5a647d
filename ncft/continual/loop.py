"""One loop for every method: per task select, train, evaluate everything, checkpoint.

Each task is a *stage* with its own engine, built from the previous stage's
checkpoint (or the base model), so every stage freezes exactly what it does not
train (docs/architecture.md §3, rule 5) and starts with a fresh optimizer, and a
resumed run rebuilds the same state from disk. The loop needs a few services from the launcher
(`Backend`), which owns engines and files, and a `Selector` that chooses each
stage's neurons (`ncft.selection.pipeline`); it never imports an engine library.

What each method trains and where its stages start is one table,
`ncft.continual.methods.METHODS`; the loop reads it and never tests method names.
W-NCFT evaluates each task with the tasks' neurons mixed (`ncft.continual.wncft`;
per example with `wncft.query: example`, `ncft.continual.routing`). O-LoRA adds a new
adapter per stage and its penalty to the loss (`ncft.olora`). With
`training.unit_distill_weight` > 0 (ncft's own, `ncft.continual.distill`), stages after
the first keep the earlier tasks' units' activations on the current task's inputs.

Resume: a stage commits with `Backend.save_stage`. The W-NCFT task store is written
just before (so a committed stage always has its task in the store); a resumed run
drops what the store holds beyond the committed stages (`TaskStore.truncated`), so a
kill between the store write and the commit re-captures that task cleanly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ncft import olora, sparse_delta
from ncft.arch import get_adapter
from ncft.continual import distill, routing, wncft
from ncft.continual.config import LoopConfig
from ncft.continual.methods import method
from ncft.continual.metrics import cl_summary
from ncft.continual.services import Backend, Selector
from ncft.continual.state import LoopState
from ncft.continual.task import TaskData, check_room, stage_steps
from ncft.engine import Engine
from ncft.evaluate import evaluate_task
from ncft.generation import label_set_share
from ncft.masks.install import freeze_unselected, install
from ncft.neuron_set import NeuronSet
from ncft.train import AuxLoss, Diverged, NonFinite, StepLog, train

__all__ = ["ContinualLoop"]


def _with_label_share(task: TaskData, result: dict[str, Any]) -> dict[str, Any]:
    """`result` with `in_label_set` (`label_set_share`) for a classification task."""
    if task.format == "classification" and result.get("predictions"):
        result["in_label_set"] = label_set_share(result["predictions"], task.labels)
    return result


class ContinualLoop:
    """Runs the stages of one experiment (see module docstring)."""

    def __init__(
        self, cfg: LoopConfig, tasks: Sequence[TaskData], backend: Backend,
        store_dir: Path | None = None, selector: Selector | None = None,
    ) -> None:
        self.cfg, self.tasks, self.backend = cfg, list(tasks), backend
        t = cfg.training
        self._nonfinite = NonFinite(t.on_nonfinite, t.max_skipped_steps, cfg.loss_scaler)
        self.selector = selector
        self.store_dir = store_dir
        self.store = wncft.TaskStore()
        self.row = method(cfg.method)

    # ---- the run --------------------------------------------------------------
    def run(self, start_stage: int = 0, state: LoopState | None = None) -> LoopState:
        """Run stages `start_stage..`, continuing `state` (a resumed run's)."""
        n = len(self.tasks)
        check_room(self.tasks, self.backend.tokenizer)
        state = state or LoopState(matrix=[[None] * n for _ in range(n)])
        if self.cfg.eval.zero_shot and state.zero_shot is None:
            state.zero_shot = self._zero_shot()
        if start_stage and self.row.mixes and self.store_dir is not None:
            # Tasks captured past the last committed stage are redone by this run.
            self.store = wncft.TaskStore.load(self.store_dir).truncated(start_stage)
        for stage in range(start_stage, n):
            self._stage(stage, state)
        return state

    def reevaluate(self) -> LoopState:
        """Evaluate every stage of a finished run again; train nothing.

        Each stage's engine is built from the stage's saved weights and NeuronSet
        (`Backend.load_model(stage)`, `Backend.load_neurons`), marked trainable as its
        training engine was, and evaluated as `run` evaluates it under this loop's
        settings. W-NCFT's store is captured as in `run`: task i's values after
        training are stage i's weights, its values before are stage i - 1's (the base
        model's for i = 0), its vector comes from stage i's model. So a W-NCFT
        evaluation of an NCFT run (the two train identically) gives what a full W-NCFT
        run gives (`ncft eval`, tests/launcher/run/test_reevaluate.py).
        """
        n = len(self.tasks)
        state = LoopState(matrix=[[None] * n for _ in range(n)])
        sets = [self.backend.load_neurons(t.name) if self.row.selects else None
                for t in self.tasks]
        before = None
        if self.row.mixes:
            assert not self.row.from_base, "W-NCFT stages continue the previous one"
            engine = self._eval_engine(None, sets[0])
            before = wncft.snapshot(engine, sets[0])
            engine.close()
        for stage, task in enumerate(self.tasks):
            self.backend.log_line(f"stage {stage + 1}/{n}: {task.name} (evaluation only)")
            engine = self._eval_engine(stage, sets[stage])
            if self.row.mixes:
                self._capture(engine, task, sets[stage], before)
                if stage + 1 < n:  # the next task's neurons before its training
                    before = wncft.snapshot(engine, sets[stage + 1])
            self._evaluate(engine, stage, state)
            engine.close()
        return state

    def _eval_engine(self, stage: int | None, nset: NeuronSet | None) -> Engine:
        """An engine over the weights after `stage` (None: the base model).

        Its trainable parameters are those a training engine of this method has.
        """
        model = self.backend.load_model(stage)
        if nset is not None:
            freeze_unselected(model, nset.entries)
        elif not self.row.lora:  # LoRA models come with their adapters marked
            for p in model.parameters():
                p.requires_grad_(True)
        return self.backend.build_engine(model)

    def summary(self, state: LoopState,
                reference: dict[str, Sequence[float | None]] | None = None) -> dict[str, Any]:
        """results.json payload: tasks, matrix, CL summary, per-task details.

        Args:
            state: The finished run's bookkeeping.
            reference: `A_i` per task from a `per_task` run (`reference_scores`), keyed
                by read-out ("calibrated" / "raw"); adds FG (eq. 5) to the summaries.

        With calibration on, the uncalibrated read-out of the same forwards gets its own
        `raw_matrix` and `raw_summary` (never mixed into `matrix`); with `zero_shot`, the
        base model's scores give forward transfer. `in_label_set[i][j]` is the share of
        task i's answers after stage j that are one of task i's labels.
        """
        names = [t.name for t in self.tasks]
        reference = reference or {}
        calibrated = self.cfg.eval.calibration != "none"
        base = [(d or {}).get("score") for d in state.zero_shot or []] or None
        out = {
            "tasks": names, "method": self.cfg.method, "matrix": state.matrix,
            "summary": self._cl(state.matrix, names, base,
                                reference.get("calibrated" if calibrated else "raw")),
            "details": state.details,
            "in_label_set": state.cells(names, "in_label_set"),
            "skipped_steps": state.skipped_steps,
            # How scores were obtained: `ncft compare` and the report show it.
            "protocol": {"classification": self.cfg.eval.classification,
                         "calibration": self.cfg.eval.calibration,
                         "wncft_query": self.cfg.wncft.query if self.row.mixes else None},
        }
        if state.zero_shot is not None:
            out["zero_shot"] = base
        if calibrated:
            raw = [[v if v is None else v.get("accuracy") for v in row]
                   for row in state.cells(names, "raw")]
            raw_base = [((d or {}).get("raw") or {}).get("accuracy")
                        for d in state.zero_shot or []] or None
            out["raw_matrix"] = raw
            out["raw_summary"] = self._cl(raw, names, raw_base, reference.get("raw"))
            if raw_base is not None:
                out["raw_zero_shot"] = raw_base
        return out

    def _cl(self, matrix, names, base, reference) -> dict[str, Any]:
        if self.row.from_base:  # each column is its own model: keep the diagonal
            matrix = [[v if i == j else None for j, v in enumerate(row)]
                      for i, row in enumerate(matrix)]
        if base is not None and any(v is None for v in base):
            base = None  # a task without a zero-shot score (e.g. resumed from an old run)
        return cl_summary(matrix, names, base, reference)

    def _zero_shot(self) -> list[dict | None]:
        """The base model on every task, before any training (forward transfer's baseline)."""
        self.backend.log_line("zero-shot evaluation of the base model")
        engine = self._eval_engine(None, None)
        out: list[dict | None] = []
        for task in self.tasks:
            result = self.evaluate_one(engine, task, self._examples(task))
            self.backend.log_line(f"  zero-shot {task.name}: {result['score']:.4f}")
            out.append(result)
        engine.close()
        return out

    def _stage(self, stage: int, state: LoopState) -> None:
        task, row = self.tasks[stage], self.row
        source = None if row.from_base or stage == 0 else stage - 1
        self.backend.log_line(f"stage {stage + 1}/{len(self.tasks)}: {task.name} ({row.name})")
        nset = None
        resume_at = self.backend.resume_step(stage)
        if row.selects and resume_at:
            nset = self.backend.load_neurons(task.name)  # chosen before the interruption
        elif row.selects:
            assert self.selector is not None, "neuron methods need a selector"
            # The scoring engine shards (and NeFT's probe fine-tunes) its model in
            # place, so training starts again from the same weights; the backend keeps
            # what the scoring build read, so the stage reads its files once.
            nset = self._select(self.backend.load_model(source), task, stage)
        model = self.backend.load_model(source)
        blocks = get_adapter(model).mlp_blocks(model) if self._distills(stage) else None
        penalty, deltas = None, None
        if nset is not None and self.cfg.training.update == "sparse_delta":
            # This stage's selection becomes small parameters holding its start values.
            deltas = sparse_delta.install(model, nset.entries)
        elif nset is not None:
            freeze_unselected(model, nset.entries)
        elif row.adapter_per_task:  # O-LoRA: this stage's new adapter, earlier ones frozen
            model = olora.with_adapters(model, stage + 1, self.cfg.lora, self.cfg.training.seed)
            penalty = self._olora_penalty(stage)
        elif not row.lora:  # LoRA marked its own trainables
            for p in model.parameters():
                p.requires_grad_(True)
        engine = self.backend.build_engine(model)
        masks = install(engine, nset.entries) if nset is not None and deltas is None else None
        # Taken on the stage's starting weights, before a mid-task restore moves them.
        before = wncft.snapshot(engine, nset) if row.mixes else None
        num_steps = self._num_steps(task, engine.world_size)
        with ExitStack() as hooks:  # the distillation's hooks end with training
            aux_loss = None
            if blocks is not None:
                # References on the stage's starting weights: before a restore moves them.
                aux_loss = self._distill(hooks, engine, blocks, stage, resume_at, num_steps)
            if resume_at:
                self.backend.restore_progress(engine, stage)
                self.backend.log_line(f"  resuming {task.name} at step {resume_at}/{num_steps}")
            self._set_lr(engine, resume_at + 1)
            # The data order depends on seed and stage only: skip the steps already taken.
            steps = islice(self.train_steps(engine, task, stage), resume_at, num_steps)
            with tqdm(total=num_steps, initial=resume_at, desc=f"train {task.name}",
                      disable=not engine.is_main_process) as bar:
                try:
                    logs = train(engine, steps, masks, start_step=resume_at, penalty=penalty,
                                 on_step=self._logger(engine, stage, task, num_steps, bar),
                                 nonfinite=self._nonfinite, aux_loss=aux_loss)
                except Diverged as err:
                    engine.close()
                    raise err.at(f"task {task.name} (stage {stage + 1}/{len(self.tasks)})") \
                        from None
        skipped = sum(log.skipped for log in logs)
        if skipped:
            state.skipped_steps[task.name] = skipped
            self.backend.log_line(f"  {task.name}: {skipped} of {num_steps} steps skipped "
                                  "(inf/nan loss or gradient, training.on_nonfinite)")
        if deltas is not None:  # from here on the full matrices hold the trained values
            sparse_delta.write_back(engine, deltas)
        if row.mixes:
            self._capture(engine, task, nset, before)
        self._evaluate(engine, stage, state)
        self.backend.save_stage(engine, stage, state.to_json())
        engine.close()

    def _distills(self, stage: int) -> bool:
        """Whether `stage` trains with the unit distillation (`ncft.continual.distill`)."""
        row = self.row
        return (self.cfg.training.unit_distill_weight > 0 and stage > 0 and row.selects
                and row.continual and not row.from_base)

    def _distill(self, hooks: ExitStack, engine: Engine, blocks, stage: int, resume_at: int,
                 num_steps: int) -> AuxLoss | None:
        """Record the stage's references now; the penalty for `train` (None: no units)."""
        sets = [self.backend.load_neurons(t.name) for t in self.tasks[:stage]]
        units = distill.earlier_units(sets, blocks)
        if not units:
            self.backend.log_line("  unit distillation: the earlier tasks selected no FFN "
                                  "unit; off for this stage")
            return None
        steps = islice(self.train_steps(engine, task=self.tasks[stage], stage=stage),
                       resume_at, num_steps)
        weight = self.cfg.training.unit_distill_weight
        keeper = hooks.enter_context(distill.unit_distill(engine, blocks, units, weight, steps))
        self.backend.log_line(f"  unit distillation: {keeper.num_units} earlier units, "
                              f"{len(keeper.references)} reference micro-batches")
        return keeper.aux_loss

    def _olora_penalty(self, stage: int):
        lambdas = self.cfg.olora.lambda_orth, self.cfg.olora.lambda_l2
        return lambda engine: olora.add_penalty_grad(engine, stage, *lambdas)

    def _select(self, model: nn.Module, task: TaskData, stage: int) -> NeuronSet:
        # Scoring runs on its own engine over the candidate matrices (NeFT's probe
        # fine-tune changes weights), then the training engine starts clean.
        engine = self.backend.build_engine(model, keep_weights=True)
        nset = self.selector.select(engine, model, task, stage)
        engine.close()
        self.backend.save_neurons(task.name, nset)
        return nset

    # ---- training -------------------------------------------------------------
    def _num_steps(self, task: TaskData, world_size: int) -> int:
        if self.cfg.training.steps is not None:
            return self.cfg.training.steps
        per_step = self.cfg.training.micro_batch_size * world_size * self.cfg.training.grad_accum
        return max(1, self.cfg.training.epochs * -(-len(task.train) // per_step))

    def train_steps(self, engine: Engine, task: TaskData, stage: int) -> Iterator[list[dict]]:
        """Endless micro-batch lists for `task` on this rank (callers take what they need)."""
        return stage_steps(self.backend.tokenizer, engine, task, stage, self.cfg.training.seed,
                           self.cfg.training.micro_batch_size, self.cfg.training.grad_accum)

    def _logger(
        self, engine: Engine, stage: int, task: TaskData, total: int, bar: tqdm
    ) -> Callable[[StepLog], None]:
        def on_step(log: StepLog) -> None:
            bar.update()
            bar.set_postfix(loss=f"{log.loss:.3f}")
            if log.step % self.cfg.log_every == 0 or log.step == total:
                self.backend.log_step(stage, task.name, log, self._lr(log.step))
            self._set_lr(engine, log.step + 1)
            self.backend.after_step(engine, stage, log.step, total)

        return on_step

    def _lr(self, step: int) -> float:
        """Linear warm-up over `warmup_steps` (1-based steps), then constant."""
        warm = self.cfg.training.warmup_steps
        return self.cfg.training.lr * min(1.0, step / warm) if warm else self.cfg.training.lr

    def _set_lr(self, engine: Engine, step: int) -> None:
        for group in engine.optimizer.param_groups:
            group["lr"] = self._lr(step)

    # ---- W-NCFT ----------------------------------------------------------------
    def _vector(self, engine: Engine, examples: Sequence[Any], max_length: int) -> torch.Tensor:
        prompts = [ex.prompt for ex in examples[: self.cfg.wncft.num_samples]]
        batches = wncft.prompt_batches(self.backend.tokenizer, prompts, self.cfg.eval.batch_size,
                                       max_length, engine.rank, engine.world_size)
        return wncft.task_vector(engine, batches)

    def _capture(self, engine: Engine, task: TaskData, nset: NeuronSet, before) -> None:
        after = wncft.snapshot(engine, nset)
        vector = self._vector(engine, task.train, task.max_length)
        self.store.capture(task.name, nset, before, after, vector)
        if self.store_dir is not None and engine.is_main_process:
            self.store.save(self.store_dir)

    # ---- evaluation -----------------------------------------------------------
    def _evaluated(self, stage: int) -> range:
        """Indices of the tasks evaluated after `stage` (`eval.tasks`); others stay None."""
        if self.cfg.eval.tasks == "current":
            return range(stage, stage + 1)
        if self.cfg.eval.tasks == "seen":
            return range(stage + 1)
        return range(len(self.tasks))

    def _evaluate(self, engine: Engine, stage: int, state: LoopState) -> None:
        for i in self._evaluated(stage):
            task = self.tasks[i]
            examples = self._examples(task)
            if self.row.mixes and len(self.store) and self.cfg.wncft.query == "example":
                result = self._eval_routed(engine, task, examples)
            elif self.row.mixes and len(self.store):
                query = self._vector(engine, examples, task.max_length)
                weights = self.store.weights(query, self.cfg.wncft.temperature)
                with wncft.mixed(engine, self.store, weights):
                    result = self.evaluate_one(engine, task, examples)
                result["mixing_weights"] = weights.tolist()
                result["query"] = "task"
            else:
                result = self.evaluate_one(engine, task, examples)
            result = _with_label_share(task, result)  # routed results merge groups first
            state.matrix[i][stage] = result["score"]
            state.details.setdefault(task.name, [None] * len(self.tasks))[stage] = result
            self.backend.log_line(f"  eval {task.name} after {self.tasks[stage].name}: "
                                  f"{result['score']:.4f}")
            self.backend.after_eval(stage, i)

    def _examples(self, task: TaskData) -> list[Any]:
        return task.test[: self.cfg.eval.max_examples or len(task.test)]

    def evaluate_one(self, engine: Engine, task: TaskData, examples) -> dict[str, Any]:
        """`evaluate_task` of `task` on `examples` under this run's evaluation settings.

        Plain evaluation (no W-NCFT mixing): what the accuracy matrix stores for a
        method that does not mix, and the studies' per-task measure
        (`study.task_metric`).
        """
        result = evaluate_task(
            engine, self.backend.tokenizer, examples, format=task.format, labels=task.labels,
            metrics=self.cfg.eval.metrics, batch_size=self.cfg.eval.batch_size,
            max_length=task.max_length, max_new_tokens=self.cfg.eval.max_new_tokens,
            classification=self.cfg.eval.classification,
            calibration_prompts=task.content_free if self.cfg.eval.calibration == "content_free"
            else (),
        )
        return _with_label_share(task, result)

    def _eval_routed(self, engine: Engine, task: TaskData, examples) -> dict[str, Any]:
        """`wncft.query: example`: each example under its own mixture (`routing`)."""
        prompts = [ex.prompt for ex in examples]
        weights_NK = routing.example_weights(
            engine, self.backend.tokenizer, self.store, prompts, self.cfg.eval.batch_size,
            task.max_length, self.cfg.wncft.temperature)
        generation = None
        if task.format == "generation":
            generation = {"tokenizer": self.backend.tokenizer, "metrics": self.cfg.eval.metrics,
                          "max_new_tokens": self.cfg.eval.max_new_tokens,
                          "batch_size": self.cfg.eval.batch_size,
                          "max_prompt_length": max(1, task.max_length - 1)}
        return routing.evaluate_routed(
            engine, self.store, examples, weights_NK,
            lambda subset: self.evaluate_one(engine, task, subset), generation)
