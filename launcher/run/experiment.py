"""`ncft run`: a spec -> a run directory, on one machine or under a launcher.

The parent process validates the spec, runs the preflight checks (model, output
directory: `launcher.run.preflight`), converts the model once and prepares the run
directory, then starts the ranks (torch elastic API); under torchrun/deepspeed/srun
each process is already a rank and rank 0 does the preparation. Every rank then
builds the same `ContinualLoop` with a `LauncherBackend` (engines, checkpoints,
logs) and the run's selection pipeline (`launcher.run.selector`), and runs the
stages that are not done yet. A run that fails before its first checkpoint removes
the directory it created, so the corrected rerun starts clean. The launching process
(the parent, or rank 0 under a launcher) holds the run directory's lock for the run's
life (`launcher.run.lock`); a resume verifies the checkpoints it continues from
(`launcher.run.rundir.verify_for_resume`, `launcher.run.progress.resumable`).
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from launcher.dist import barrier, broadcast_object, init_distributed, print0, shutdown
from launcher.run import preempt, rundir
from launcher.run.backend import LauncherBackend
from launcher.run.lock import RunLock
from launcher.run.models import resolve_model
from launcher.run.preflight import preflight
from launcher.run.selector import run_selector
from launcher.run.spawn import run_local, under_launcher
from launcher.run.task_data import load_task
from launcher.spec import Spec, dump_resolved, load_spec
from launcher.spec.stages import records_neft_utilization
from ncft.continual.loop import ContinualLoop
from ncft.continual.methods import method
from ncft.continual.metrics import reference_read_outs
from ncft.continual.services import Selector
from ncft.continual.state import LoopState
from ncft.continual.task import TaskData, check_room
from ncft.io import atomic_dir
from ncft.lora import merge_lora
from ncft.run_paths import RunPaths
from ncft.studies.run import RunStudies


def _loop(spec: Spec, backend: LauncherBackend, tasks: list[TaskData],
          selector: Selector) -> ContinualLoop:
    return ContinualLoop(spec.loop_config(), tasks, backend, store_dir=backend.run.wncft,
                         selector=selector)


def _export_final(spec: Spec, backend: LauncherBackend, last_stage: int) -> None:
    """Rank 0: the last stage's weights as a plain HF directory (LoRA merged)."""
    model = backend.load_full_model(last_stage)
    if method(spec.method).lora:

        model = merge_lora(model)
    with atomic_dir(backend.run.final) as tmp:
        model.save_pretrained(tmp)
        backend.tokenizer.save_pretrained(tmp)


def _engine_change(spec: Spec, info, saved: dict[str, Any]) -> str:
    """", on N ranks (engine X) instead of ..." when the resume changed the engine."""
    now = {"backend": spec.engine.backend, "world_size": info.world_size}
    before = saved.get("engine")
    if before is None or before == now:
        return ""
    return (f", on {now['world_size']} rank(s) with engine.backend={now['backend']} (stage "
            f"{saved['stage'] + 1} was trained on {before['world_size']} with "
            f"{before['backend']}; results.json records each stage's engine)")


def _stage_engines(run: RunPaths) -> list[dict[str, Any] | None]:
    """Backend and world size that trained each stage (the run's record of a resume)."""
    return [rundir.read_state(path).get("engine") for _, path in run.stage_dirs()]


def _after_studies(spec: Spec, studies: RunStudies) -> dict[str, Any]:
    """The studies run after the sequence (all ranks); rank 0 gets their results keys."""
    out: dict[str, Any] = {}
    if records_neft_utilization(spec):
        out["neft"] = studies.neft_utilization()
    out["weight_movement_rank_shift"] = studies.rank_shift()
    if spec.study.similarity in ("paper", "both"):
        out["similarity"] = studies.per_task_model_similarity()
    return {k: v for k, v in out.items() if v}


def fg_reference(spec: Spec, tasks: list[str]) -> dict[str, list[float | None]] | None:
    """`eval.reference`'s A_i per read-out (`reference_read_outs`), checked up front.

    Raises:
        ValueError: Naming `eval.reference` if the run is missing, not `per_task`, lacks
            a task or scored under another protocol.
    """
    if spec.eval.reference is None:
        return None
    path = RunPaths(spec.eval.reference).results
    if not path.is_file():
        raise ValueError(f"eval.reference: {path} does not exist; run the per_task "
                         "reference first (method=per_task)")
    protocol = {"classification": spec.eval.classification,
                "calibration": spec.eval.calibration}
    try:
        return reference_read_outs(json.loads(path.read_text()), tasks, protocol)
    except ValueError as err:
        raise ValueError(f"eval.reference: {err}") from None


