"""`training.activation_checkpointing` on every engine, with masks (fp32, CPU, gloo).

tests/dist/checkpointing_worker.py trains the same masked run with and without
activation checkpointing: single at 1 rank, deepspeed/fsdp2/fsdp1 at 2 ranks.
Tolerance: losses and trained weights agree within atol 1e-6, rtol 1e-5 (fp32); the
recompute replays the same kernels, and on CPU the measured difference was 0 (bit
identical) on every engine. Checkpointing must really be on (layer 0's MLP runs
forward twice per micro-batch: once in forward, once in the backward's recompute),
and gradient-attribution scoring on the checkpointed engine must give the same
scores (it runs in eval mode, where transformers does not checkpoint).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.spawn import REPO, torchrun

pytestmark = pytest.mark.dist

WORKER = REPO / "tests" / "dist" / "checkpointing_worker.py"
RUNS = [("single", 1), ("deepspeed", 2), ("fsdp2", 2), ("fsdp1", 2)]
ATOL, RTOL = 1e-6, 1e-5
MICRO_BATCHES = 6  # 3 steps x accumulation 2


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("checkpointing")
    torchrun(WORKER, 1, ["--out", str(out), "--backends", "single"])
    torchrun(WORKER, 2, ["--out", str(out)])
    return out


def _load(out: Path, backend: str, world: int, on: bool):
    tag = f"{backend}_ws{world}_ckpt{int(on)}"
    report = json.loads((out / f"{tag}.json").read_text())
    return (report, load_file(out / f"{tag}.safetensors"),
            load_file(out / f"{tag}_scores.safetensors"))


@pytest.mark.parametrize("backend,world", RUNS)
def test_same_losses_weights_and_scores_with_checkpointing(results, backend, world):
    plain, plain_w, plain_s = _load(results, backend, world, False)
    ckpt, ckpt_w, ckpt_s = _load(results, backend, world, True)
    assert plain["layer0_forwards"] == MICRO_BATCHES
    assert ckpt["layer0_forwards"] == 2 * MICRO_BATCHES, "activations were not recomputed"
    assert ckpt["losses"] == pytest.approx(plain["losses"], rel=RTOL, abs=ATOL)
    for name, tensor in plain_w.items():
        torch.testing.assert_close(ckpt_w[name], tensor, atol=ATOL, rtol=RTOL, msg=name)
    for name, tensor in plain_s.items():
        torch.testing.assert_close(ckpt_s[name], tensor, atol=0, rtol=1e-9, msg=name)
