"""A real SLURM cluster on loopback for the template tests (Debian's slurm-wlm + munge).

One host, two "nodes": two `slurmd -N` daemons (Debian builds slurmd with multiple
slurmd support) on their own ports, plus `slurmctld` and `munged`, every path
(config, sockets, state, spools, logs, pid files) under one temporary directory and
every port free on loopback. The daemons run as root (SlurmUser=root) because
munged, slurmd and job launch need it; without root the tests are skipped.
`stop()` ends exactly the daemons this module started, by the pids they wrote.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from launcher.dist import free_port

PACKAGES = ("slurm-wlm", "munge")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "srun")
NODES = ("n1", "n2")
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
         "BOOT_FAIL", "DEADLINE")
# Per node, more than this host's cores (config_overrides lets slurmd believe it): all
# four test jobs (two of 2 CPUs on one node, two of 1 CPU on each node) fit at once, so
# a 2-node job held for the preemption test never blocks another test's job.
CPUS = 4
MARKER = "NCFT_TEST_SLURM"  # in the environment of every process of this cluster

CONF = """\
ClusterName=ncfttest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.sock
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
# No cgroups (containers rarely have them): process groups track job steps.
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
ReturnToService=2
SlurmdParameters=config_overrides
MpiDefault=none
KillWait=30
{nodes}
PartitionName=debug Nodes={node_list} Default=YES MaxTime=60 State=UP
"""
NODE = "NodeName={name} NodeAddr=127.0.0.1 NodeHostname={host} Port={port} CPUs={cpus}"


def unavailable() -> str | None:
    """Why a real SLURM cannot run here (None: it can, installing packages if needed)."""
    if os.geteuid() != 0:
        return "needs root (munged, slurmctld and slurmd run as root on loopback)"
    if all(shutil.which(b) for b in BINARIES):
        return None
    if not shutil.which("apt-get"):
        return f"slurm-wlm/munge are not installed and there is no apt-get to install {PACKAGES}"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {proc.stderr.strip()[-500:]}"
    missing = [b for b in BINARIES if not shutil.which(b)]
    return f"installed {PACKAGES} but {missing} are missing" if missing else None


@dataclass
class Cluster:
    """The running daemons and how to talk to them."""

    root: Path
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """This process's environment for SLURM clients, without an outer job's SLURM_*."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.root / "slurm.conf")
        env[MARKER] = str(self.root)
        return env

    def cmd(self, *args: str, check: bool = True) -> str:
        """Run a SLURM client command; its stdout."""
        proc = subprocess.run(list(args), env=self.env, capture_output=True, text=True,
                              timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: {proc.stderr}\n{self.logs()}")
        return proc.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.cmd("scontrol", "show", "job", "-o", job_id)
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait(self, job_id: str, timeout_s: float = 900) -> dict[str, str]:
        """Wait until the job has ended; its last record."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info["JobState"] in ENDED:
                return info
            time.sleep(2)
        raise TimeoutError(f"job {job_id} still {self.job(job_id)['JobState']}")

    def logs(self) -> str:
        """The tail of every daemon log (for failure messages)."""
        parts = []
        for path in sorted((self.root / "log").glob("*.log")):
            parts.append(f"--- {path.name}\n" + "\n".join(path.read_text().splitlines()[-15:]))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel the jobs, SIGTERM the daemons this cluster started (by pid), SIGKILL
        what outlives 20 s, then any process left that carries this cluster's marker
        (job steps' slurmstepd and job processes outlive their slurmd)."""
        if "slurmctld" in self.pids:
            jobs = self.cmd("squeue", "-h", "-o", "%i", check=False).split()
            if jobs:
                self.cmd("scancel", *jobs, check=False)
            deadline = time.monotonic() + 60
            while jobs and time.monotonic() < deadline:
                time.sleep(1)
                jobs = self.cmd("squeue", "-h", "-o", "%i", check=False).split()
        for pid in reversed(list(self.pids.values())):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 20
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.pids.clear()
        for pid in _marked(f"{MARKER}={self.root}"):
            os.kill(pid, signal.SIGKILL)


def _marked(marker: str) -> list[int]:
    """Live processes whose environment holds `marker` (never this one)."""
    found, needle = [], marker.encode() + b"\0"
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ and int(proc.name) != os.getpid() and _alive(int(proc.name)):
            found.append(int(proc.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A daemon we started is not our child (it forked away), so no zombie to reap;
    # a zombie still counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _pid(path: Path, timeout_s: float = 30) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().strip():
            return int(path.read_text().split()[0])
        time.sleep(0.1)
    raise TimeoutError(f"no pid file {path}")


def start(root: Path) -> Cluster:
    """Write the config, start munged, slurmctld and one slurmd per node; wait for idle."""
    for sub in ("state", "log", *(f"spool/{n}" for n in NODES)):
        (root / sub).mkdir(parents=True, exist_ok=True)
    host = os.uname().nodename
    nodes = "\n".join(NODE.format(name=n, host=host, port=free_port(), cpus=CPUS)
                      for n in NODES)
    conf = root / "slurm.conf"
    conf.write_text(CONF.format(root=root, ctld_port=free_port(), slurmd_port=free_port(),
                                nodes=nodes, node_list=",".join(NODES)))
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    cluster = Cluster(root)
    env = {**cluster.env}  # the daemons (and so their slurmstepd) carry the marker
    try:
        munged = ["munged", "--force", f"--socket={root}/munge.sock", f"--key-file={key}",
                  f"--pid-file={root}/munged.pid", f"--log-file={root}/log/munged.log",
                  f"--seed-file={root}/munged.seed"]
        subprocess.run(munged, env=env, check=True, timeout=60)
        cluster.pids["munged"] = _pid(root / "munged.pid")
        subprocess.run(["slurmctld", "-f", str(conf), "-i"], env=env, check=True, timeout=60)
        cluster.pids["slurmctld"] = _pid(root / "slurmctld.pid")
        for node in NODES:
            subprocess.run(["slurmd", "-f", str(conf), "-N", node], env=env, check=True,
                           timeout=60)
            cluster.pids[f"slurmd-{node}"] = _pid(root / f"slurmd-{node}.pid")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            states = cluster.cmd("sinfo", "-h", "-N", "-o", "%t", check=False).split()
            if len(states) == len(NODES) and all(s == "idle" for s in states):
                return cluster
            time.sleep(1)
        raise TimeoutError(f"nodes not idle: {states}\n{cluster.logs()}")
    except BaseException:
        cluster.stop()
        raise
