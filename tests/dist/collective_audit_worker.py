"""One launched job: `ncft run` under the collective-device audit.

Run under torchrun by tests/launcher/test_collective_devices.py (2 gloo ranks, with
`NCFT_SIMULATED_DEVICE` set) and by tests/launcher/engines/test_gpu.py (NCCL, no
simulation). The audit is installed before any project module is imported, then a
real run goes through engine build, scoring, selection, training, mid-task and stage
checkpoints, evaluation and export. Each rank writes its records to
`<out>/audit-rank<r>.json`.

`--plant` first issues one all-reduce on a plain host tensor from this file (audited
for the occasion): the self check that such a call is flagged.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from tests.support import collective_audit


def _planted_bug(device) -> None:
    import torch.distributed as dist

    del device  # the bug: the tensor stays on the host
    dist.all_reduce(torch.ones(1))


def main(out: Path, spec: str, overrides: list[str], plant: bool) -> None:
    from launcher.dist import SIMULATED_DEVICE_ENV, init_distributed

    # The simulated accelerator on CPU; on GPUs the rank's own device.
    expected = os.environ.get(SIMULATED_DEVICE_ENV) or (
        f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
    collective_audit.install(expected, extra_roots=(__file__,) if plant else ())
    info = init_distributed()
    torch.set_num_threads(1)
    try:
        if plant:
            _planted_bug(info.device)
        from launcher.run.experiment import main_run

        main_run(spec, overrides)
    finally:
        collective_audit.dump(out / f"audit-rank{info.rank}.json")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[4:], sys.argv[3] == "plant")
