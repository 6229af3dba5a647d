"""FSDP2 (and FSDP1 on NCCL) built from real weights on rank 0 only, meta elsewhere."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.support.spawn import REPO, torchrun

pytestmark = pytest.mark.dist

WORKER = REPO / "tests" / "dist" / "meta_init_worker.py"


@pytest.mark.parametrize("world", [3])  # uneven shards (2 ranks: every run's default)
def test_meta_ranks_receive_rank0_weights_and_buffers(tmp_path, world):
    torchrun(WORKER, world, [str(tmp_path)])
    _check(tmp_path, world)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per rank")
def test_fsdp1_meta_ranks_receive_rank0_states_on_nccl(tmp_path):
    # The path LauncherBackend takes for FSDP1 on NCCL with several ranks.
    torchrun(WORKER, 2, [str(tmp_path), "fsdp1"], env={"DS_ACCELERATOR": "cuda"})
    _check(tmp_path, 2, tol=1e-4)  # GPU logits against the CPU reference


def _check(tmp_path, world: int, tol: float = 1e-5) -> None:
    saved = load_file(tmp_path / "weights.safetensors")
    names = [k[4:] for k in saved if k.startswith("got.")]
    assert names, "no parameters gathered"
    for name in names:
        assert torch.equal(saved["got." + name], saved["ref." + name]), name
    # Logits on every rank equal the single-process model's: the meta ranks got the
    # rotary buffers too (a non-persistent buffer, in no checkpoint).
    for rank in range(world):
        logits = load_file(tmp_path / f"logits_rank{rank}.safetensors")["logits"]
        torch.testing.assert_close(logits, saved["ref_logits"], rtol=tol, atol=tol)
