"""Resume from damaged run files, in one process (forks for the kills).

Each case kills a tiny 2-task seqft run (single engine, one rank) at a fault point,
damages one run file the way the issue found it damaged, then resumes with
`output.resume=true` and records what the resume printed, whether it refused, and
where it ended. An uninterrupted reference run is the yardstick. Run by
tests/launcher/run/test_damaged_resume.py.
"""

import contextlib
import io
import json
import sys
from pathlib import Path

from launcher.dist import shutdown
from launcher.run.backend import KILL_AFTER_STAGE, KILL_AT_STEP
from tests.dist.resume_worker import _killed, _run, overrides


def _zero_4k(path: Path) -> None:
    """Zero 4 KB inside a file (its size stays the same)."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    data[start:start + 4096] = bytes(4096)
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


STEP = "checkpoints/in-progress/02-rte/step-00000001"
PROGRESS = "progress.json"
# case -> (extra overrides, kill point, file to damage, how)
CASES = {
    "model": ([], {KILL_AFTER_STAGE: "2"}, "checkpoints/02-rte/model.safetensors", _zero_4k),
    "state": ([], {KILL_AFTER_STAGE: "2"}, "checkpoints/02-rte/state.json",
              lambda p: p.write_text('{"stage": 1, "matrix": [[0.5, 0.5], [0.5, 0.')),
    "only": ([], {KILL_AFTER_STAGE: "1"}, "checkpoints/01-sst2/model.safetensors", _zero_4k),
    "rank": (["output.checkpoint_every=1"], {KILL_AT_STEP: "2:1"},
             f"{STEP}/rank-00000-of-00001.safetensors", _truncate),
    "progress": (["output.checkpoint_every=1"], {KILL_AT_STEP: "2:1"}, f"{STEP}/{PROGRESS}",
                 lambda p: p.write_text("{garbled")),
    "metrics": ([], {KILL_AFTER_STAGE: "1"}, "metrics.jsonl",
                lambda p: p.write_text(p.read_text() + '{"stage": 1, "task": "rte", "st')),
}


def main(out: Path) -> None:
    _run(overrides("seqft", out / "reference"))
    report = {}
    for case, (extra, kill, rel, damage) in CASES.items():
        run = out / case
        args = [*overrides("seqft", run), *extra]
        signal = _killed(args, kill)
        damage(run / rel)
        printed, refused = io.StringIO(), None
        with contextlib.redirect_stdout(printed):
            try:
                _run([*args, "output.resume=true"])
            except ValueError as err:  # a UserError: the CLI prints it as one line
                refused = str(err)
                shutdown()  # a process would end here; this one runs the next case
        report[case] = {"signal": signal, "printed": printed.getvalue(), "refused": refused,
                        "damaged": str(run / rel)}
    (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
