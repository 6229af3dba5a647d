"""Distributed setup in one place: init, rank helpers, teardown.

Every entry point calls `init_distributed()` once; a process started without a
launcher becomes a world of one, so every engine can rely on a process group.
"""

from __future__ import annotations

import datetime
import gc
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    Attributes:
        rank: Global rank.
        world_size: Number of processes.
        local_rank: Rank on this node (picks the GPU).
        backend: `nccl` on GPUs, `gloo` on CPU.
        device: The device this rank computes on.
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device

    @property
    def is_main_process(self) -> bool:
        """True on global rank 0."""
        return self.rank == 0


def default_backend() -> str:
    """`nccl` when CUDA is available, else `gloo`."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def free_port() -> int:
    """An unused TCP port on loopback (for single-process groups and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(timeout_s: int = 600) -> DistInfo:
    """Join (or create) the default process group and return this rank's place.

    Reads the torchrun/deepspeed/srun environment (`RANK`, `WORLD_SIZE`,
    `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`). Without it, creates a world of one on
    loopback. Idempotent.
    """
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
        )
    # Gloo picks an interface from the hostname, which is flaky on machines whose
    # hostname does not resolve to loopback; a loopback rendezvous means loopback.
    if os.environ.get("MASTER_ADDR") in _LOOPBACK:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    backend = default_backend()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if backend == "nccl" else None,
        )
    return DistInfo(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
        backend=backend, device=device,
    )


def rank() -> int:
    """Global rank, 0 without a process group."""
    return dist.get_rank() if dist.is_initialized() else 0


def print0(*args, **kwargs) -> None:
    """`print` on global rank 0 only, flushed (ranks interleave otherwise)."""
    if rank() == 0:
        print(*args, **kwargs, flush=True)


def shutdown() -> None:
    """Tear the process group down cleanly.

    Engines hold references to communicators and to background threads (DeepSpeed's
    partition hooks, gloo's work queues). Destroying the group while those objects
    are still alive lets their destructors run during interpreter exit, after the
    group is gone, where a joinable std::thread aborts the process ("terminate
    called without an active exception"). So: collect garbage first, wait for every
    rank, then destroy.
    """
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
