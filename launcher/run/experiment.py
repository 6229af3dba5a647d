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
from pathlib import Path

import torch
import torch.distributed as dist

from launcher.dist import init_distributed, print0, shutdown
from launcher.run import neft, preempt, rundir, studies
from launcher.run.backend import LauncherBackend
from launcher.run.checkpoint import atomic_dir, commit_dir
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
    preempt.install()  # before the slow setup: a SIGTERM then stops at the first step
    run = rundir.RunDir(Path(run_root))
    spec = load_spec(run.spec)
    info = init_distributed()
    if info.world_size != spec.engine.world_size:
        raise ValueError(
            f"engine: the spec asks for {spec.engine.world_size} ranks "
            f"(nnodes x nproc_per_node) but the launcher started {info.world_size}"
        )
    try:
        _run_stages(spec, info, run, model_dir)
    except preempt.Preempted as stopped:
        print0(f"{stopped}; resume with the same command and output.resume=true "
               "(a requeued SLURM job resumes by itself)")
    else:
        return
    shutdown()
    raise SystemExit(preempt.EXIT_PREEMPTED)


def _run_stages(spec: Spec, info, run: rundir.RunDir, model_dir: str) -> None:
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
    policy = preempt.prepare_policy(spec.output.dir, spec.output.resume, spec.output.overwrite)
    run = rundir.prepare(Path(spec.output.dir), dump_resolved(spec), *policy)
    preempt.record_job(run.root)
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
        _run_local_stoppable(spec.engine.nproc_per_node, root, model_dir)
        return
    info = init_distributed()
    payload = [None]
    if info.is_main_process:
        payload = [prepare(spec)]
    dist.broadcast_object_list(payload, src=0)
    run_rank(*payload[0])


def _run_local_stoppable(nproc: int, root: str, model_dir: str) -> None:
    """`run_local`, where SIGTERM to this parent stops the ranks at a checkpoint.

    The elastic agent forwards SIGTERM to the ranks and waits `preempt.GRACE_S`
    before SIGKILL; then this process exits with `preempt.EXIT_PREEMPTED`.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException

    os.environ.setdefault(preempt.GRACE_ENV, preempt.GRACE_S)
    try:
        run_local(run_rank, nproc, root, model_dir)
    except SignalException as err:
        print(f"ncft: {err}; the ranks stopped at a checkpoint", flush=True)
        raise SystemExit(preempt.EXIT_PREEMPTED) from None
