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
