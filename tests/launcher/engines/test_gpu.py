"""GPU-only checks of the engines: bf16 with fp32 masters on NCCL, device-correct
collectives on CUDA, CUDA RNG state in mid-task checkpoints.

Skipped without CUDA (tests/conftest.py), never faked. Each needs one GPU (world size
1 on NCCL); the collective audit uses 2 ranks when 2 GPUs exist.
"""

from __future__ import annotations

import pytest
import torch

from launcher.dist import SIMULATED_DEVICE_ENV
from tests.launcher.engines.test_precision import WORKER as PRECISION_WORKER
from tests.launcher.engines.test_precision import check_precision_run
from tests.support.spawn import torchrun

pytestmark = pytest.mark.gpu

ENGINES = ("single", "fsdp2", "fsdp1", "deepspeed")


@pytest.mark.dist
@pytest.mark.parametrize("backend", ENGINES)
def test_masked_bf16_step_fp32_masters_nccl(tmp_path, backend):
    """One masked bf16 run per engine at world size 1 on NCCL: bf16 logits, fp32
    masters and moments, selected masters moved by lr 1e-6, unselected bit-identical
    in masters, gathered weights and export."""
    torchrun(PRECISION_WORKER, 1, ["--out", str(tmp_path), "--backends", backend])
    check_precision_run(tmp_path, backend, 1, "cuda")


@pytest.mark.dist
@pytest.mark.parametrize("name", ["fsdp2_wncft", "deepspeed_neft", "fsdp1_generation"])
def test_collectives_on_cuda_device(tmp_path, name, monkeypatch):
    """The collective audit on real GPUs: every project collective's tensor on the
    rank's `cuda:N` (NCCL would also reject a host tensor outright)."""
    from tests.launcher import test_collective_devices as audit

    monkeypatch.delenv(SIMULATED_DEVICE_ENV, raising=False)
    world = min(2, torch.cuda.device_count())
    records = audit.audit(tmp_path, name, [*audit.RUNS[name],
                                           f"engine.nproc_per_node={world}"],
                          simulated=False, nproc=world)
    assert records and not [r for r in records if r["bad"]], [r for r in records if r["bad"]][:5]
    assert any(r["devices"] == ["cuda:0"] for r in records if r["op"] == "all_reduce")


def test_cuda_rng_state_round_trip(tmp_path):
    """A mid-task checkpoint on CUDA stores the rank's CUDA generator and restores it."""
    from safetensors.torch import load_file

    from launcher.dist import DistInfo
    from launcher.engines import OptimConfig, build_engine
    from launcher.run import progress
    from ncft.run_paths import RunPaths
    from tests.support.tiny import tiny_llama

    device = torch.device("cuda", 0)
    info = DistInfo(rank=0, world_size=1, local_rank=0, backend="nccl", device=device)
    engine = build_engine("single", tiny_llama(), OptimConfig(), info)
    torch.cuda.manual_seed(1234)
    step_dir = progress.save(engine, RunPaths(tmp_path), 0, "task", 1, "single")
    saved = load_file(step_dir / "rank-00000-of-00001.safetensors")
    assert "rng.cuda" in saved
    expected = torch.rand(8, device=device)
    torch.cuda.manual_seed(99)
    progress.load(engine, step_dir, "single")
    assert torch.equal(torch.rand(8, device=device), expected)
