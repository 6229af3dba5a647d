"""Mid-task checkpoints (`output.checkpoint_every`): each rank saves its own shard.

```
RUN/checkpoints/in-progress/<NN-task>/step-<00000040>/rank-00000-of-00002.safetensors
                                                      ...
                                                      progress.json   (written last)
```
Every rank writes what its optimizer steps (local shards or ZeRO-3 fp32 masters),
the AdamW moments and its RNG states (the CPU generator, and its own GPU's generator
when the engine computes on CUDA: dropout draws there): no gather, no broadcast, so a
checkpoint of a 7B model costs each rank one write of its own partition. A step
directory counts only once rank 0 has written `progress.json` after a barrier, so a
crash mid-write leaves the previous step directory as the newest complete one. The
task's completed stage checkpoint (`checkpoints/<NN-task>/`) supersedes all of this
and removes it.

A resume rebuilds the stage's engine from the stage's starting weights (the previous
stage checkpoint), restores these shards and skips the optimizer steps already
taken: the data order depends on seed and stage only. That requires the same
backend and world size, which `load` checks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from launcher.dist import barrier
from ncft.io import atomic_file, write_json
from ncft.run_paths import RunPaths

_RNG = "rng.torch"
_CUDA_RNG = "rng.cuda"


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The RNG states a rank saves: the CPU generator's, and `device`'s if CUDA."""
    state = {_RNG: torch.get_rng_state()}
    if device.type == "cuda":
        state[_CUDA_RNG] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Restore and remove the RNG entries of `state` (see `rng_state`).

    A CUDA state is restored only onto a CUDA device; a run resumed without CUDA
    ignores it (its dropout draws come from the CPU generator).
    """
    torch.set_rng_state(state.pop(_RNG))
    cuda = state.pop(_CUDA_RNG, None)
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def stage_root(run: RunPaths, stage: int, task: str) -> Path:
    """Directory holding the mid-task checkpoints of stage `stage` (0-based)."""
    return run.in_progress_dir(stage, task)


def _rank_file(step_dir: Path, rank: int, world_size: int) -> Path:
    return step_dir / f"rank-{rank:05d}-of-{world_size:05d}.safetensors"


def latest(run: RunPaths, stage: int, task: str) -> tuple[int, Path] | None:
    """(step, dir) of the newest complete mid-task checkpoint of a stage, else None."""
    best = None
    for path in sorted(stage_root(run, stage, task).glob("step-*")):
        if (path / "progress.json").is_file():
            best = (int(path.name.split("-", 1)[1]), path)
    return best


def save(engine, run: RunPaths, stage: int, task: str, step: int, backend: str) -> Path:
    """Write this rank's shard for `step`; rank 0 seals the directory (collective).

    Args:
        engine: A launcher engine (`LocalState`) after its `step`-th optimizer step.
        run: The run directory.
        stage: 0-based stage index.
        task: The stage's task name.
        step: Optimizer steps taken in this stage.
        backend: `engine.backend` from the spec (recorded, checked on load).

    Returns:
        The step directory.
    """
    root = stage_root(run, stage, task)
    step_dir = root / f"step-{step:08d}"
    step_dir.mkdir(parents=True, exist_ok=True)
    state = engine.local_state()
    state.update(rng_state(_device(engine)))
    target = _rank_file(step_dir, engine.rank, engine.world_size)
    with atomic_file(target) as tmp:
        save_file(state, str(tmp))
    barrier()  # every shard is on disk before the directory counts
    if engine.is_main_process:
        write_json(step_dir / "progress.json", {
            "stage": stage, "task": task, "step": step, "backend": backend,
            "world_size": engine.world_size,
        })
        for old in root.glob("step-*"):
            if old != step_dir:
                shutil.rmtree(old, ignore_errors=True)
    return step_dir


def load(engine, step_dir: Path, backend: str) -> int:
    """Restore this rank's shard from `step_dir` into a freshly built engine.

    Returns:
        The number of optimizer steps the checkpoint had taken.

    Raises:
        ValueError: If the checkpoint was written by another backend or world size.
    """
    meta = json.loads((step_dir / "progress.json").read_text())
    if meta["backend"] != backend or meta["world_size"] != engine.world_size:
        raise ValueError(
            f"output.resume: {step_dir} was written by {meta['world_size']} ranks on "
            f"engine.backend={meta['backend']}, this run has {engine.world_size} on {backend}; "
            "resume with the same engine, or delete that directory to restart the task"
        )
    state = load_file(str(_rank_file(step_dir, engine.rank, engine.world_size)))
    restore_rng(state, _device(engine))
    engine.load_local_state(state)
    return int(meta["step"])


def _device(engine) -> torch.device:
    return torch.device(getattr(engine, "device", "cpu"))


def clear(run: RunPaths, stage: int, task: str) -> None:
    """Drop a stage's mid-task checkpoints once its stage checkpoint is committed."""
    root = stage_root(run, stage, task)
    shutil.rmtree(root, ignore_errors=True)
    try:
        root.parent.rmdir()  # only when no other stage's checkpoints remain
    except OSError:
        pass
