"""Sparse-delta training equals masked training on real shards (gloo, 1-3 ranks).

tests/dist/sparse_delta_worker.py trains the same tiny Llama with the same data,
seed, AdamW weight decay 0.1, biting clipping and accumulation 2 twice per engine:
`training.update: masked` and `sparse_delta`, over neuron units (gate/up rows and
biases, down columns) and NeFT rows (q_proj, o_proj).

Tolerance: final weights agree within atol 1e-5 (fp32) with the masked run on the
same engine and with the single-process masked reference. Four steps at lr 1e-2 move
selected weights by about 4e-2; the largest disagreement measured was 2.2e-6
(FSDP2, 2 ranks): the sparse forward sums the selected columns separately, so
activations differ in the last bits. Grad norms (what clipping uses) agree to rel
1e-6. Unselected elements are bit-identical to the initial weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ncft.neuron_set import NeuronSet
from tests.support.spawn import REPO, torchrun

pytestmark = pytest.mark.dist

WORKER = REPO / "tests" / "dist" / "sparse_delta_worker.py"
SHARDED = ("deepspeed", "fsdp2", "fsdp1")
RUNS = [("single", 1)] + [(b, w) for w in (1, 2, 3) for b in SHARDED]
ATOL = 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sparse_delta")
    torchrun(WORKER, 1, ["--out", str(out), "--backends", "single," + ",".join(SHARDED)])
    for world in (2, 3):
        torchrun(WORKER, world, ["--out", str(out), "--backends", ",".join(SHARDED)])
    return out


def _arm(out: Path, backend: str, world: int, update: str) -> tuple[dict, dict]:
    tag = f"{backend}_ws{world}_{update}"
    return load_file(out / f"{tag}.safetensors"), json.loads((out / f"{tag}.json").read_text())


@pytest.mark.parametrize("backend,world", RUNS)
def test_sparse_delta_equals_masked(results, backend, world):
    sparse, sparse_report = _arm(results, backend, world, "sparse_delta")
    masked, masked_report = _arm(results, backend, world, "masked")
    reference, _ = _arm(results, "single", 1, "masked")
    init = load_file(results / "init.safetensors")
    nset = NeuronSet.load(results / "neurons.safetensors")
    assert set(sparse) == set(masked) == set(init)  # no delta parameters exported
    for name in init:
        torch.testing.assert_close(sparse[name], masked[name], atol=ATOL, rtol=0)
        torch.testing.assert_close(sparse[name], reference[name], atol=ATOL, rtol=0)
        outside = ~nset.dense_mask(name, init[name].shape)
        moved = (sparse[name] != init[name]) & outside
        assert not moved.any(), f"{name}: {int(moved.sum())} unselected elements moved"
        if name in nset.entries:  # and the selection really trained
            assert bool((sparse[name] != init[name]).any()), name
    torch.testing.assert_close(
        torch.tensor(sparse_report["grad_norms"]), torch.tensor(masked_report["grad_norms"]),
        rtol=1e-5, atol=0,
    )
    assert sparse_report["probe_loss"] == pytest.approx(masked_report["probe_loss"], abs=1e-5)


@pytest.mark.parametrize("backend,world", RUNS)
def test_sparse_delta_keeps_state_for_selected_elements_only(results, backend, world):
    _, sparse_report = _arm(results, backend, world, "sparse_delta")
    _, masked_report = _arm(results, backend, world, "masked")
    nset = NeuronSet.load(results / "neurons.safetensors")
    init = load_file(results / "init.safetensors")
    selected = sum(int(nset.dense_mask(n, init[n].shape).sum()) for n in nset.entries)
    # Rank 0's share of the selected elements; masked keeps whole matrices.
    assert sparse_report["local_trainable_numel"] <= -(-selected // world) + 64
    assert masked_report["local_trainable_numel"] > 5 * sparse_report["local_trainable_numel"]
