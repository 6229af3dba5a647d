"""`ncft neurons ...`: score a model's neurons on task data, inspect and compare sets.

- `neurons score`: model directory + task data (a cl_benchmark task name, or a JSONL
  file) -> a NeuronSet file. Runs on every rank under torchrun (or spawns `--nproc`
  local ranks); all ranks compute the same all-reduced scores, verify the set's
  checksum, and rank 0 writes it.
- `neurons inspect FILE`: per-layer counts per parameter, and the metadata.
- `neurons overlap A B ...`: the IoU matrix of several sets.

`launcher.cli` registers these with `add_neuron_commands(subparsers)`; each
subcommand stores its handler in `func` (returns an exit code).
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

SCORERS = ("grad_attribution", "weight_cosine", "random", "reversed")
_LAYER = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class ScoreArgs:
    """One `neurons score` job (picklable, for spawned ranks)."""

    model: str
    out: str
    task: str | None = None
    data: str | None = None
    data_root: str | None = None
    labels: str | None = None
    prompt: str | None = None
    text_field: str = "text"
    label_field: str = "label"
    scorer: str = "grad_attribution"
    fraction: float | None = 0.05
    count: int | None = None
    global_topk: bool = False
    unit: str = "neuron"
    modules: str = "gate,up,down"
    positions: str = "answer"
    num_examples: int = 128
    batch_size: int = 8
    max_length: int = 256
    cosine_steps: int = 20
    lr: float = 1e-4
    finetuned: str | None = None
    union_with: str | None = None
    seed: int = 0
    backend: str = "single"
    ds_config: str = "zero3"


_HELP = {
    "task": "cl_benchmark task name (reads <data-root>/cl_benchmark/<task>/train.jsonl)",
    "data": "JSONL file of examples instead of --task (with --labels, or generation)",
    "data_root": "folder holding cl_benchmark/ (default: NCFT_DATA_ROOT or the repository's data/)",
    "labels": "comma-separated label set for --data (classification); omit for generation",
    "prompt": "str.format template over {text} (and {labels}); default: O-LoRA style",
    "scorer": "grad_attribution | weight_cosine | random | reversed (= lowest 1 - cos)",
    "fraction": "fraction selected per layer (or of all with --global-topk)",
    "count": "number selected instead of --fraction",
    "global_topk": "one ranking over all layers instead of top-k per layer",
    "unit": "neuron (FFN unit) or row (NeFT weight row)",
    "modules": "comma-separated roles: gate,up,down (fc_in,fc_out; attention for rows)",
    "positions": "answer | all: token positions whose attribution is summed",
    "finetuned": "weight_cosine against this HF checkpoint instead of fine-tuning",
    "union_with": "also include the neurons of this earlier NeuronSet file",
    "cosine_steps": "full fine-tuning steps before weight_cosine compares rows",
}


def add_neuron_commands(subparsers) -> None:
    """Register `neurons score|inspect|overlap` on the top-level subparsers."""
    neurons = subparsers.add_parser("neurons", help="score, inspect and compare NeuronSets")
    sub = neurons.add_subparsers(dest="neurons_command", required=True)
    score = sub.add_parser("score", help="score neurons on task data and write a NeuronSet")
    score.add_argument("--model", required=True, help="HF model directory or built-in name")
    score.add_argument("--out", required=True, help="output file, ending in .safetensors")
    score.add_argument("--nproc", type=int, default=1, help="local ranks to spawn")
    for f in fields(ScoreArgs):
        if f.name in ("model", "out"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            score.add_argument(flag, action="store_true", help=_HELP.get(f.name))
            continue
        kind = {"float | None": float, "int | None": int, "int": int, "float": float}
        score.add_argument(flag, type=kind.get(f.type, str), default=f.default,
                           help=_HELP.get(f.name, f"default: {f.default}"))  # fmt: skip
    score.set_defaults(func=_score)
    inspect = sub.add_parser("inspect", help="per-layer counts and metadata of a NeuronSet")
    inspect.add_argument("file")
    inspect.set_defaults(func=_inspect)
    overlap = sub.add_parser("overlap", help="IoU matrix of NeuronSets")
    overlap.add_argument("files", nargs="+")
    overlap.set_defaults(func=_overlap)


def _score(ns: argparse.Namespace) -> int:
    from launcher.run.models import resolve_model
    from launcher.run.spawn import run_local

    values = {f.name: getattr(ns, f.name) for f in fields(ScoreArgs)}
    if values["count"] is not None:
        values["fraction"] = None
    if (ns.task is None) == (ns.data is None):
        raise SystemExit("neurons score: give exactly one of --task or --data")
    if ns.scorer not in SCORERS:
        raise SystemExit(f"neurons score: --scorer must be one of {SCORERS}")
    if not ns.out.endswith(".safetensors"):
        raise SystemExit("neurons score: --out must end in .safetensors")
    if ns.backend == "single" and ns.nproc != 1:
        raise SystemExit("neurons score: --backend single runs one process; use --nproc 1")
    values["model"] = resolve_model(ns.model)  # convert once, before ranks start
    run_local(run_score, ns.nproc, ScoreArgs(**values))
    return 0


def load_examples(args: ScoreArgs):
    """The task's training examples (`ncft.data.examples.Example`), at most num_examples."""
    from launcher.spec import default_data_root
    from launcher.spec.tasks import ClBenchmarkSource, default_prompt
    from ncft.data.examples import classification_examples, generation_examples, read_jsonl

    if args.task is not None:
        root = Path(args.data_root) if args.data_root else default_data_root()
        if root is None:
            raise ValueError("--task needs --data-root (or NCFT_DATA_ROOT)")
        folder = root / "cl_benchmark" / args.task
        labels = json.loads((folder / "labels.json").read_text())
        source = ClBenchmarkSource(type="cl_benchmark", name=args.task)
        prompt = args.prompt or default_prompt(source, "classification")
        rows = read_jsonl(folder / "train.jsonl", limit=args.num_examples)
        return classification_examples(rows, labels, prompt)
    rows = read_jsonl(args.data, limit=args.num_examples)
    if args.labels:
        labels = args.labels.split(",")
        prompt = args.prompt or "Choose one from the option.\nOption: {labels} \n{text}\nAnswer:"
        return classification_examples(rows, labels, prompt, args.text_field, args.label_field)
    prompt = args.prompt or "{text}\nAnswer:"
    return generation_examples(rows, prompt, args.text_field, args.label_field)


