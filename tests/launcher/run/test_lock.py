"""The run directory's lock: one live run per directory, stale locks taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.errors import UserError
from launcher.run import lock, preempt, rundir
from tests.support.spawn import REPO, wait_for_file, worker_env


def _write_lock(root: Path, age_s: float = 0.0, **holder) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / lock.LOCK
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                "slurm_job": None, "slurm_restart": 0, **holder}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_holder_is_named_and_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4711")
    with lock.RunLock(tmp_path / "run"):
        monkeypatch.delenv("SLURM_JOB_ID")
        with pytest.raises(UserError, match=rf"in use by a live run \(host {socket.gethostname()}"
                           rf", pid {os.getpid()}, SLURM job 4711; heartbeat"):
            lock.RunLock(tmp_path / "run").acquire()
        assert (tmp_path / "run" / lock.LOCK).is_file()
    assert not (tmp_path / "run").exists(), "an empty directory the lock made is removed"


@pytest.mark.parametrize(("holder", "age_s", "env", "why"), [
    ({"pid": "dead"}, 0, {}, "on this host is gone"),
    ({"host": "elsewhere"}, lock.STALE_AFTER_S + 5, {}, "heartbeat is"),
    ({"host": "elsewhere", "slurm_job": "9", "slurm_restart": 0}, 0,
     {"SLURM_JOB_ID": "9", "SLURM_RESTART_COUNT": "1"}, "earlier start of this SLURM job 9"),
])
def test_a_stale_lock_is_taken_over(tmp_path, monkeypatch, capsys, holder, age_s, env, why):
    if holder.get("pid") == "dead":
        holder["pid"] = _dead_pid()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    _write_lock(tmp_path, age_s, **holder)
    with lock.RunLock(tmp_path) as taken:
        assert taken.owned()
    assert "taking over the lock" in capsys.readouterr().out and why
    assert not (tmp_path / lock.LOCK).exists()


def test_a_fresh_lock_on_another_host_is_live(tmp_path):
    _write_lock(tmp_path, 10, host="elsewhere", pid=1)
    with pytest.raises(UserError, match="host elsewhere, pid 1"):
        lock.RunLock(tmp_path).acquire()


def test_overwrite_keeps_the_lock_it_runs_under(tmp_path):
    run = tmp_path / "run"
    with lock.RunLock(run):
        (run / "old.txt").write_text("x")
        rundir.prepare(run, "output: {}\n", resume=False, overwrite=True)
        assert (run / lock.LOCK).is_file() and not (run / "old.txt").exists()


SPEC = REPO / "examples" / "tiny_ncft.yaml"
TINY = [
    "engine.backend=single", "engine.nproc_per_node=1", "training.steps=2",
    "selection.num_examples=4", "eval.batch_size=4",
    *[f"tasks.{i}.{k}={v}" for i in range(3)
      for k, v in (("train_size", 8), ("eval_size", 4))],
]


@pytest.mark.dist
def test_overwrite_and_resume_refuse_a_live_run_and_leave_it_whole(tmp_path):
    run, pause = tmp_path / "run", tmp_path / "paused"
    env = worker_env({"NCFT_CACHE": str(tmp_path / "cache"), "SLURM_JOB_ID": "4711",
                      preempt.PAUSE_AT_STEP: "2:1", preempt.PAUSE_FILE: str(pause)})
    cmd = [sys.executable, "-m", "launcher", "run", str(SPEC), f"output.dir={run}", *TINY]
    live = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_file(pause, live)  # held after step 1 of task 2
        before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
        others = worker_env({"NCFT_CACHE": str(tmp_path / "cache")})
        for policy in ("output.overwrite=true", "output.resume=true"):
            proc = subprocess.run([*cmd, policy], env=others, cwd=REPO, text=True,
                                  capture_output=True, timeout=300)
            assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
            assert (f"is in use by a live run (host {socket.gethostname()}, pid {live.pid}, "
                    "SLURM job 4711") in proc.stderr, proc.stderr
        assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
        assert (run / "checkpoints" / "01-sst2" / "manifest.json").is_file()
        live.send_signal(signal.SIGTERM)
        out, _ = live.communicate(timeout=300)
    finally:
        live.kill()
    assert live.returncode == preempt.EXIT_PREEMPTED, out[-3000:]
    assert not (run / lock.LOCK).exists(), "the lock ends with its run"
