"""Frozen weights stored in bf16: exact exports, same training, same resume (CPU, gloo).

tests/dist/frozen_worker.py trains 3 steps with bf16 compute on single (1 rank), FSDP1
(2 ranks) and FSDP2 (3 ranks: shards that do not divide the rows evenly), from fp32
and from bf16 source files, masked and sparse_delta, once with frozen parameters
lowered to bf16 and once with fp32 copies (the reference). Here: frozen tensors really
are bf16 on the device and trainable ones fp32 (single: products' weights bf16, the
rest fp32); a bf16 source needs no host copy at all; unselected elements of every
export equal the source file bit for bit; selected elements are within 1e-5 of the
reference and moved; restoring step 2's local state into a fresh engine gives the
uninterrupted export bit for bit. The SIGKILL resume of a bf16 run is
tests/launcher/run/test_sparse_delta_service.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launcher.engines.frozen import FrozenStore
from launcher.run.checkpoint import iter_saved_tensors
from ncft.neuron_set import NeuronSet
from tests.support.spawn import REPO, torchrun

WORKER = REPO / "tests" / "dist" / "frozen_worker.py"
RUNS = [("single", 1), ("fsdp1", 2), ("fsdp2", 3)]
CASES = [(b, w, d, u) for b, w in RUNS for d in ("float32", "bfloat16")
         for u in ("masked", "sparse_delta")]
SELECTED_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("frozen")
    for world in sorted({w for _, w in RUNS}):
        backends = ",".join(b for b, w in RUNS if w == world)
        torchrun(WORKER, world, ["--out", str(out), "--backends", backends], timeout=900)
    return out


@pytest.mark.dist
@pytest.mark.parametrize("backend,world,dtype,update", CASES)
def test_lowered_frozen_weights_keep_exports_exact(results, backend, world, dtype, update):
    tag = f"{backend}-{dtype}-{update}-ws{world}"
    for report in json.loads((results / f"{tag}.json").read_text()):
        # single lowers only products' weights (embeddings, norms, biases stay fp32)
        frozen = ["torch.bfloat16", "torch.float32"] if backend == "single" else \
            ["torch.bfloat16"]
        assert report["dtypes"] == {"frozen": frozen, "trainable": ["torch.float32"]}
        if dtype == "bfloat16":  # every source value is exact in bf16: nothing kept
            assert report["host_bytes_at_build"] == 0
        else:
            assert report["host_bytes_at_build"] > 0
    nset = NeuronSet.load(results / "nset.safetensors")
    source = dict(iter_saved_tensors(results / f"source-{dtype}"))
    ref, low, resumed = (load_file(results / f"{tag}_{phase}.safetensors")
                         for phase in ("reference", "lowered", "resumed"))
    assert low.keys() == ref.keys() == source.keys()
    moved = total = 0
    for name, src in source.items():
        src = src.float()
        assert low[name].dtype == torch.float32, name
        assert torch.equal(resumed[name], low[name]), f"{name}: resume differs"
        selected = (nset.dense_mask(name, src.shape) if name in nset.entries
                    else torch.zeros(src.shape, dtype=torch.bool))
        for run in (low, ref):
            assert torch.equal(run[name][~selected], src[~selected]), f"{name}: unselected moved"
        diff = (low[name][selected] - ref[name][selected]).abs()
        assert diff.numel() == 0 or float(diff.max()) <= SELECTED_TOLERANCE, (name, diff.max())
        moved += int((low[name][selected] != src[selected]).sum())
        total += int(selected.sum())
    assert total > 0 and moved / total > 0.9, (moved, total)


def test_store_keeps_only_what_the_compute_dtype_loses():
    store = FrozenStore(torch.bfloat16)
    exact_bf16 = torch.randn(64).bfloat16().float()
    store.record("a", exact_bf16)
    assert store.host_bytes() == 0
    fp16 = torch.randn(64).half().float()  # fp16 values: kept as fp16, not fp32
    store.record("b", fp16)
    assert store.host_bytes() == 64 * 2
    assert torch.equal(store.exact("b", fp16.bfloat16()), fp16)
    patched = exact_bf16.clone()
    patched[[3, 40]] = torch.tensor([0.1234567, -7.654321])  # two trained values written back
    store.write("a", low := torch.empty(64, dtype=torch.bfloat16), patched)
    # "a" is a patch now (positions and fp32 values), beside "b"'s fp16 copy
    assert store.host_bytes() == 64 * 2 + 2 * (8 + 4)
    assert torch.equal(store.exact("a", low), patched)
    store.keep_range("a", 32, 64)  # a shard's piece: the patch keeps element 40 only
    assert torch.equal(store.exact("a", low[32:]), patched[32:])
    full = torch.randn(8, 4)
    store.record("c", full)
    store.keep_rows("c", 2, 5, (8, 4))
    assert torch.equal(store.exact("c", full[2:5].bfloat16()), full[2:5])
