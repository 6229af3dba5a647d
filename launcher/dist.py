"""Distributed setup in one place: init, rank helpers, collectives, teardown.

Every entry point calls `init_distributed()` once; a process started without a
launcher becomes a world of one, so every engine can rely on a process group.

Every collective that `launcher/` or `ncft/` issues goes through the helpers below
(`all_reduce_`, `broadcast_`, `any_rank`, `barrier`, `broadcast_object`), which place
the tensor on the device the engine computes on and copy the result back. NCCL
rejects CPU tensors, and tensors created on the host (counts, flags, scores summed on
CPU under ZeRO-3 offload) are easy to pass by accident; the helper makes that
impossible by construction. `tests/launcher/test_collective_devices.py` checks that
no collective bypasses it.
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
# Test hook: a label for a simulated accelerator. With it set, `on_device` tags the
# tensors it places with this label, so a CPU-only test can tell a tensor that went
# through the placement helper from a plain host tensor (which NCCL would reject).
SIMULATED_DEVICE_ENV = "NCFT_SIMULATED_DEVICE"


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


def on_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device` for a collective: itself if already there, else a copy.

    Under the `NCFT_SIMULATED_DEVICE` test hook the result is always a fresh copy,
    tagged with the simulated device's label (see `device_label`).
    """
    out = tensor.to(device)
    if os.environ.get(SIMULATED_DEVICE_ENV):
        out = _tagged(out.clone() if out is tensor else out)
    return out


def _tagged(tensor: torch.Tensor) -> torch.Tensor:
    """Under the simulation test hook, mark `tensor` as living on the accelerator."""
    label = os.environ.get(SIMULATED_DEVICE_ENV)
    if label:
        tensor.ncft_device = label  # a plain attribute: tensors accept them
    return tensor


def device_label(tensor: torch.Tensor) -> str:
    """Where a collective's tensor lives: its device, or the simulated label."""
    return getattr(tensor, "ncft_device", None) or str(tensor.device)


def all_reduce_(
    tensor: torch.Tensor, device: torch.device, op: dist.ReduceOp = dist.ReduceOp.SUM
) -> torch.Tensor:
    """Reduce `tensor` in place over all ranks, communicating on `device`.

    Args:
        tensor: Any tensor (on the host or on `device`); it holds the result after.
        device: The device the engine computes on (`engine.device`).
        op: The reduction.

    Returns:
        `tensor`.
    """
    work = on_device(tensor, device)
    dist.all_reduce(work, op=op)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def broadcast_(tensor: torch.Tensor, device: torch.device, src: int = 0) -> torch.Tensor:
    """Broadcast `tensor` in place from rank `src`, communicating on `device`."""
    work = on_device(tensor, device)
    dist.broadcast(work, src=src)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def all_gather_flat(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Every rank's equally sized 1-D `tensor`, concatenated in rank order, on `device`."""
    work = on_device(tensor.contiguous(), device)
    out = _tagged(torch.empty(work.numel() * dist.get_world_size(), dtype=work.dtype,
                              device=device))
    dist.all_gather_into_tensor(out, work)
    return out


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is True on any rank (one tiny all-reduce)."""
    t = torch.tensor([int(flag)])
    return bool(all_reduce_(t, device, op=dist.ReduceOp.MAX).item())


def barrier() -> None:
    """Wait for every rank (no-op without a process group).

    Under NCCL the barrier runs on the device bound at `init_process_group(device_id=)`
    by `init_distributed`, so it never guesses a GPU.
    """
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s picklable `obj` on every rank.

    `broadcast_object_list` stages the pickle on the current CUDA device under NCCL,
    which `init_distributed` sets to this rank's GPU.
    """
    if not dist.is_initialized():
        return obj
    payload = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(payload, src=src)
    return payload[0]


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
        barrier()
        dist.destroy_process_group()
