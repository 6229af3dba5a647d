"""`ncft run` with `training.update: masked` and `sparse_delta`, one process, in turn.

Run by tests/launcher/run/test_sparse_delta_service.py. For NCFT, W-NCFT (two tasks
each) and single-task NeFT rows it runs the tiny spec twice, once per update mode,
with weight decay, biting clipping and accumulation; then an NCFT sparse-delta run
that is SIGKILLed after optimizer step 2 of stage 1 (a mid-task checkpoint exists at
step 2) and resumed with `output.resume=true`; then the same pair with
`model.dtype=bfloat16` (frozen weights stored in bf16, `launcher.engines.frozen`).
`NAME` selects one of `RUNS`; the run directories land in `out/<update>/<name>`,
`out/killed/ncft`, `out/bf16/ncft` and `out/bf16_killed/ncft`.
"""

import os
import sys
from pathlib import Path

from launcher.run.backend import KILL_AT_STEP
from tests.dist.methods_worker import RUNS as METHOD_RUNS
from tests.dist.methods_worker import overrides
from tests.dist.resume_worker import _killed, _run

RUNS = {"ncft": ["method=ncft"], "wncft": ["method=wncft", "wncft.num_samples=4"],
        "neft_rows": METHOD_RUNS["neft_rows"]}
TRAINING = ["training.steps=3", "training.weight_decay=0.1", "training.grad_clip=0.05",
            "training.grad_accum=2", "training.micro_batch_size=2", "training.lr=1e-3"]


def args(name: str, out: Path, update: str) -> list[str]:
    base = overrides("neft_rows" if name == "neft_rows" else "seqft", out)
    base = [a for a in base if not a.startswith(("method=", "output.dir=", "training.steps"))]
    return [*base, *RUNS[name], *TRAINING, f"training.update={update}",
            f"output.dir={out / update / name}"]


def main(out: Path, names: list[str]) -> None:
    for name in names:
        for update in ("masked", "sparse_delta"):
            _run(args(name, out, update))
    _killed_and_resumed(out, "killed", [])
    bf16 = ["model.dtype=bfloat16"]
    _run([*[a for a in args("ncft", out, "sparse_delta") if not a.startswith("output.dir=")],
          *bf16, f"output.dir={out / 'bf16' / 'ncft'}"])
    _killed_and_resumed(out, "bf16_killed", bf16)


def _killed_and_resumed(out: Path, folder: str, extra: list[str]) -> None:
    killed = [a for a in args("ncft", out, "sparse_delta") if not a.startswith("output.dir=")]
    killed += [*extra, f"output.dir={out / folder / 'ncft'}", "output.checkpoint_every=1"]
    sig = _killed(killed, {KILL_AT_STEP: "1:2"})
    assert sig == 9, f"the fault hook did not kill the run ({sig})"
    assert (out / folder / "ncft" / "checkpoints" / "in-progress").is_dir()
    os.environ.pop(KILL_AT_STEP, None)
    _run([*killed, "output.resume=true"])


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2].split(","))
