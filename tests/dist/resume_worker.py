"""Resume of every continual method after a SIGKILL, in one process (forks for kills).

For each method: an uninterrupted reference run, then a run SIGKILLed right after
stage 1's checkpoint and one SIGKILLed during stage 2's evaluation (after its first
task is evaluated), each resumed with `output.resume=true`. The killed runs execute
in a forked child (the tiny model and imports are already loaded, so a fork costs
nothing) that SIGKILLs itself through the backend's fault hooks; the parent checks
the child died of SIGKILL and resumes in place. Run by tests/launcher/run/test_resume.py.
"""

import json
import os
import signal
import sys
from pathlib import Path

from launcher.dist import free_port
from launcher.run.backend import KILL_AFTER_STAGE, KILL_DURING_EVAL
from launcher.run.experiment import main_run
from tests.dist.methods_worker import SPEC, sizes

METHODS = ("ncft", "wncft", "seqft", "seqlora", "olora", "per_task")
EXTRA = {"wncft": ["wncft.num_samples=4"], "olora": ["olora.lambda_l2=0.1"]}
KILLS = {"boundary": {KILL_AFTER_STAGE: "1"}, "eval": {KILL_DURING_EVAL: "2"}}


def overrides(name: str, out: Path) -> list[str]:
    return ["tasks=[{source: {type: cl_benchmark, name: sst2}},"
            "{source: {type: cl_benchmark, name: rte}}]", *sizes(2),
            "engine.backend=single", "engine.nproc_per_node=1", "training.steps=2",
            "selection.num_examples=4", "eval.batch_size=4", f"method={name}",
            f"output.dir={out}", *EXTRA.get(name, [])]


def _run(args: list[str]) -> None:
    os.environ["MASTER_PORT"] = str(free_port())  # a fresh rendezvous per run
    main_run(SPEC, args)


def _killed(args: list[str], env: dict[str, str]) -> int:
    """Run in a forked child that the fault hook kills; return the child's signal."""
    pid = os.fork()
    if pid == 0:  # child: never returns to the test's code
        try:
            os.environ.update(env)
            _run(args)
        finally:
            os._exit(3)  # reached only if the hook did not fire
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)


def main(out: Path, methods: list[str]) -> None:
    report = {}
    for name in methods:
        _run(overrides(name, out / "reference" / name))
        for point, env in KILLS.items():
            run = out / point / name
            sig = _killed(overrides(name, run), env)
            committed = sorted(p.name for p in (run / "checkpoints").iterdir()
                               if (p / "state.json").is_file())
            _run([*overrides(name, run), "output.resume=true"])
            report[f"{point}/{name}"] = {"signal": sig, "committed": committed}
    (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    assert signal.SIGKILL == 9
    main(Path(sys.argv[1]), sys.argv[2].split(","))
