"""Launch real multi-process jobs from tests (torchrun, gloo on loopback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from launcher.dist import free_port

REPO = Path(__file__).resolve().parents[2]


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for spawned ranks: repo on the path, loopback gloo, and DeepSpeed's
    CPU accelerator only where there is no GPU (on a GPU it must pick CUDA, or the
    gpu-marked tests would run DeepSpeed on the CPU accelerator beside NCCL)."""
    import torch

    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    env.update(
        PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}",
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra or {})
    return env


def torchrun(
    script: Path | str, nproc: int, args: list[str], timeout: int = 600, check: bool = True
) -> subprocess.CompletedProcess:
    """Run `script` on `nproc` ranks with torchrun; fail the test on a non-zero exit.

    Every rank's exit code counts: torchrun exits non-zero if any rank failed,
    aborted or was killed, and that fails the test (nothing is ignored).
    """
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1", f"--master-port={free_port()}", "--local-addr=127.0.0.1",
        str(script), *args,
    ]
    proc = subprocess.run(
        cmd, env=worker_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-8000:]}"
        )
    return proc


def backends_main(run_backend) -> None:
    """Entry point of a launched worker: `run_backend(backend, info, out_dir)` for each
    backend named by `--backends`, inside one process group."""
    import argparse

    import torch

    from launcher.dist import init_distributed, shutdown

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--backends", default="deepspeed,fsdp2,fsdp1")
    args = parser.parse_args()
    info = init_distributed()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for backend in args.backends.split(","):
        run_backend(backend, info, args.out)
    shutdown()
