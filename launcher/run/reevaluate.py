"""`ncft eval RUN_DIR [key=value ...]`: evaluate a finished run again, training nothing.

A run's stage checkpoints and NeuronSets hold everything its training produced, so
settings that act only at inference (W-NCFT's temperature, query mode and sample
count, `eval.*`: classification mode, calibration, batch size, which tasks) can be
changed without training again. The finished run is read, never written: the new
evaluation goes to a new `output.dir` with its own `spec.resolved.yaml` and
`results.json` (which names the run it evaluated, `evaluated_from`). `method` may
switch between `ncft` and `wncft`, which train identically: W-NCFT's evaluation of
an NCFT run equals a full W-NCFT run (tests/launcher/run/test_reevaluate.py).

Every other changed key would change what training produced, so it is refused,
naming the key. `engine.*` may change (a run trained on 64 GPUs can be evaluated on
8); results equal a full run's only on the same engine and precision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from launcher.dist import broadcast_object, init_distributed, print0, shutdown
from launcher.errors import UserError
from launcher.run import rundir
from launcher.run.backend import LauncherBackend
from launcher.run.preflight import preflight
from launcher.run.spawn import run_local, under_launcher
from launcher.run.task_data import load_task
from launcher.spec import Spec, load_spec
from ncft.run_paths import RunPaths

# Keys `ncft eval` may change (a key or the section it lies in).
INFERENCE_KEYS = ("eval", "wncft.temperature", "wncft.query", "wncft.num_samples",
                  "output", "engine")
# Methods that train alike, so one's run can be evaluated as the other.
SAME_TRAINING = ({"ncft", "wncft"},)


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    if isinstance(data, list):
        out = {}
        for i, value in enumerate(data):
            out.update(_flat(value, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: data}


def changed_keys(before: Spec, after: Spec) -> list[str]:
    """Dotted keys whose resolved values differ between two specs, sorted."""
    a, b = _flat(before.model_dump(mode="json")), _flat(after.model_dump(mode="json"))
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def check_inference_only(before: Spec, after: Spec) -> None:
    """Refuse overrides that change training, naming the first such key.

    Raises:
        UserError: If a key outside `INFERENCE_KEYS` changed (a method change only
            between methods that train alike).
    """
    for key in changed_keys(before, after):
        if key == "method" and any({before.method, after.method} <= same
                                   for same in SAME_TRAINING):
            continue
        if any(key == k or key.startswith(k + ".") for k in INFERENCE_KEYS):
            continue
        raise UserError(
            f"{key}: `ncft eval` changes inference settings only ({', '.join(INFERENCE_KEYS)}, "
            f"and method between ncft and wncft); this key changes training: use "
            f"`ncft run` with it")


def eval_spec(run_dir: str | Path, overrides: list[str]) -> tuple[Spec, RunPaths]:
    """The spec `ncft eval` runs, and the finished run it reads.

    Raises:
        UserError: If `run_dir` holds no finished run, an override changes training,
            or `output.dir` is the finished run itself.
    """
    trained = RunPaths(Path(run_dir).resolve())
    if not trained.spec.is_file():
        raise UserError(f"{trained.root}: no spec.resolved.yaml; give the directory of a "
                        "finished `ncft run`")
    before = load_spec(trained.spec)
    done = rundir.last_complete_stage(trained)
    if done is None or done[0] != len(before.tasks) - 1:
        finished = 0 if done is None else done[0] + 1
        raise UserError(f"{trained.root}: {finished} of {len(before.tasks)} stages are "
                        "complete; resume the run (output.resume=true) before evaluating it")
    spec = load_spec(trained.spec, overrides)
    check_inference_only(before, spec)
    if Path(spec.output.dir).resolve() == trained.root:
        raise UserError(f"output.dir: {trained.root} is the run being evaluated; set "
                        "output.dir=NEW_DIR (`ncft eval` never changes the run it reads)")
    return spec, trained


def eval_rank(run_root: str, model_dir: str, trained_root: str) -> None:
    """One rank of `ncft eval` whose output directory is prepared."""
    from launcher.run.experiment import _loop

    run, trained = RunPaths(Path(run_root)), RunPaths(Path(trained_root))
    spec = load_spec(run.spec)
    info = init_distributed()
    if info.world_size != spec.engine.world_size:
        raise ValueError(f"engine: the spec asks for {spec.engine.world_size} ranks but the "
                         f"launcher started {info.world_size}")
    backend = LauncherBackend(spec, info, run, model_dir, trained=trained)
    tasks = [load_task(t, spec.data_root) for t in spec.tasks]
    loop = _loop(spec, backend, tasks, selector=None)
    state = loop.reevaluate()
    if info.is_main_process:
        rundir.write_results(run, {**loop.summary(state), "evaluated_from": str(trained.root)})
        print0(f"done: {run.results}")
    shutdown()


def main_eval(run_dir: str, overrides: list[str]) -> None:
    """`ncft eval RUN_DIR [key=value ...]` (see the module docstring).

    Raises:
        SpecError, UserError: Before any file is written or process started.
        RanksFailed: If a rank fails.
    """
    from launcher.run.experiment import prepare

    spec, trained = eval_spec(run_dir, overrides)
    preflight(spec, under_launcher())
    created = spec.output.overwrite or not rundir.holds_run(spec.output.dir)
    if not under_launcher():
        root, model_dir = prepare(spec)
        with rundir.removed_unless_started(RunPaths(spec.output.dir), created):
            run_local(eval_rank, spec.engine.nproc_per_node, root, model_dir, str(trained.root))
        return
    info = init_distributed()
    prepared = broadcast_object(prepare(spec) if info.is_main_process else None)
    eval_rank(*prepared, str(trained.root))
