"""bf16 compute with fp32 masters on every engine (CPU, gloo, 1 and 2 ranks).

tests/dist/precision_worker.py trains 3 masked AdamW steps at lr 1e-6 with
`compute_dtype=bfloat16` on a tiny fp32 Llama (weights ~0.02, where bf16's spacing is
~1.2e-4, so each update is ~100x below what a bf16 parameter can hold). The fp32
masters must take every selected update, leave every unselected element
bit-identical (local masters, gathered weights and the consolidated export), and the
optimizer must hold fp32 tensors and fp32 Adam moments while logits come out bf16.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launcher.run.checkpoint import iter_saved_tensors
from ncft.neuron_set import NeuronSet
from tests.support.spawn import REPO, torchrun

pytestmark = pytest.mark.dist

WORKER = REPO / "tests" / "dist" / "precision_worker.py"
SHARDED = ("deepspeed", "fsdp2", "fsdp1")
RUNS = [("single", 1)] + [(b, w) for w in (1, 2) for b in SHARDED]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("precision")
    torchrun(WORKER, 1, ["--out", str(out), "--backends", "single," + ",".join(SHARDED)])
    torchrun(WORKER, 2, ["--out", str(out)])
    return out


def check_precision_run(out: Path, backend: str, world: int, device_type: str) -> None:
    """Every assertion of this module on one run's files (also used by test_gpu)."""
    tag = f"{backend}_ws{world}"
    for report in json.loads((out / f"{tag}.json").read_text()):
        assert report["name"] == backend
        assert report["device"].startswith(device_type)
        assert report["logits_dtype"] == "torch.bfloat16", "compute must run in bf16"
        assert report["optimizer_dtypes"] == ["torch.float32"], "masters must be fp32"
        assert report["moment_dtypes"] == ["torch.float32"], "Adam moments must be fp32"
        assert report["frozen_masters_identical"], "an unselected master element moved"
        assert report["selected_masters_moved"], "a selected master element did not move"
    nset = NeuronSet.load(out / "set_a.safetensors")
    before = load_file(out / f"{tag}_before.safetensors")
    after = load_file(out / f"{tag}_after.safetensors")
    exported = dict(iter_saved_tensors(out / f"{tag}_export"))
    below_bf16 = total = 0
    for name, init in before.items():
        assert init.dtype == after[name].dtype == exported[name].dtype == torch.float32, name
        allowed = nset.dense_mask(name, init.shape)
        assert torch.equal(after[name][~allowed], init[~allowed]), f"{name}: unselected moved"
        assert torch.equal(exported[name], after[name]), f"{name}: export differs from masters"
        sel_old, sel_new = init[allowed], after[name][allowed]
        assert bool((sel_new != sel_old).all()), f"{name}: a selected element did not move"
        below_bf16 += int((sel_new.bfloat16() == sel_old.bfloat16()).sum())
        total += sel_old.numel()
    # The control: in bf16 nearly every one of these updates rounds away.
    assert total > 0 and below_bf16 / total > 0.9, (below_bf16, total)


@pytest.mark.parametrize("backend,world", RUNS)
def test_bf16_compute_fp32_masters_masked(results, backend, world):
    check_precision_run(results, backend, world, "cpu")
