"""`ncft neurons ...`: select a spec task's neurons, inspect and compare sets.

- `neurons score SPEC [key=value ...] --task NAME --out FILE`: the spec's model, its
  task NAME and its `selection` section (any spec key can be overridden, e.g.
  `selection.fraction=0.1 selection.scorer=weight_cosine`) -> a NeuronSet file. It
  runs the same pipeline as `ncft run` (`launcher.run.selector`), with the task's
  index in `tasks` as its stage, so on the base model it selects exactly what the
  run's first stage on that task selects. Runs on the spec's `engine`: every rank
  under torchrun, or `engine.nproc_per_node` spawned local ranks; all ranks compute
  the same all-reduced scores, verify the set's checksum, and rank 0 writes it.
- `neurons inspect FILE`: per-layer counts per parameter, and the metadata.
- `neurons overlap A B ...`: the IoU matrix of several sets.

`launcher.cli` registers these with `add_neuron_commands(subparsers)`; each
subcommand stores its handler in `func` (returns an exit code).
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

from launcher.spec.stages import COSINE_SCORERS
from ncft.continual.methods import method

_LAYER = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class ScoreJob:
    """One `neurons score` job (picklable, for spawned ranks)."""

    spec: str
    overrides: tuple[str, ...]
    task: str
    out: str
    model_dir: str
    previous: str | None = None
    finetuned: str | None = None


def add_neuron_commands(subparsers) -> None:
    """Register `neurons score|inspect|overlap` on the top-level subparsers."""
    neurons = subparsers.add_parser("neurons", help="score, inspect and compare NeuronSets")
    sub = neurons.add_subparsers(dest="neurons_command", required=True)
    score = sub.add_parser("score", help="select a spec task's neurons; write a NeuronSet")
    score.add_argument("spec", help="experiment spec (YAML): model, engine, tasks, selection")
    score.add_argument("overrides", nargs="*", help="key.sub=value, e.g. selection.fraction=0.1")
    score.add_argument("--task", required=True, help="name of the spec task to score on")
    score.add_argument("--out", required=True, help="output file, ending in .safetensors")
    score.add_argument("--previous", help="NeuronSet file of the earlier task; required by, "
                       "and only by, selection.union_with_previous: true")
    score.add_argument("--finetuned", help="weight_cosine/reversed: compare against this "
                       "fine-tuned HF checkpoint instead of running NeFT's probe")
    score.set_defaults(func=_score)
    inspect = sub.add_parser("inspect", help="per-layer counts and metadata of a NeuronSet")
    inspect.add_argument("file")
    inspect.set_defaults(func=_inspect)
    overlap = sub.add_parser("overlap", help="IoU matrix of NeuronSets")
    overlap.add_argument("files", nargs="+")
    overlap.set_defaults(func=_overlap)


def _score(ns: argparse.Namespace) -> int:
    from launcher.run.models import resolve_model
    from launcher.run.spawn import run_local, under_launcher
    from launcher.spec import load_spec

    spec = load_spec(ns.spec, ns.overrides)  # a SpecError is a ValueError: one line from main
    problems = _score_problems(spec, ns)
    if spec.engine.nnodes > 1 and not under_launcher():
        problems.append(f"engine.nnodes={spec.engine.nnodes}: start multi-node jobs under a "
                        "launcher (torchrun, slurm/torchrun.slurm)")
    if problems:
        raise ValueError("neurons score: " + "; ".join(problems))
    job = ScoreJob(str(ns.spec), tuple(ns.overrides), ns.task, ns.out,
                   resolve_model(spec.model.name_or_path), ns.previous, ns.finetuned)
    run_local(run_score, spec.engine.nproc_per_node, job)  # converts the model once, above
    return 0


def _score_problems(spec, ns: argparse.Namespace) -> list[str]:
    """What makes this `neurons score` call wrong, checked before any rank starts."""
    names = [t.name for t in spec.tasks]
    problems = []
    if ns.task not in names:
        problems.append(f"--task {ns.task!r} is not a task of the spec; choose one of {names}")
    if not ns.out.endswith(".safetensors"):
        problems.append("--out must end in .safetensors")
    if spec.selection.union_with_previous != (ns.previous is not None):
        problems.append("give --previous FILE exactly when selection.union_with_previous "
                        "is true (the earlier task's set to unite with)")
    cosine = spec.selection.scorer in COSINE_SCORERS
    if ns.finetuned is not None and (not cosine or method(spec.method).random):
        problems.append("--finetuned needs selection.scorer weight_cosine or reversed "
                        "(and a method other than random_neurons)")
    return problems


def run_score(job: ScoreJob) -> None:
    """One rank's `neurons score` job (every rank, or via `launcher.run.spawn.run_local`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher.dist import init_distributed, print0, shutdown
    from launcher.engines import build_engine
    from launcher.run.backend import optim_config
    from launcher.run.selector import spec_selector
    from launcher.run.task_data import load_task
    from launcher.spec import load_spec
    from ncft.neuron_set import NeuronSet

    spec = load_spec(job.spec, job.overrides)
    info = init_distributed()
    stage = [t.name for t in spec.tasks].index(job.task)
    task = load_task(spec.tasks[stage], spec.data_root)
    tokenizer = AutoTokenizer.from_pretrained(job.model_dir)
    if tokenizer.pad_token_id is None:  # as the run's backend does
        tokenizer.pad_token = tokenizer.eos_token
    # fp32, as a run loads it: the engine owns precision (model.dtype = compute dtype).
    model = AutoModelForCausalLM.from_pretrained(job.model_dir, dtype=torch.float32)
    e = spec.engine
    engine = build_engine(e.backend, model, optim_config(spec), info, e.ds_config)
    previous = NeuronSet.load(job.previous) if job.previous else None
    meta = {"model_id": spec.model.name_or_path, "world_size": info.world_size,
            "backend": e.backend,
            "command": {"spec": job.spec, "overrides": list(job.overrides), "task": job.task}}
    selector = spec_selector(spec, tokenizer, previous=lambda _stage: previous,
                             reference=job.finetuned, extra_meta=meta)
    nset = selector.select(engine, model, task, stage)
    if info.is_main_process:
        Path(job.out).parent.mkdir(parents=True, exist_ok=True)
        nset.save(job.out)
    print0(f"wrote {job.out}: {nset.num_selected()} selected, checksum {nset.checksum()[:12]}")
    engine.close()
    shutdown()