def run_rank(run_root: str, model_dir: str) -> None:
    """One rank of an experiment whose run directory is prepared."""
    preempt.install()  # before the slow setup: a SIGTERM then stops at the first step
    run = RunPaths(Path(run_root))
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


def _run_stages(spec: Spec, info, run: RunPaths, model_dir: str) -> None:
    backend = LauncherBackend(spec, info, run, model_dir)
    tasks = [load_task(t, spec.data_root) for t in spec.tasks]
    check_room(tasks, backend.tokenizer)  # before any study or stage spends time
    reference = fg_reference(spec, [t.name for t in tasks])
    selector = run_selector(spec, backend, tasks)
    loop = _loop(spec, backend, tasks, selector)
    studies = RunStudies(spec.study.to_config(), backend, selector, tasks, spec.method,
                         seed=spec.training.seed, batch_size=spec.eval.batch_size,
                         evaluate=loop.evaluate_one)
    if spec.study.deactivation:
        studies.deactivation()
    done = rundir.last_complete_stage(run)
    start, state = 0, None
    if done is not None:
        saved = rundir.read_state(done[1])
        start, state = done[0] + 1, LoopState.from_json(saved)
        print0(f"resuming {run.root} after stage {start}{_engine_change(spec, info, saved)}")
    state = loop.run(start, state)
    extra = _after_studies(spec, studies)
    if info.is_main_process:
        results = {**loop.summary(state, reference), **extra, "stage_engines": _stage_engines(run)}
        if run.deactivation.is_file():
            results["deactivation"] = json.loads(run.deactivation.read_text())
        if spec.study.similarity in ("final_model", "both"):
            similarity = studies.final_model_similarity(state.matrix)
            if similarity is not None:
                results["similarity_final_model"] = similarity
        rundir.write_results(run, results)
        _export_final(spec, backend, len(tasks) - 1)
        if spec.output.report:
            from ncft.analysis.report import write_report

            write_report(run.root)
        print0(f"done: {run.results}")
    barrier()
    shutdown()


def prepare(spec: Spec) -> tuple[str, str]:
    """Validate-time work done once: model conversion, then the run directory.

    The model comes first: a conversion that fails must not leave a run directory.
    """
    model_dir = resolve_model(spec.model.name_or_path)
    run = rundir.prepare(Path(spec.output.dir), dump_resolved(spec), spec.output.resume,
                         spec.output.overwrite)
    preempt.record_job(run.root)
    return str(run.root), model_dir


def main_run(spec_path: str, overrides: list[str]) -> None:
    """`ncft run SPEC [key=value ...]`.

    Raises:
        SpecError, UserError: From validation and preflight, before any file is written
            or process started; a `UserError` also carries a rank's `ValueError`.
        RanksFailed: If a rank fails otherwise. After a failure, a run directory this
            call created is removed unless a checkpoint made it resumable.
    """
    spec = preempt.resume_if_requeued(load_spec(spec_path, overrides))
    preflight(spec, under_launcher())
    fg_reference(spec, [t.name for t in spec.tasks])  # a bad reference fails before any work
    out = spec.output
    created = out.overwrite or not rundir.holds_run(out.dir)
    if not under_launcher():
        with RunLock(out.dir):  # held until the ranks are done (`launcher.run.lock`)
            root, model_dir = prepare(spec)
            with rundir.removed_unless_started(RunPaths(out.dir), created):
                _run_local_stoppable(spec.engine.nproc_per_node, root, model_dir)
        return
    info = init_distributed()
    held = RunLock(out.dir) if info.is_main_process else nullcontext()
    with held:
        prepared = broadcast_object(prepare(spec) if info.is_main_process else None)
        # Only rank 0 cleans up; under a launcher the other ranks are stopped by it.
        with rundir.removed_unless_started(RunPaths(out.dir),
                                           created and info.is_main_process):
            run_rank(*prepared)


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
