"""GPU-only paths: bf16 on NCCL for every engine, and ZeRO-3 with CPU offload.

Skipped on machines without CUDA (tests/conftest.py); never faked on CPU.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from ncft.neuron_set import NeuronSet
from tests.ncft.masks.test_dist import WORKER, _allowed, _changed_units
from tests.support.spawn import torchrun

pytestmark = [pytest.mark.gpu, pytest.mark.dist]


def _check(out, tag):
    set_a = NeuronSet.load(out / "set_a.safetensors")
    set_b = NeuronSet.load(out / "set_b.safetensors")
    init, mid, final = (load_file(out / f"{tag}_{p}.safetensors") for p in ("init", "mid", "final"))
    for name in init:
        assert not ((init[name] != mid[name]) & ~_allowed(set_a, name, init[name].shape)).any()
        assert not ((mid[name] != final[name]) & ~_allowed(set_b, name, init[name].shape)).any()
    assert _changed_units(init, mid, set_a) == []


@pytest.mark.parametrize("backend", ["deepspeed", "fsdp2", "fsdp1"])
def test_bf16_nccl_masks_bit_identical(tmp_path, backend):
    world = min(2, torch.cuda.device_count())
    torchrun(WORKER, world, ["--out", str(tmp_path), "--backends", backend,
                             "--dtype", "bfloat16"])
    _check(tmp_path, f"{backend}_ws{world}")


def test_zero3_cpu_offload_masks_bit_identical(tmp_path):
    world = min(2, torch.cuda.device_count())
    torchrun(WORKER, world, ["--out", str(tmp_path), "--backends", "deepspeed",
                             "--ds-config", "zero3_offload", "--grad-clip", "0"])
    _check(tmp_path, f"deepspeed_ws{world}")
