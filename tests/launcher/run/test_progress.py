"""Mid-task checkpoints: per-rank shards restored into a freshly built engine.

Sharded engines run on 2 real ranks (tests/dist/progress_worker.py); the single
engine's `LocalState` round trip and its refusals run in process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launcher.dist import DistInfo
from launcher.engines import OptimConfig, build_engine
from tests.support.spawn import REPO, torchrun_backends
from tests.support.tiny import VOCAB, tiny_llama

WORKER = REPO / "tests" / "dist" / "progress_worker.py"
SHARDED = ("deepspeed", "fsdp2", "fsdp1")


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return torchrun_backends(tmp_path_factory, "progress", WORKER, SHARDED)


@pytest.mark.dist
@pytest.mark.parametrize("update", ["masked", "sparse_delta"])
@pytest.mark.parametrize("backend", SHARDED)
def test_restored_shards_continue_bit_identically(out, backend, update):
    prefix = backend if update == "masked" else f"{backend}_{update}"
    init, mid, ref, resumed = (
        load_file(out / f"{prefix}_{tag}.safetensors")
        for tag in ("init", "checkpoint", "reference", "resumed")
    )
    moved = [n for n in init if not torch.equal(init[n], mid[n])]
    assert moved, "the checkpoint must hold trained weights, not the initial ones"
    for name in ref:  # same engine, world size and data: expected bit-identical
        assert torch.equal(resumed[name], ref[name]), name


@pytest.mark.dist
def test_checkpoint_directory_holds_every_rank(out):
    step_dir = out / "deepspeed" / "checkpoints" / "in-progress" / "01-task" / "step-00000002"
    names = sorted(p.name for p in step_dir.iterdir())
    assert names == ["manifest.json", "progress.json", "rank-00000-of-00002.safetensors",
                     "rank-00001-of-00002.safetensors"]
    # Rank 0 wrote the manifest from digests each rank took of its own file.
    from launcher.run import manifest

    assert sorted(manifest.read(step_dir)) == names[1:]
    assert manifest.problem(step_dir) is None


def _single(seed: int = 0):
    model = tiny_llama(seed=seed)
    return build_engine("single", model, OptimConfig(lr=1e-2, weight_decay=0.1),
                        DistInfo(rank=0, world_size=1, local_rank=0, backend="gloo",
                                 device=torch.device("cpu")))


def _step(engine, seed: int) -> None:
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(seed))
    engine.backward(engine.forward({"input_ids": ids, "labels": ids}).loss)
    engine.step()


def test_single_engine_local_state_round_trip():
    engine = _single()
    _step(engine, 1)
    saved = engine.local_state()
    assert {"0.param", "0.exp_avg", "0.exp_avg_sq", "0.step"} <= set(saved)
    _step(engine, 2)
    want = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    other = _single(seed=1)  # different weights: everything must come from `saved`
    other.load_local_state(saved)
    _step(other, 2)
    for name, p in other.module.named_parameters():
        assert torch.equal(p, want[name]), name
    assert float(other.optimizer.state[next(other.module.parameters())]["step"]) == 2


def test_local_state_refuses_a_different_engine():
    saved = _single().local_state()
    engine = _single()
    with pytest.raises(ValueError, match="shape"):
        engine.load_local_state({**saved, "0.param": saved["0.param"][:1]})
    with pytest.raises(ValueError, match="tensors"):
        engine.load_local_state({k: v for k, v in saved.items() if not k.startswith("0.")})


def test_rng_state_has_no_cuda_key_without_cuda(tmp_path):
    from launcher.run import progress
    from ncft.run_paths import RunPaths

    engine = _single()
    assert set(progress.rng_state(torch.device("cpu"))) == {"rng.torch"}
    step_dir = progress.save(engine, RunPaths(tmp_path), 0, "task", 1, "single")
    saved = load_file(step_dir / "rank-00000-of-00001.safetensors")
    assert "rng.torch" in saved and "rng.cuda" not in saved
    expected = torch.rand(4)  # what the CPU generator draws right after the save
    # A checkpoint written on GPUs, resumed on CPU: the CUDA entry is ignored.
    state = {"rng.torch": saved["rng.torch"], "rng.cuda": torch.zeros(16, dtype=torch.uint8)}
    progress.restore_rng(state, torch.device("cpu"))
    assert state == {} and torch.equal(torch.rand(4), expected)
