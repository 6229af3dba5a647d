"""`ncft run` NCFT with `training.update: sparse_delta` on 2 real ranks (FSDP2, ZeRO-3).

Sharded loading builds each stage's model on meta and fills every rank's shard from
the files; the deltas' start values come from their base rows
(`launcher.run.delta_weights`). Every stage checkpoint and `final/` must equal the
masked run's on the same engine within atol 1e-5 (fp32; see
tests/ncft/test_sparse_delta_dist.py for why not bit for bit).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.launcher.run.test_run_e2e import SMALL, SPEC, _ncft

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("backend", ["fsdp2", "deepspeed"])
def test_sparse_delta_run_equals_masked_run(tmp_path, backend):
    cache = tmp_path / "cache"
    runs, loads = {}, {}
    for update in ("masked", "sparse_delta"):
        runs[update] = tmp_path / update
        proc = _ncft(["run", str(SPEC), f"output.dir={runs[update]}", f"engine.backend={backend}",
                      *SMALL, "training.steps=2", "training.weight_decay=0.1",
                      f"training.update={update}"], cache)
        # A sharded build prints one load line per rank (`loading.report`); a rank that
        # loads the whole model says so (`RunBackend.load_model`).
        lines = proc.stdout.splitlines()
        loads[update] = (sum(line.startswith(f"[rank 1] {backend} load from") for line in lines),
                         sum("whole model loaded" in line for line in lines))
    for sharded, whole in loads.values():
        assert sharded >= 3 and whole == 0, loads  # at least one build per stage
    stages = sorted(p.name for p in (runs["masked"] / "checkpoints").iterdir())
    assert len(stages) == 3
    for rel in [f"checkpoints/{s}/model.safetensors" for s in stages] + ["final/model.safetensors"]:
        a, b = (load_file(runs[u] / rel) for u in ("sparse_delta", "masked"))
        assert a.keys() == b.keys(), rel
        for key in b:
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0, msg=f"{rel} {key}")
