"""Launch real multi-process jobs from tests (torchrun, gloo on loopback), and the
pieces the launched workers share (command line, process group, rank 0's files)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from launcher.dist import DistInfo, free_port, init_distributed, shutdown
from ncft.neuron_set import NeuronSet

REPO = Path(__file__).resolve().parents[2]


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for spawned ranks: repo on the path, loopback gloo, and DeepSpeed's
    CPU accelerator only where there is no GPU (on a GPU it must pick CUDA, or the
    gpu-marked tests would run DeepSpeed on the CPU accelerator beside NCCL)."""
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
    script: Path | str, nproc: int, args: list[str], timeout: int = 600, check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run `script` on `nproc` ranks with torchrun; fail the test on a non-zero exit.

    Every rank's exit code counts: torchrun exits non-zero if any rank failed,
    aborted or was killed, and that fails the test (nothing is ignored). `env` adds
    to (or overrides) `worker_env`'s variables.
    """
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1", f"--master-port={free_port()}", "--local-addr=127.0.0.1",
        str(script), *args,
    ]
    proc = subprocess.run(
        cmd, env=worker_env(env), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-8000:]}"
        )
    return proc


def run_worker(script: str, out: Path, arg: str, env: dict[str, str]) -> None:
    """Run `tests/dist/<script> OUT ARG` as one plain process (it starts its own runs)
    and fail the test, with the tail of its output, on a non-zero exit. `env` adds to
    `worker_env`'s variables."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "dist" / script), str(out), arg],
        env=worker_env(env), cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def torchrun_backends(
    tmp_path_factory, name: str, script: Path, backends: tuple[str, ...]
) -> Path:
    """A fresh temporary folder `name*` filled by `script` on 2 ranks with `--out` it and
    `--backends` the comma-joined `backends` (the body of a module-scoped fixture)."""
    out = tmp_path_factory.mktemp(name)
    torchrun(script, 2, ["--out", str(out), "--backends", ",".join(backends)])
    return out


def worker_parser(backends: str = "deepspeed,fsdp2,fsdp1") -> argparse.ArgumentParser:
    """A launched worker's command line: `--out` (required) and `--backends` (comma
    separated, default `backends`); the worker adds its own options."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--backends", default=backends)
    return parser


def worker_start(
    parser: argparse.ArgumentParser, one_thread: bool = True
) -> tuple[argparse.Namespace, DistInfo]:
    """Parse a worker's arguments and join the process group; with `one_thread`, torch
    uses one intra-op thread (ranks share the machine's few cores)."""
    args = parser.parse_args()
    info = init_distributed()
    if one_thread:
        torch.set_num_threads(1)
    return args, info


def save_outputs(
    out_dir: Path, tag: str, weights: dict[str, dict[str, torch.Tensor]],
    sets: dict[str, NeuronSet], report: object,
) -> None:
    """Rank 0's files of one backend: `{tag}_{phase}.safetensors` for each phase of
    `weights`, `{name}.safetensors` for each neuron set, and `{tag}.json`."""
    for phase, tensors in weights.items():
        save_file(tensors, out_dir / f"{tag}_{phase}.safetensors")
    for name, neuron_set in sets.items():
        neuron_set.save(out_dir / f"{name}.safetensors")
    (out_dir / f"{tag}.json").write_text(json.dumps(report))


def backends_main(run_backend) -> None:
    """Entry point of a launched worker: `run_backend(backend, info, out_dir)` for each
    backend named by `--backends`, inside one process group."""
    args, info = worker_start(worker_parser())
    torch.manual_seed(0)
    for backend in args.backends.split(","):
        run_backend(backend, info, args.out)
    shutdown()


CPU_RANK = DistInfo(rank=0, world_size=1, local_rank=0, backend="gloo",
                    device=torch.device("cpu"))


def run_single_here(run_backend, out: Path) -> None:
    """A launched worker's `run_backend("single", ...)` in this process, one thread.

    The 1-rank reference needs no process group, and a launch costs ~25 s of imports
    on 2 busy cores; torch's thread count is restored afterwards.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_backend("single", CPU_RANK, out)
    finally:
        torch.set_num_threads(threads)


def wait_for_file(path: Path, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    """Wait until `path` exists (a run held at a fault point), failing if `proc` ends."""
    deadline = time.monotonic() + timeout_s
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert path.exists(), f"{path} never appeared (the run exited {proc.poll()})"
