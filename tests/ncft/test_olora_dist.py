"""O-LoRA on every engine: the sharded runs equal one process (gloo, 1-3 ranks).

The reference is O-LoRA's definition on one process: `olora.penalty` on the whole
model added to the micro-batch loss. Every other run applies the penalty the way
training does (`olora.add_penalty_grad`: gathered A/B matrices, gradient added to the
local shards), on the single engine here and on FSDP2, ZeRO-3 (parameters really
partitioned) and FSDP1 at 2 and 3 ranks (tests/dist/olora_worker.py). All train
task1's adapter for 3 steps on the same global batch; task0's adapter must not move.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launcher.engines import OptimConfig, build_engine
from ncft import olora
from tests.dist import olora_worker
from tests.support.olora import LAMBDAS, STEPS, batch_rows, two_adapter_model
from tests.support.spawn import CPU_RANK as CPU
from tests.support.spawn import REPO, run_single_here, torchrun

pytestmark = pytest.mark.dist

WORKER = REPO / "tests" / "dist" / "olora_worker.py"
RUNS = [("single", 1)] + [(b, w) for w in (2, 3) for b in ("fsdp2", "deepspeed", "fsdp1")]


def _reference() -> tuple[dict[str, torch.Tensor], list[float]]:
    model = two_adapter_model()
    engine = build_engine("single", model, OptimConfig(lr=1e-2, micro_batch_size=6), CPU)
    norms = []
    for _ in range(STEPS):
        rows = batch_rows(0, 1)
        loss = engine.forward({"input_ids": rows, "labels": rows}).loss
        engine.backward(loss + olora.penalty(model, 1, *LAMBDAS))
        norms.append(engine.step().grad_norm)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if ".task" in n}
    return weights, norms


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("olora")
    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (out / "ds_partitioned.json").write_text(json.dumps(config))
    run_single_here(olora_worker.run_backend, out)
    torchrun(WORKER, 2, ["--out", str(out)])
    torchrun(WORKER, 3, ["--out", str(out)])
    return out


@pytest.mark.parametrize("backend,world", RUNS)
def test_olora_equals_one_process(results, backend, world):
    want, want_norms = _reference()
    got = load_file(results / f"{backend}_ws{world}.safetensors")
    report = json.loads((results / f"{backend}_ws{world}.json").read_text())
    assert set(got) == set(want) and any(".task1." in n for n in got)
    start = {n: p.detach() for n, p in two_adapter_model().named_parameters() if ".task" in n}
    for name, value in want.items():
        if ".task0." in name:  # the earlier adapter is frozen: bit-identical
            assert torch.equal(got[name], start[name]), name
        else:
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(want[n], start[n]) for n in want if "lora_A.task1" in n)
    assert report["norms"] == pytest.approx(want_norms, rel=1e-5)
    assert all(p > 0 for p in report["penalties"])  # the earlier A's are not orthogonal
