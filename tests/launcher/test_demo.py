"""`make demo` at tiny scale: its commands are valid specs, and its spec shape runs.

The real demo (SmolLM2-135M, ~17 min on 2 cores) is not run in CI. Here every
`ncft run` line of the Makefile's `demo` target is validated with its overrides, and
the demo spec runs end to end on 2 FSDP2 ranks with the tiny random Llama and small
sizes: the deactivation study, NCFT, results, report and plots. It runs from a copy
of the repository's files in a temporary folder, as a user's fresh clone would: no
`../shared` beside it and no `NCFT_DATA_ROOT`, so the task data must ship inside.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.run.reevaluate import check_inference_only
from launcher.spec import load_spec
from tests.support.spawn import REPO, worker_env

SPEC = REPO / "examples" / "demo_smollm2.yaml"


def _demo_target() -> str:
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    return text.split("\ndemo:", 1)[1].split("\n\n", 1)[0]


def _args(line: str, after: str) -> list[str]:
    args = shlex.split(line.split(after, 1)[1])
    return [a.replace("$(CURDIR)", str(REPO)) for a in args]


def _demo_runs() -> list[list[str]]:
    """The override lists of each `ncft run $(DEMO_SPEC) ...` in the demo target."""
    return [_args(line, "$(DEMO_SPEC)") for line in _demo_target().splitlines()
            if "ncft run $(DEMO_SPEC)" in line]


def _demo_evals() -> list[list[str]]:
    """RUN_DIR and overrides of each `ncft eval ...` in the demo target."""
    return [_args(line, "ncft eval") for line in _demo_target().splitlines()
            if "ncft eval" in line]


def test_makefile_demo_commands_are_valid_specs():
    runs, evals = _demo_runs(), _demo_evals()
    assert len(runs) == 2 and len(evals) == 1, (runs, evals)
    assert [load_spec(SPEC, args).method for args in runs] == ["ncft", "seqft"]
    # W-NCFT: evaluated from the NCFT run, with inference settings only.
    trained, *overrides = evals[0]
    ncft = load_spec(SPEC, runs[0])
    assert Path(trained) == Path(ncft.output.dir)
    wncft = load_spec(SPEC, [*runs[0], *overrides])
    check_inference_only(ncft, wncft)
    assert wncft.method == "wncft"
    dirs = {str(load_spec(SPEC, args).output.dir) for args in runs} | {str(wncft.output.dir)}
    assert len(dirs) == 3, "each demo run needs its own output.dir"
    compare = re.search(r"ncft compare (.+)", (REPO / "Makefile").read_text()).group(1)
    assert [Path(d).name for d in sorted(dirs)] == sorted(Path(c).name for c in compare.split())


def _fresh_clone(dest: Path) -> Path:
    """The repository's files (tracked, and untracked ones git does not ignore) in `dest`."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, text=True, check=True)
    for rel in listed.stdout.splitlines():
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    assert not (dest.parent / "shared").exists()
    return dest


@pytest.mark.dist
def test_demo_spec_shape_runs_on_the_tiny_model(tmp_path):
    clone = _fresh_clone(tmp_path / "clone")
    run = tmp_path / "demo"
    sizes = [f"tasks.{i}.{k}={v}" for i in range(2)
             for k, v in (("train_size", 16), ("eval_size", 8), ("max_length", 176))]
    args = ["run", "examples/demo_smollm2.yaml", "model.name_or_path=tiny-random-llama", *sizes,
            "training.steps=2", "study.finetune_steps=2", "study.eval_examples=8",
            "selection.num_examples=8", "eval.batch_size=8", f"output.dir={run}"]
    env = worker_env({"NCFT_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(clone)})
    env.pop("NCFT_DATA_ROOT", None)
    where = subprocess.run([sys.executable, "-c", "import launcher; print(launcher.__file__)"],
                           env=env, cwd=clone, capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(clone), where.stdout
    proc = subprocess.run([sys.executable, "-m", "launcher", *args], env=env, cwd=clone,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = json.loads((run / "results.json").read_text())
    grid = results["deactivation"]
    assert grid["tasks"] == ["sst2", "agnews"]
    assert len(grid["task_neurons_off"]) == 2 and len(grid["random_off"]) == 2
    assert results["method"] == "ncft" and len(results["matrix"]) == 2
    for task in ("sst2", "agnews"):
        assert (run / "neurons" / f"study-{task}.safetensors").is_file()
    report = (run / "report.md").read_text()
    for png in ("deactivation", "accuracy_matrix", "iou"):
        assert (run / "plots" / f"{png}.png").is_file(), png
        assert f"plots/{png}.png" in report
    # The demo's W-NCFT step: evaluated from this run on 2 FSDP2 ranks, trained nothing.
    wncft = tmp_path / "demo_wncft"
    (trained, *overrides), = _demo_evals()
    overrides = [a for a in overrides if not a.startswith(("output.dir=", "wncft.num"))]
    proc = subprocess.run([sys.executable, "-m", "launcher", "eval", str(run), *overrides,
                           "wncft.num_samples=4", f"output.dir={wncft}"], env=env, cwd=clone,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    mixed = json.loads((wncft / "results.json").read_text())
    assert mixed["method"] == "wncft" and mixed["evaluated_from"] == str(run)
    assert len(mixed["details"]["agnews"][1]["mixing_weights"]) == 2