def _groups(model, args: ScoreArgs):
    from ncft.arch import get_adapter
    from ncft.selection import row_groups, unit_groups

    modules = args.modules.split(",")
    if args.unit == "row":
        return row_groups(model, modules)
    if "attention" in modules:
        raise ValueError("--modules attention has no FFN units; use --unit row")
    return unit_groups(get_adapter(model).mlp_blocks(model), modules)


def _train_steps(encoded, args: ScoreArgs, info, pad_id: int):
    """Endless full fine-tuning micro-batches for NeFT's probe (cycling the data)."""
    from ncft.data.examples import batches, collate

    while True:
        for share in batches(encoded, args.batch_size, info.rank, info.world_size, "repeat"):
            yield [collate(share, pad_id)]


def _scores(engine, model, groups, encoded, args: ScoreArgs, info, pad_id: int):
    from ncft.arch import get_adapter
    from ncft.scoring import GradAttribution, RandomScorer, WeightCosine
    from ncft.scoring.cosine import CheckpointReference, finetune_and_score

    if args.scorer == "grad_attribution":
        scorer = GradAttribution(
            encoded=encoded, blocks=get_adapter(model).mlp_blocks(model),
            positions=args.positions, num_examples=args.num_examples,
            batch_size=args.batch_size, pad_id=pad_id, model_id=args.model,
        )  # fmt: skip
    elif args.scorer == "random":
        scorer = RandomScorer(seed=args.seed)
    elif args.finetuned:
        scorer = WeightCosine(CheckpointReference(args.finetuned),
                              {"reference": str(args.finetuned)})  # fmt: skip
    else:
        steps = _train_steps(encoded, args, info, pad_id)
        return finetune_and_score(engine, groups, steps, args.cosine_steps)
    return scorer.score(engine, groups), scorer.meta()


def run_score(args: ScoreArgs) -> None:
    """One rank's `neurons score` job (every rank, or via `launcher.run.spawn.run_local`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher.dist import init_distributed, print0, shutdown
    from launcher.engines import OptimConfig, build_engine
    from ncft.data.examples import encode
    from ncft.neuron_set import NeuronSet
    from ncft.selection import check_identical_across_ranks, to_neuron_set, top_k
    from ncft.selection import union_with_previous as union

    info = init_distributed()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    encoded = encode(load_examples(args), tokenizer, args.max_length)
    groups = _groups(model, args)  # names and shapes come from the unwrapped model
    cfg = OptimConfig(lr=args.lr, micro_batch_size=args.batch_size)
    engine = build_engine(args.backend, model, cfg, info, ds_config=args.ds_config)
    scores, meta = _scores(engine, model, groups, encoded, args, info, pad_id)
    reverse = args.scorer == "reversed"
    chosen = top_k(scores, groups, args.fraction, args.count, not args.global_topk, reverse)
    meta = {**meta, "task": args.task or Path(args.data).stem, "model_id": args.model,
            "fraction": args.fraction, "count": args.count, "per_layer": not args.global_topk,
            "unit": args.unit, "modules": args.modules.split(","), "reversed": reverse,
            "world_size": info.world_size, "backend": args.backend,
            "command": {k: v for k, v in asdict(args).items() if v is not None}}  # fmt: skip
    nset = to_neuron_set(chosen, groups, meta)
    if args.union_with:
        nset = union(nset, NeuronSet.load(args.union_with))
    checksum = check_identical_across_ranks(engine, nset)
    if info.is_main_process:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        nset.save(args.out)
    print0(f"wrote {args.out}: {nset.num_selected()} selected, checksum {checksum[:12]}")
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
          f"checksum {nset.checksum()}")  # fmt: skip
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
