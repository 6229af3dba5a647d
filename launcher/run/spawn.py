"""Run a Python entry point on N local ranks with the torch elastic API.

Under an existing launcher (torchrun, deepspeed, srun with the torch env set) the
entry point runs directly as this process's rank; with one process it runs in
place; otherwise it spawns `nproc` workers on loopback and fails if any fails.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import Any

from launcher.dist import free_port


def under_launcher() -> bool:
    """True if a launcher already set this process's rank environment."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def run_local(entry: Callable[..., Any], nproc: int, *args: Any) -> None:
    """Call `entry(*args)` on `nproc` ranks of this machine.

    Args:
        entry: A module-level function (workers are spawned, so it is pickled).
        nproc: Ranks to run; 1 runs in this process.
        *args: Picklable arguments.

    Raises:
        RuntimeError: If any rank fails (the elastic agent's error names it).
    """
    if under_launcher() or nproc == 1:
        entry(*args)
        return
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # DeepSpeed reads this at import time in each worker; gloo must stay on loopback.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex[:8],
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=0,
        local_addr="127.0.0.1", monitor_interval=0.5,
    )
    elastic_launch(config, entry)(*args)
