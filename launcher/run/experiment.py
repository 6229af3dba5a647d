"""`ncft run`: a spec -> a run directory, on one machine or under a launcher.

The parent process validates the spec, prepares the run directory and converts the
model once, then starts the ranks (torch elastic API); under torchrun/deepspeed/srun
each process is already a rank and rank 0 does the preparation. Every rank then
builds the same `ContinualLoop` with a `LauncherBackend` (engines, checkpoints,
logs) and runs the stages that are not done yet.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from launcher.dist import DistInfo, init_distributed, print0, shutdown
from launcher.engines import OptimConfig, build_engine
from launcher.run import neft, progress, rundir, studies
from launcher.run.checkpoint import atomic_dir, commit_dir, gather_state_dict, write_json
from launcher.run.models import resolve_model
from launcher.run.spawn import run_local, under_launcher
from launcher.run.task_data import load_task
from launcher.spec import Spec, dump_resolved, load_spec
from launcher.spec.tasks import records_rank_shift
from ncft.continual.loop import LORA_METHODS, ContinualLoop, LoopConfig, LoopState, TaskData
from ncft.continual.select import SelectConfig, candidate_groups, select_neurons
from ncft.data.examples import encode
from ncft.neuron_set import NeuronSet
from ncft.scoring.cosine import finetune_and_score
from ncft.train import StepLog

# Fault injection for the resume tests: SIGKILL rank KILL_RANK right after the
# checkpoint of stage N (1-based), or after optimizer step K of stage N ("N:K").
KILL_AFTER_STAGE = "NCFT_FAULT_KILL_AFTER_STAGE"
KILL_AT_STEP = "NCFT_FAULT_KILL_AT_STEP"
KILL_RANK = "NCFT_FAULT_KILL_RANK"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def optim_config(spec: Spec) -> OptimConfig:
    """The engine's optimizer settings from the spec's training section."""
    t = spec.training
    return OptimConfig(
        lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay,
        grad_clip=t.grad_clip, grad_accum=t.grad_accum, micro_batch_size=t.micro_batch_size,
    )


class LauncherBackend:
    """The services `ContinualLoop` needs: models, engines, files and logs."""

    def __init__(self, spec: Spec, info: DistInfo, run: rundir.RunDir, model_dir: str) -> None:
        from transformers import AutoTokenizer

        self.spec, self.info, self.run, self.model_dir = spec, info, run, model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        done = rundir.last_complete_stage(run)
        stage = done[0] + 1 if done else 0
        step = self.resume_step(stage) if stage < len(spec.tasks) else 0
        self.metrics = rundir.MetricsLog(run.metrics, info.is_main_process, (stage, step))
        self.board = None
        if spec.output.tensorboard and info.is_main_process:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(run.root / "tensorboard"))

    def load_model(self, stage: int | None) -> torch.nn.Module:  # noqa: D102
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        if self._weights_on_rank0_only and not self.info.is_main_process:
            return self._meta_model()
        model = AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=_DTYPES[self.spec.model.dtype]
        )
        if self.spec.method in LORA_METHODS:
            from ncft.lora import apply_lora

            lora = self.spec.lora
            model = apply_lora(model, lora.r, lora.alpha, lora.dropout, lora.target_modules)
        if stage is not None:
            state = load_file(self._stage_dir(stage) / "model.safetensors")
            missing, unexpected = model.load_state_dict(state, strict=False)
            assert not unexpected, unexpected[:5]
            assert not [m for m in missing if m in dict(model.named_parameters())], missing[:5]
        return model

    @property
    def _weights_on_rank0_only(self) -> bool:
        # FSDP2 broadcasts rank 0's weights while sharding (launcher/engines/fsdp2.py),
        # so the other ranks need no host copy of the model: at 7B that saves ~14 GB
        # of host memory per extra rank. LoRA runs keep the plain path.
        return (self.spec.engine.backend == "fsdp2" and self.info.world_size > 1
                and self.spec.method not in LORA_METHODS)  # fmt: skip

    def _meta_model(self) -> torch.nn.Module:
        """The model's structure on the meta device, set up as `from_pretrained` would."""
        from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

        config = AutoConfig.from_pretrained(self.model_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=_DTYPES[self.spec.model.dtype])
        try:  # generation on this rank must follow the same settings as on rank 0
            model.generation_config = GenerationConfig.from_pretrained(self.model_dir)
        except OSError:
            pass
        return model.eval()

    def build_engine(self, model: torch.nn.Module):  # noqa: D102
        e = self.spec.engine
        return build_engine(e.backend, model, optim_config(self.spec), self.info, e.ds_config)

    def save_neurons(self, task: str, nset: NeuronSet) -> None:  # noqa: D102
        if self.info.is_main_process:
            nset.save(self.run.neuron_file(task))

    def load_neurons(self, task: str) -> NeuronSet:  # noqa: D102
        return NeuronSet.load(self.run.neuron_file(task))

    def _stage_dir(self, stage: int) -> Path:
        return self.run.stage_dir(stage, self.spec.tasks[stage].name)

    def save_stage(self, engine, stage: int, state: dict[str, Any]) -> None:  # noqa: D102
        from safetensors.torch import save_file

        weights = gather_state_dict(engine)
        if self.info.is_main_process:
            target = self._stage_dir(stage)
            tmp = atomic_dir(target)
            save_file({k: v.contiguous() for k, v in weights.items()}, tmp / "model.safetensors")
            write_json(tmp / "state.json", {"stage": stage, **state})  # last: marks complete
            commit_dir(tmp, target)
            progress.clear(self.run, stage, self.spec.tasks[stage].name)
        dist.barrier()
        self._fault(KILL_AFTER_STAGE, str(stage + 1))

    def resume_step(self, stage: int) -> int:  # noqa: D102
        found = progress.latest(self.run, stage, self.spec.tasks[stage].name)
        return found[0] if found else 0

    def restore_progress(self, engine, stage: int) -> None:  # noqa: D102
        found = progress.latest(self.run, stage, self.spec.tasks[stage].name)
        assert found is not None, f"no mid-task checkpoint of stage {stage}"
        progress.load(engine, found[1], self.spec.engine.backend)

    def after_step(self, engine, stage: int, step: int, total: int) -> None:  # noqa: D102
        every = self.spec.output.checkpoint_every
        if every and step % every == 0 and step < total:  # the last step gets save_stage
            progress.save(engine, self.run, stage, self.spec.tasks[stage].name, step,
                          self.spec.engine.backend)  # fmt: skip
        self._fault(KILL_AT_STEP, f"{stage + 1}:{step}")

    def _fault(self, variable: str, point: str) -> None:
        if os.environ.get(variable) == point and \
                os.environ.get(KILL_RANK, "0") == str(self.info.rank):
            os.kill(os.getpid(), signal.SIGKILL)

    def log_step(self, stage: int, task: str, log: StepLog, lr: float) -> None:  # noqa: D102
        self.metrics.write(stage=stage, task=task, step=log.step, loss=log.loss,
                           grad_norm=log.grad_norm, lr=lr)  # fmt: skip
        if self.board is not None:
            for key, value in (("loss", log.loss), ("grad_norm", log.grad_norm), ("lr", lr)):
                self.board.add_scalar(f"{task}/{key}", value, log.step)

    def log_line(self, text: str) -> None:  # noqa: D102
        print0(text)


