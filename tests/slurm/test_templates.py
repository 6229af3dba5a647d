"""What the real scheduler on this CPU machine cannot show about the templates: how
they read GPU counts SLURM writes on GPU clusters (typed, untyped, several types),
the override, the refusal of zero ranks, and a header any cluster accepts.

The ranks-per-node function is taken from each template and run by bash, so the
test checks the shipped code; `test_real_slurm.py` runs the whole templates.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.support.spawn import REPO

TEMPLATES = ["torchrun.slurm", "deepspeed.slurm"]


def _ranks(template: str, env: dict[str, str]) -> str:
    text = (REPO / "slurm" / template).read_text()
    function = re.search(r"^ranks_per_node\(\) \{.*?^\}", text, re.S | re.M).group(0)
    clean = {"PATH": "/usr/bin:/bin", **env}
    proc = subprocess.run(["bash", "-c", f"set -euo pipefail\n{function}\nranks_per_node"],
                          env=clean, capture_output=True, text=True, check=True)
    return proc.stdout.strip()


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize(
    ("env", "ranks"),
    [
        ({"SLURM_GPUS_ON_NODE": "8"}, "8"),
        ({"SLURM_GPUS_PER_NODE": "a100:8"}, "8"),
        ({"SLURM_GPUS_PER_NODE": "gpu:a100:4(IDX:0-3),gpu:v100:2(IDX:4,6)"}, "6"),
        ({"SLURM_GPUS_ON_NODE": "4", "SLURM_GPUS_PER_NODE": "a100:8"}, "4"),  # on the node
        ({"SLURM_GPUS_ON_NODE": "0"}, "0"),
        ({}, "0"),
        ({"NCFT_RANKS_PER_NODE": "3", "SLURM_GPUS_ON_NODE": "8"}, "3"),
    ],
)
def test_ranks_per_node_from_slurm_gpu_variables(template, env, ranks):
    assert _ranks(template, env) == ranks


@pytest.mark.parametrize("template", TEMPLATES)
def test_zero_ranks_is_refused_with_the_fix(template, tmp_path):
    proc = subprocess.run(
        ["bash", str(REPO / "slurm" / template), "run", "spec.yaml"], cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "SLURM_GPUS_ON_NODE": "0", "SLURM_JOB_ID": "1"},
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "--gpus-per-node=N" in proc.stderr and "NCFT_RANKS_PER_NODE=N" in proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("template", TEMPLATES)
def test_header_requests_no_gpus_and_asks_for_the_signal_and_requeue(template):
    header = [line for line in (REPO / "slurm" / template).read_text().splitlines()
              if line.startswith("#SBATCH")]
    assert not [line for line in header if "gpu" in line or "gres" in line]
    assert "#SBATCH --signal=TERM@120" in header and "#SBATCH --requeue" in header
    assert "#SBATCH --open-mode=append" in header  # a requeued job appends to its log
