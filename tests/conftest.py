"""Suite-wide rules: `gpu` tests are skipped without CUDA, never faked."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (bf16 / NCCL / offload path)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    # Two shared cores: torch's default thread pool oversubscribes them and a tiny
    # forward can take 60x longer. Spawned ranks get OMP_NUM_THREADS=1 likewise.
    torch.set_num_threads(1)