def loop_select_config(spec: Spec) -> SelectConfig:
    """The spec's selection section as the loop's plain values."""
    s = spec.selection
    return SelectConfig(
        scorer=s.scorer, fraction=s.fraction, count=s.count, per_layer=s.per_layer,
        modules=tuple(s.modules), unit=s.unit, positions=s.positions,
        num_examples=s.num_examples, batch_size=s.batch_size, cosine_steps=s.cosine_steps,
        union_with_previous=s.union_with_previous, seed=s.seed,
        model_id=spec.model.name_or_path,
    )


def _loop(spec: Spec, backend: LauncherBackend, tasks: list[TaskData]) -> ContinualLoop:
    t, s, ev = spec.training, spec.selection, spec.eval
    sel_cfg = loop_select_config(spec)
    holder: dict[str, ContinualLoop] = {}

    def select(engine, model, task: TaskData, stage: int, method: str = spec.method,
               record: bool = True) -> NeuronSet:  # fmt: skip
        tok = backend.tokenizer
        previous = None
        if s.union_with_previous and stage > 0:
            previous = NeuronSet.load(backend.run.neuron_file(tasks[stage - 1].name))
        loop = holder["loop"]
        scores: dict[str, torch.Tensor] = {}
        record = record and records_rank_shift(spec, method)
        control = record and method == "random_neurons"
        if control:
            # The control of NeFT's rank shift: random rows, but the same probe before
            # (the random choice does not look at the weights the probe moves).
            scores, _ = finetune_and_score(engine, candidate_groups(model, sel_cfg),
                                           loop.train_steps(engine, task, stage),
                                           s.cosine_steps)  # fmt: skip
        nset = select_neurons(
            engine, model, sel_cfg, method=method,
            encoded_train=encode(task.train, tok, task.max_length),
            train_steps=loop.train_steps(engine, task, stage), task=task.name, stage=stage,
            pad_id=tok.pad_token_id, previous=previous,
            keep_scores=None if control else scores,
        )
        if record and backend.info.is_main_process:
            neft.save_scores(backend.run.neft / f"{task.name}.before.safetensors", scores)
        return nset

    cfg = LoopConfig(
        method=spec.method, steps_per_task=t.steps, epochs=t.epochs,
        micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum, seed=t.seed,
        warmup_steps=t.warmup_steps, lr=t.lr, eval_batch_size=ev.batch_size,
        eval_max_examples=ev.max_examples, max_new_tokens=ev.max_new_tokens,
        metrics=tuple(ev.metrics), wncft_samples=spec.wncft.num_samples,
        wncft_temperature=spec.wncft.temperature, select=select,
        log_every=spec.output.log_every,
    )
    loop = ContinualLoop(cfg, tasks, backend, store_dir=backend.run.root / "wncft")
    holder["loop"] = loop
    return loop


