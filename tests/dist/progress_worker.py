"""One launched job: a mid-task checkpoint restored into a fresh engine, per backend.

Run under torchrun by tests/launcher/run/test_progress.py. For each backend: train a
tiny Llama with masks for 2 steps, write a mid-task checkpoint (`launcher.run.progress`),
train 2 more steps (the reference); then build a new engine from the same initial
weights, restore the checkpoint and train the same 2 steps. Rank 0 saves the gathered
weights of both, and of the initial model, for the test to compare. The same again
with `training.update: sparse_delta` (tags `<backend>_sparse_delta_*`): there the
checkpoint holds the small delta parameters and their AdamW moments.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from launcher.run import progress
from launcher.engines import OptimConfig, build_engine
from ncft.run_paths import RunPaths
from ncft import sparse_delta
from ncft.masks.install import freeze_unselected, install
from tests.dist.mask_worker import ACCUM, GLOBAL_MICRO, gather_all, neuron_sets, one_step
from tests.support.spawn import backends_main
from tests.support.tiny import tiny_llama

STEPS = 2


def fresh(backend: str, info, update: str = "masked"):
    model = tiny_llama(seed=0)
    nset, _ = neuron_sets(model)
    if update == "sparse_delta":
        sparse_delta.install(model, nset.entries)
    else:
        freeze_unselected(model, nset.entries)
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, grad_clip=0.005, grad_accum=ACCUM,
                      micro_batch_size=GLOBAL_MICRO // info.world_size)
    engine = build_engine(backend, model, cfg, info)
    return engine, (install(engine, nset.entries) if update == "masked" else None)


def run_backend(backend: str, info, out: Path) -> None:
    """Both update modes; gathered weights include the delta parameters."""
    for update in ("masked", "sparse_delta"):
        run_update(backend, info, out, update)


def run_update(backend: str, info, out: Path, update: str) -> None:
    tag = backend if update == "masked" else f"{backend}_{update}"
    run = RunPaths(out / tag)
    engine, plan = fresh(backend, info, update)
    init = gather_all(engine)
    for step in range(STEPS):
        one_step(engine, plan, step, info)
    step_dir = progress.save(engine, run, 0, "task", STEPS, backend)
    for step in range(STEPS, 2 * STEPS):
        one_step(engine, plan, step, info)
    reference = gather_all(engine)
    engine.close()

    engine, plan = fresh(backend, info, update)
    assert progress.latest(run, 0, "task") == (STEPS, step_dir)
    restored_at = progress.load(engine, step_dir, backend)
    assert restored_at == STEPS
    at_checkpoint = gather_all(engine)
    for step in range(STEPS, 2 * STEPS):
        one_step(engine, plan, step, info)
    resumed = gather_all(engine)
    engine.close()
    if info.is_main_process:
        for name, tensors in (("init", init), ("checkpoint", at_checkpoint),
                             ("reference", reference), ("resumed", resumed)):
            save_file(tensors, out / f"{tag}_{name}.safetensors")


if __name__ == "__main__":
    backends_main(run_backend)
