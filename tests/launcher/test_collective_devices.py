"""Every collective issued by project code runs on the engine's device (CPU, 2 ranks).

NCCL rejects host tensors, but every CPU test runs gloo, which accepts them: a
collective on a host tensor would pass here and crash on GPUs. So these runs set
`NCFT_SIMULATED_DEVICE`: `launcher.dist.on_device` (the only placement helper) tags the
tensors it places with that label, and a recording wrapper around torch.distributed's
collectives (tests/support/collective_audit.py) flags any tensor without it. Under
the simulation every tensor the project creates on the host is one NCCL would reject
(which also makes every path the ZeRO-3 offload path, where scores live on the host).

Three real `ncft run`s on 2 gloo ranks cover engine build, attribution and cosine
scoring, selection (checksum), training, mid-task and stage checkpoints, evaluation
(classification and KV-cache generation), W-NCFT task vectors, the deactivation study
and export (ZeRO-3 bf16: gathering fp32 masters), on fsdp2, deepspeed and fsdp1. A
planted host-tensor all-reduce must be flagged, so the audit cannot pass vacuously.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.dist import SIMULATED_DEVICE_ENV, free_port
from tests.support.spawn import REPO, worker_env

pytestmark = pytest.mark.dist

WORKER = REPO / "tests" / "dist" / "collective_audit_worker.py"
SPEC = REPO / "examples" / "tiny_ncft.yaml"
LABEL = "simulated-accelerator:0"
COMMON = ["training.steps=2", "selection.num_examples=4", "eval.batch_size=4",
          "output.checkpoint_every=1", "engine.nproc_per_node=2"]
SST2 = "{source: {type: cl_benchmark, name: sst2}, train_size: 8, eval_size: 4, max_length: 176}"
RTE = "{source: {type: cl_benchmark, name: rte}, train_size: 8, eval_size: 4, max_length: 176}"
EN_ES = ("{source: {type: translation}, train_size: 8, eval_size: 3, max_length: 272}")
RUNS = {
    "fsdp2_wncft": ["engine.backend=fsdp2", f"tasks=[{SST2},{RTE}]", "method=wncft",
                    "wncft.num_samples=4", "study.deactivation=true", "study.finetune_steps=1",
                    "study.eval_examples=4"],
    "deepspeed_neft": ["engine.backend=deepspeed", f"tasks=[{SST2}]", "method=neurons",
                       "selection.scorer=weight_cosine", "selection.unit=row",
                       "selection.cosine_steps=2", "model.dtype=bfloat16"],
    "fsdp1_generation": ["engine.backend=fsdp1", f"tasks=[{EN_ES}]", "method=neurons",
                         "eval.max_new_tokens=4"],
}
# Where project code must have issued collectives (origin file: function). Building an
# engine issues none of its own since every rank reads its shard from the files.
EXPECTED_ORIGINS = {
    "fsdp2_wncft": ["ncft/scoring/attribution.py", "ncft/selection/topk.py", "ncft/evaluate.py",
                    "ncft/continual/wncft.py", "ncft/studies/deactivate.py",
                    "launcher/run/progress.py", "launcher/run/backend.py:save_stage",
                    # the studies' barriers (ncft.studies.run calls StudyBackend.barrier)
                    "launcher/run/backend.py:barrier"],
    "deepspeed_neft": ["ncft/scoring/cosine.py", "ncft/selection/topk.py", "ncft/evaluate.py",
                       "launcher/run/progress.py", "launcher/run/checkpoint.py"],
    "fsdp1_generation": ["ncft/scoring/attribution.py", "ncft/generation.py:_any_rank_running",
                         "ncft/generation.py:generate_greedy"],
}


def audit(out: Path, name: str, overrides: list[str], plant: bool = False,
          check: bool = True, simulated: bool = True, nproc: int = 2) -> list[dict]:
    """Run one audited `ncft run` on `nproc` ranks; return every rank's records.

    `simulated=False` (GPU runs) audits against the ranks' real CUDA devices.
    """
    run = out / name
    run.mkdir(parents=True, exist_ok=True)
    cache = out / "cache"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}",
           "--local-addr=127.0.0.1", str(WORKER), str(run), str(SPEC),
           "plant" if plant else "clean", *COMMON, *overrides, f"output.dir={run / 'run'}"]
    env = worker_env({SIMULATED_DEVICE_ENV: LABEL if simulated else "", "NCFT_CACHE": str(cache)})
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [r for rank in range(nproc) if (run / f"audit-rank{rank}.json").is_file()
            for r in json.loads((run / f"audit-rank{rank}.json").read_text())]


PLANTED = "fsdp2_wncft"  # this run also issues the planted host-tensor all-reduce


def _planted(record: dict) -> bool:
    return record["origin"].endswith("_planted_bug")


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("audit")
    return {name: audit(out, name, overrides, plant=name == PLANTED)
            for name, overrides in RUNS.items()}


@pytest.mark.parametrize("name", list(RUNS))
def test_every_project_collective_is_on_the_engine_device(records, name):
    bad = [r for r in records[name] if r["bad"] and not _planted(r)]
    assert not bad, json.dumps(bad[:5], indent=1)


@pytest.mark.parametrize("name", list(RUNS))
def test_audit_saw_every_phase(records, name):
    origins = {r["origin"] for r in records[name]}
    missing = [o for o in EXPECTED_ORIGINS[name] if not any(x.startswith(o) for x in origins)]
    assert not missing, (missing, sorted(origins))
    assert any(r["devices"] == [LABEL] for r in records[name]), "no tensor collective seen"


def test_planted_host_tensor_collective_is_flagged(records):
    planted = [r for r in records[PLANTED] if _planted(r)]
    assert len(planted) == 2 and all(r["bad"] and r["devices"] == ["cpu"] for r in planted)


def test_no_collective_imported_by_name():
    """`from torch.distributed import all_reduce` would escape the wrapper: none exist."""
    pattern = re.compile(r"from torch\.distributed import [^\n]*\b(all_|broadcast|barrier|reduce)")
    offenders = [str(p.relative_to(REPO)) for root in ("launcher", "ncft")
                 for p in (REPO / root).rglob("*.py") if pattern.search(p.read_text())]
    assert not offenders