def _export_final(spec: Spec, backend: LauncherBackend, last_stage: int) -> None:
    """Rank 0: the last stage's weights as a plain HF directory (LoRA merged)."""
    model = backend.load_model(last_stage)
    if spec.method in LORA_METHODS:
        from ncft.lora import merge_lora

        model = merge_lora(model)
    tmp = atomic_dir(backend.run.final)
    model.save_pretrained(tmp)
    backend.tokenizer.save_pretrained(tmp)
    commit_dir(tmp, backend.run.final)


def run_rank(run_root: str, model_dir: str) -> None:
    """One rank of an experiment whose run directory is prepared."""
    run = rundir.RunDir(Path(run_root))
    spec = load_spec(run.spec)
    info = init_distributed()
    if info.world_size != spec.engine.world_size:
        raise ValueError(
            f"engine: the spec asks for {spec.engine.world_size} ranks "
            f"(nnodes x nproc_per_node) but the launcher started {info.world_size}"
        )
    backend = LauncherBackend(spec, info, run, model_dir)
    tasks = [load_task(t, spec.data_root) for t in spec.tasks]
    loop = _loop(spec, backend, tasks)
    if spec.study.deactivation:
        studies.deactivation_study(spec, backend, loop, tasks)
    done = rundir.last_complete_stage(run)
    start, state = 0, None
    if done is not None:
        saved = rundir.read_state(done[1])
        start, state = done[0] + 1, LoopState(saved["matrix"], saved.get("details", {}))
        print0(f"resuming {run.root} after stage {start}")
    state = loop.run(start, state)
    rank_shift = studies.neft_rank_shift(spec, backend, loop, tasks, loop_select_config(spec))
    if info.is_main_process:
        results = loop.summary(state)
        if rank_shift:
            results["neft"] = rank_shift
        study = run.root / "deactivation.json"
        if study.is_file():
            results["deactivation"] = json.loads(study.read_text())
        similarity = studies.similarity(backend, tasks, state.matrix)
        if similarity is not None:
            results["similarity"] = similarity
        rundir.write_results(run, results)
        _export_final(spec, backend, len(tasks) - 1)
        if spec.output.report:
            from ncft.analysis.report import write_report

            write_report(run.root)
        print0(f"done: {run.results}")
    dist.barrier()
    shutdown()


def prepare(spec: Spec) -> tuple[str, str]:
    """Validate-time work done once: run directory and model conversion."""
    run = rundir.prepare(Path(spec.output.dir), dump_resolved(spec), spec.output.resume,
                         spec.output.overwrite)  # fmt: skip
    return str(run.root), resolve_model(spec.model.name_or_path)


def main_run(spec_path: str, overrides: list[str]) -> None:
    """`ncft run SPEC [key=value ...]` (raises SpecError before any process starts)."""
    spec = load_spec(spec_path, overrides)
    if not under_launcher():
        if spec.engine.nnodes > 1:
            raise ValueError(
                f"engine.nnodes={spec.engine.nnodes}: start multi-node runs with a launcher "
                "(slurm/torchrun.slurm or slurm/deepspeed.slurm); `ncft run` spawns one node"
            )
        root, model_dir = prepare(spec)
        run_local(run_rank, spec.engine.nproc_per_node, root, model_dir)
        return
    info = init_distributed()
    payload = [None]
    if info.is_main_process:
        payload = [prepare(spec)]
    dist.broadcast_object_list(payload, src=0)
    run_rank(*payload[0])
