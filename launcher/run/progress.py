"""Mid-task checkpoints (`output.checkpoint_every`): each rank saves its own shard.

```
RUN/checkpoints/in-progress/<NN-task>/step-<00000040>/rank-00000-of-00002.safetensors
                                                      ...
                                                      progress.json   (written last)
```
Every rank writes what its optimizer steps (local shards or ZeRO-3 fp32 masters),
the AdamW moments and its RNG states (the CPU generator, and its own GPU's generator
when the engine computes on CUDA: dropout draws there): no gather, no broadcast, so a
checkpoint of a 7B model costs each rank one write of its own partition. Each rank
also hashes its own file (in parallel); rank 0 gathers the sizes and SHA-256s and,
after `progress.json`, writes the step's `manifest.json` (`launcher.run.manifest`):
a step directory counts only once that exists, so a crash mid-write leaves the
previous step directory as the newest complete one. The task's completed stage
checkpoint (`checkpoints/<NN-task>/`) supersedes all of this and removes it.

A resume rebuilds the stage's engine from the stage's starting weights (the previous
stage checkpoint), restores these shards and skips the optimizer steps already
taken: the data order depends on seed and stage only. `resumable` decides, on every
rank together, whether the newest step directory can be used: each rank verifies
`progress.json` and its own shard against the manifest, and the directory must come
from the same backend and world size. Otherwise the stage restarts from its boundary
(the verified stage checkpoint before it), with one line saying why. A different
world size is not resharded: a step's global batch is micro_batch_size x grad_accum x
world size, so the steps already taken saw other batches than the new world size
would, and the result would match neither an uninterrupted run at the old size nor
one at the new; restarting the stage gives exactly the run at the new size.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from launcher.dist import all_gather_flat, any_rank, print0
from launcher.errors import UserError
from launcher.run import manifest
from ncft.io import atomic_file, write_json
from ncft.run_paths import RunPaths

PROGRESS = "progress.json"

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
    """(step, dir) of the newest sealed mid-task checkpoint of a stage, else None."""
    best = None
    for path in sorted(stage_root(run, stage, task).glob("step-*")):
        if (path / manifest.MANIFEST).is_file():
            best = (int(path.name.split("-", 1)[1]), path)
    return best


def _encode(entry: dict) -> torch.Tensor:
    """A file's digest as 33 int64s (size, then the 32 SHA-256 bytes) for a gather."""
    return torch.tensor([entry["size"], *bytes.fromhex(entry["sha256"])], dtype=torch.int64)


def _decode(values: list[int]) -> dict:
    return {"size": int(values[0]), "sha256": bytes(int(v) for v in values[1:]).hex()}


def read_progress(step_dir: Path) -> dict:
    """A step directory's `progress.json`.

    Raises:
        UserError: If it cannot be read, naming the file.
    """
    path = step_dir / PROGRESS
    try:
        meta = json.loads(path.read_text())
        _ = meta["backend"], meta["world_size"], meta["step"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path} is unreadable ({type(err).__name__}: {err}); delete "
                        f"{step_dir} to restart the task from its boundary") from None
    return meta


def _why_unusable(step_dir: Path, backend: str, world_size: int, rank: int) -> str | None:
    """Why this rank cannot resume from `step_dir` (None: it can)."""
    why = manifest.problem(step_dir, only=[PROGRESS])
    if why:
        return why
    meta = read_progress(step_dir)
    if meta["backend"] != backend or meta["world_size"] != world_size:
        return (f"it was written by {meta['world_size']} ranks on engine.backend="
                f"{meta['backend']} and this run has {world_size} on {backend}; optimizer "
                "state is not resharded (a step's global batch depends on the world size, "
                "so the steps taken would not be the new run's)")
    return manifest.problem(step_dir, only=[_rank_file(step_dir, rank, world_size).name])


def resumable(run: RunPaths, stage: int, task: str, backend: str, world_size: int, rank: int,
              device: torch.device) -> tuple[int, Path] | None:
    """(step, dir) of the mid-task checkpoint a resumed stage continues from, else None.

    Collective: every rank checks `progress.json` and its own shard against the
    manifest (hashing only its own file), and all agree. A checkpoint that any rank
    cannot use is skipped with one line naming it and why, and the stage restarts
    from its boundary.
    """
    found = latest(run, stage, task)
    why = _why_unusable(found[1], backend, world_size, rank) if found else None
    if not any_rank(why is not None, device):
        return found
    if why and (rank == 0 or "ranks on engine.backend" not in why):
        print(f"[rank {rank}] skipping the mid-task checkpoint {found[1]}: {why}", flush=True)
    print0(f"restarting stage {stage + 1} ({task}) from its boundary: the mid-task "
           "checkpoint cannot be used (see above)")
    return None


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
    # Each rank hashes its own shard; the gather also waits for every shard on disk.
    mine = _encode(manifest.digest(target))
    digests = all_gather_flat(mine, _device(engine)).cpu() if dist.is_initialized() else mine
    if engine.is_main_process:
        write_json(step_dir / PROGRESS, {
            "stage": stage, "task": task, "step": step, "backend": backend,
            "world_size": engine.world_size,
        })
        rows = digests.view(engine.world_size, -1).tolist()
        entries = {_rank_file(step_dir, r, engine.world_size).name: _decode(row)
                   for r, row in enumerate(rows)}
        entries[PROGRESS] = manifest.digest(step_dir / PROGRESS)
        manifest.seal(step_dir, entries)  # last: the directory counts from here
        for old in root.glob("step-*"):
            if old != step_dir:
                shutil.rmtree(old, ignore_errors=True)
    return step_dir


def load(engine, step_dir: Path, backend: str) -> int:
    """Restore this rank's shard from `step_dir` (checked by `resumable`) into a fresh engine.

    Returns:
        The number of optimizer steps the checkpoint had taken.

    Raises:
        UserError: If a file cannot be read (naming it), or the checkpoint was
            written by another backend or world size.
    """
    meta = read_progress(step_dir)
    if meta["backend"] != backend or meta["world_size"] != engine.world_size:
        raise UserError(
            f"output.resume: {step_dir} was written by {meta['world_size']} ranks on "
            f"engine.backend={meta['backend']}, this run has {engine.world_size} on {backend}; "
            "delete that directory to restart the task from its boundary")
    path = _rank_file(step_dir, engine.rank, engine.world_size)
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors' own errors name no file
        raise UserError(f"output.resume: {path} does not load ({err})") from None
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
