"""`training.update: sparse_delta` through `ncft run`: same models as masked training.

tests/dist/sparse_delta_service_worker.py runs NCFT and W-NCFT (two stages, each
building its deltas from its own NeuronSet) and single-task NeFT rows once per update
mode with weight decay, clipping and accumulation, and an NCFT sparse-delta run killed
mid-task and resumed from its per-rank checkpoint (which holds the delta parameters).

Tolerance: every stage checkpoint and `final/` equal the masked run's within atol
1e-5 (fp32; the sparse forward sums selected columns separately, so activations
differ in the last bits); scores agree within 1e-6 on these tiny eval sets (identical
in practice). The resumed run equals the uninterrupted sparse-delta run bit for bit,
in fp32 and with bf16 compute (frozen base stored in bf16), and the bf16 run's
checkpoint keeps the fp32 base values outside the selection bit for bit.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ncft.neuron_set import NeuronSet
from tests.dist.sparse_delta_service_worker import RUNS
from tests.support.spawn import REPO, worker_env

pytestmark = pytest.mark.dist
ATOL = 1e-5
STAGES = {"ncft": ("01-sst2", "02-rte"), "wncft": ("01-sst2", "02-rte"), "neft_rows": ("01-sst2",)}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("sparse_delta_service")
    env = worker_env({"NCFT_CACHE": str(tmp_path_factory.mktemp("cache"))})
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "dist" / "sparse_delta_service_worker.py"),
         str(out), ",".join(RUNS)], env=env, cwd=REPO, capture_output=True, text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


def _weights(run, stage: str) -> dict[str, torch.Tensor]:
    path = run / ("final" if stage == "final" else f"checkpoints/{stage}") / "model.safetensors"
    return load_file(path)


@pytest.mark.parametrize("name", list(RUNS))
def test_sparse_delta_run_equals_masked_run(out, name):
    masked, sparse = out / "masked" / name, out / "sparse_delta" / name
    for stage in (*STAGES[name], "final"):
        a, b = _weights(sparse, stage), _weights(masked, stage)
        assert a.keys() == b.keys(), stage  # no delta parameters saved
        assert not any("ncft_delta" in k for k in a)
        for key in b:
            torch.testing.assert_close(a[key], b[key], atol=ATOL, rtol=0, msg=f"{stage} {key}")
    res_a, res_b = (json.loads((r / "results.json").read_text()) for r in (sparse, masked))
    flat_a = [v for row in res_a["matrix"] for v in row if v is not None]
    flat_b = [v for row in res_b["matrix"] for v in row if v is not None]
    assert flat_a == pytest.approx(flat_b, abs=1e-6)


def test_second_stage_trains_its_own_selection(out):
    run = out / "sparse_delta" / "ncft"
    first, second = _weights(run, "01-sst2"), _weights(run, "02-rte")
    changed = [k for k in first if not torch.equal(first[k], second[k])]
    assert changed and all(".mlp." in k for k in changed)


@pytest.mark.parametrize("ref,killed", [("sparse_delta", "killed"), ("bf16", "bf16_killed")])
def test_mid_task_resume_equals_uninterrupted(out, ref, killed):
    ref, got = out / ref / "ncft", out / killed / "ncft"
    for stage in (*STAGES["ncft"], "final"):
        a, b = _weights(got, stage), _weights(ref, stage)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b), stage
    res_a, res_b = (json.loads((r / "results.json").read_text()) for r in (got, ref))
    assert res_a["matrix"] == res_b["matrix"]


def test_bf16_run_keeps_unselected_elements_exact(out):
    # bf16 compute stores the frozen base in bf16 (launcher/engines/frozen.py); the
    # stage checkpoint must still hold the fp32 base values outside the selection,
    # as the fp32 run's does. Each run scored its own NeuronSet, so the elements
    # compared are those outside both.
    fp32, bf16 = out / "sparse_delta" / "ncft", out / "bf16" / "ncft"
    sets = [NeuronSet.load(run / "neurons" / "sst2.safetensors") for run in (fp32, bf16)]
    got, want = _weights(bf16, "01-sst2"), _weights(fp32, "01-sst2")
    assert got.keys() == want.keys()
    for key, value in want.items():
        keep = torch.ones(value.shape, dtype=torch.bool)
        for nset in sets:
            if key in nset.entries:
                keep &= ~nset.dense_mask(key, value.shape)
        assert got[key].dtype == torch.float32 and keep.any(), key
        assert torch.equal(got[key][keep], value[keep]), key