def _split(fqn: str) -> tuple[str, str]:
    """`model.layers.3.mlp.up_proj.weight` -> ("3", "mlp.up_proj.weight"); no layer: "-"."""
    match = _LAYER.search(fqn)
    return (match.group(1), fqn[match.end() :]) if match else ("-", fqn)


def layer_table(nset) -> list[list[str]]:
    """Rows `[layer, count per parameter ...]` (header first, totals last)."""
    counts: dict[str, dict[str, int]] = {}
    axis: dict[str, int] = {}
    for fqn, sel in nset.entries.items():
        layer, column = _split(fqn)
        counts.setdefault(layer, {})[column] = len(sel)
        axis[column] = sel.axis
    columns = sorted(axis)
    header = ["layer"] + [f"{c}[{'row' if axis[c] == 0 else 'col'}]" for c in columns]
    order = sorted(counts, key=lambda x: (not x.isdigit(), int(x) if x.isdigit() else 0))
    rows = [[layer] + [str(counts[layer].get(c, 0)) for c in columns] for layer in order]
    totals = ["total"] + [str(sum(counts[k].get(c, 0) for k in counts)) for c in columns]
    return [header, *rows, totals]


def format_table(rows: list[list[str]]) -> str:
    """Left-aligned columns separated by two spaces."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _inspect(ns: argparse.Namespace) -> int:
    from ncft.neuron_set import NeuronSet

    nset = NeuronSet.load(ns.file)
    print(f"{ns.file}: {len(nset.entries)} parameters, {nset.num_selected()} selected, "
          f"checksum {nset.checksum()}")
    print(format_table(layer_table(nset)) if nset.entries else "(empty)")
    print("metadata:")
    print(json.dumps(nset.meta, indent=2, sort_keys=True))
    return 0


def _overlap(ns: argparse.Namespace) -> int:
    from ncft.neuron_set import NeuronSet

    sets = [NeuronSet.load(f) for f in ns.files]
    names = [Path(f).stem for f in ns.files]
    rows = [[""] + names]
    rows += [[n] + [f"{a.iou(b):.3f}" for b in sets] for n, a in zip(names, sets)]
    print(format_table(rows))
    return 0
