"""The evidence runs of benchmarks/EVIDENCE.md: learning-rate grid, method runs, tables.

Three subcommands, each resumable (a run whose `results.json` exists is not redone):

* `grid SPEC --out DIR --family NAME=LR,LR,... [--heldout N]`: for each family
  (`full`, `lora`, `neurons`: the single-task method that trains what the continual
  methods of that family train) and learning rate, train on the spec's FIRST task
  with the spec's budget and score on `N` held-out training rows (the task's
  `eval_split: heldout`: the last N rows of its training file, never trained on).
  When a family's best rate is an end of its list, up to `--extend` rates beyond it
  are tried (x3 or /3 each). Writes `DIR/grid.json`: every score and each family's
  best learning rate (ties go to the smaller rate, the safer choice for continual
  learning).
* `run SPEC --grid DIR/grid.json --out DIR --methods m1,m2,...`: each continual method
  at its family's chosen rate (`seqft`/`per_task` -> full, `seqlora`/`olora` -> lora,
  `ncft`/`wncft` -> neurons); `--set KEY=VALUE` adds a spec override to every run.
  `--rate KEY=FAMILY` sets another spec key to a family's rate (the study run).
* `pilot SPEC --out DIR --rows R,R,... --lr LR [--heldout N] [--threshold TASK=ACC]`:
  issue #24's budget pilot. Per-task fine-tuning (`per_task`: every task from the base
  model) at each budget in increasing order, `R` training rows per task (capped at the
  task's rows minus the held-out ones, so the largest budget is at most one epoch),
  scored on each task's last `N` training rows. It stops at the first budget at which
  every task reaches its threshold (`--threshold`, default `--default-threshold`) and
  writes `DIR/pilot.json`: every budget's per-task scores, steps and wall time, and the
  chosen budget (the largest tried when none passes: "use one epoch").
  `grid` and `run` take `--pilot DIR/pilot.json` to train at the chosen budget.
* `bleu RUN... --out FILE.json`: generation runs' BLEU with 95% bootstrap intervals
  over test sentences, paired differences vs the first run, trainable elements, and
  NeFT's utilization summary where the run has one.
* `matrices [--grid grid.json] [--table table.json]`: the grid and each run's accuracy
  matrix with per-cell intervals, as Markdown.
* `table RUN...  --out FILE.json [--samples B]`: the accuracy matrix, AP, BWT and
  average forgetting of each run with 95% percentile bootstrap intervals over the
  evaluation examples (`ncft.analysis.bootstrap`), per-class prediction counts after
  every stage, as JSON and a Markdown table on stdout.

What the grid scores (`--select-on`): the papers tune per method but do not say on
what. `first-task` (the default, the old protocol of EVIDENCE.md) trains the family's
single-task method on the first task and scores its held-out rows: cheap, but blind
to forgetting (it picked LoRA's 9e-3, which learns the first task fastest and forgets
most). `heldout-sequence` (the real protocol, docs/protocol.md) trains the family's
CONTINUAL method (`full` -> seqft, `lora` -> seqlora, `neurons` -> ncft) through the
WHOLE sequence, every task on its training rows minus its last `--heldout` rows, and
scores the mean over ALL tasks of the held-out accuracy after the last stage (AP on
held-out training rows): the rate that ends the sequence best, never looking at a
test row. Either way SeqLoRA and O-LoRA share a rate, as do NCFT and W-NCFT.

Run (the numbers in EVIDENCE.md; ~1 h on 2 cores each):

    python benchmarks/evidence.py grid examples/evidence_o1_smollm2.yaml --out runs/evidence/grid \\
        --family full=1e-5,3e-5,1e-4 --family lora=1e-4,3e-4,1e-3 \\
        --family neurons=1e-4,3e-4,1e-3
    python benchmarks/evidence.py run examples/evidence_o1_smollm2.yaml \\
        --grid runs/evidence/grid/grid.json --out runs/evidence \\
        --methods seqft,seqlora,olora,ncft,wncft,per_task
    python benchmarks/evidence.py table runs/evidence/o1_* --out benchmarks/results/evidence_o1.json
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ncft.continual.methods import METHODS, method
from ncft.run_paths import RunPaths

# The learning-rate family of a method, from what it trains (`Method.trains`): every
# method has one, so a new row of the method table needs nothing here.
FAMILY_OF_TRAINS = {"all": "full", "lora": "lora", "neurons": "neurons"}


def continual_of(family: str) -> str:
    """The family's plain continual method (`--select-on heldout-sequence` trains it): it
    trains what the family trains, continues the previous stage, and neither adds an
    adapter per task nor mixes at inference (full -> seqft, lora -> seqlora, neurons ->
    ncft)."""
    trains = {v: k for k, v in FAMILY_OF_TRAINS.items()}[family]
    return next(name for name, row in METHODS.items()
                if row.trains == trains and row.continual and not row.from_base
                and not row.mixes and not row.adapter_per_task and not row.random)


def family_of(name: str) -> str:
    """The grid family whose best rate method `name` uses."""
    return FAMILY_OF_TRAINS[method(name).trains]


def _ncft_run(spec: dict, out: Path, overrides: list[str]) -> float:
    """Write `spec` beside the run and run it; returns wall seconds (0 if it was done)."""
    if RunPaths(out).results.is_file():
        return 0.0
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = copy.deepcopy(spec)
    spec["output"] = {**spec.get("output", {}), "dir": str(out.resolve()), "overwrite": True}
    path = out.parent / f"{out.name}.spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    start = time.time()
    cmd = [sys.executable, "-m", "launcher.cli.main", "run", str(path), *overrides]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    wall = time.time() - start
    (out / "wall_seconds.txt").write_text(f"{wall:.1f}\n")
    return wall


def _with_budget(spec: dict, pilot: str | None) -> dict:
    """`spec` with every task's `train_size` capped at the pilot's chosen rows (if any).

    The pilot (`pilot.json`) fixes the budget per task for every later run of the
    protocol; a task with fewer rows trains on all of them (one epoch at most)."""
    if pilot is None:
        return spec
    rows = json.loads(Path(pilot).read_text())["chosen_rows"]
    spec["tasks"] = [{**t, "train_size": min(t.get("train_size", rows), rows)}
                     for t in spec["tasks"]]
    return spec


def _load(spec_path: str) -> dict:
    spec = yaml.safe_load(Path(spec_path).read_text())
    # Task data paths in the spec resolve against the spec's folder; the written copies
    # live elsewhere, so pin the data root.
    spec.setdefault("data_root", str(Path(__file__).resolve().parents[1] / "data"))
    return spec


def _beyond(rates: list[str], best: str) -> str | None:
    """The next rate past the end of the grid where `best` sits (x3 or /3), else None."""
    ordered = sorted(rates, key=float)
    if best == ordered[-1]:
        return f"{float(best) * 3:.0e}".replace("e-0", "e-")
    if best == ordered[0]:
        return f"{float(best) / 3:.0e}".replace("e-0", "e-")
    return None


def _training_rows(task: dict, data_root: str) -> int | None:
    """Rows of a data-root task's training file (None for other sources)."""
    source = task["source"]
    folder = {"cl_benchmark": f"cl_benchmark/{source.get('name')}",
              "translation": f"translation_{source.get('pair', 'en_es')}"}.get(source["type"])
    if folder is None:
        return None
    with open(Path(data_root) / folder / "train.jsonl", encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip())


def heldout_tasks(base: dict, heldout: int, sequence: bool) -> list[dict]:
    """The grid's tasks: the first (`first-task`) or all (`heldout-sequence`), each
    evaluated on its last `heldout` training rows and trained on at most the rest."""
    out = []
    for task in base["tasks"] if sequence else base["tasks"][:1]:
        task = {**task, "eval_split": "heldout", "eval_size": heldout}
        rows = _training_rows(task, base["data_root"])
        if rows is not None:
            task["train_size"] = min(task.get("train_size", 1000), rows - heldout)
        out.append(task)
    return out


def grid(args: argparse.Namespace) -> None:
    """The `grid` subcommand (module docstring)."""
    base = _with_budget(_load(args.spec), args.pilot)
    sequence = args.select_on == "heldout-sequence"
    tasks = heldout_tasks(base, args.heldout, sequence)
    out = Path(args.out)
    families = {}
    for item in args.family:
        family, rates = item.split("=")
        families[family] = rates.split(",")
    scores: dict[str, dict[str, float]] = {}
    walls: dict[str, dict[str, float]] = {}

    def score(family: str, rate: str) -> None:
        method = continual_of(family) if sequence else family
        spec = {**copy.deepcopy(base), "tasks": tasks, "method": method}
        spec["training"] = {**spec["training"], "lr": float(rate)}
        # The sequence's score needs the last column only; "seen" evaluates it.
        spec["eval"] = {**spec.get("eval", {}), "tasks": "seen" if sequence else "all",
                        "zero_shot": False, "reference": None}
        run_dir = out / f"{family}_lr{rate}"
        wall = _ncft_run(spec, run_dir, [])
        result = json.loads(RunPaths(run_dir).results.read_text())
        scores.setdefault(family, {})[rate] = (
            result["summary"]["average_performance"] if sequence else result["matrix"][0][0])
        walls.setdefault(family, {})[rate] = wall or float(
            (run_dir / "wall_seconds.txt").read_text())

    def best_of(family: str) -> str:
        s = scores[family]
        return min(s, key=lambda r: (-s[r], float(r)))

    for family, rates in families.items():
        for rate in rates:
            score(family, rate)
        # A best rate at an end of the grid says the optimum may lie beyond it: extend.
        for _ in range(args.extend):
            more = _beyond(list(scores[family]), best_of(family))
            if more is None or more in scores[family]:
                break
            score(family, more)
    best = {f: best_of(f) for f in scores}
    report = {"select_on": args.select_on, "tasks": tasks, "heldout_rows": args.heldout,
              "scores": scores, "best": best,
              "wall_seconds": walls, "budget": base["training"],
              "extended": {f: sorted(set(scores[f]) - set(families[f]), key=float)
                           for f in scores}}
    (out / "grid.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({"scores": scores, "best": best}, indent=2))


def run(args: argparse.Namespace) -> None:
    """The `run` subcommand (module docstring)."""
    base = _with_budget(_load(args.spec), args.pilot)
    best = json.loads(Path(args.grid).read_text())["best"]
    for name in args.methods.split(","):
        rate = best[family_of(name)]
        spec = {**copy.deepcopy(base), "method": name}
        spec["training"] = {**spec["training"], "lr": float(rate)}
        if method(name).from_base and method(name).continual:
            # each column is its own model: only the diagonal counts
            spec["eval"] = {**spec.get("eval", {}), "tasks": "current"}
        rates = [f"{key}={best[family]}" for key, family in
                 (item.split("=") for item in args.rate)]
        _ncft_run(spec, Path(args.out) / f"{args.prefix}{name}", [*rates, *args.overrides])


def pilot(args: argparse.Namespace) -> None:
    """The `pilot` subcommand (module docstring)."""
    base = _load(args.spec)
    tasks = heldout_tasks(base, args.heldout, sequence=True)
    mbs = base["training"].get("micro_batch_size", 4)
    thresholds = {t["source"]["name"]: args.default_threshold for t in tasks}
    for item in args.threshold:
        name, value = item.split("=")
        if name not in thresholds:
            raise ValueError(f"--threshold {item}: no task {name!r} in {args.spec}")
        thresholds[name] = float(value)
    out = Path(args.out)
    budgets, chosen = [], None
    for rows in sorted(int(r) for r in args.rows.split(",")):
        spec = {**copy.deepcopy(base), "method": "per_task", "eval": {
            **base.get("eval", {}), "tasks": "current", "zero_shot": False, "reference": None}}
        spec["tasks"] = [{**t, "train_size": min(rows, t["train_size"])} for t in tasks]
        spec["training"] = {**spec["training"], "lr": args.lr, "epochs": 1, "steps": None}
        run_dir = out / f"per_task_rows{rows}"
        wall = _ncft_run(spec, run_dir, args.overrides) or float(
            (run_dir / "wall_seconds.txt").read_text())
        result = json.loads(RunPaths(run_dir).results.read_text())
        names = [t["source"]["name"] for t in tasks]
        scores = {n: result["matrix"][i][i] for i, n in enumerate(names)}
        passed = all(scores[n] >= thresholds[n] for n in names)
        budgets.append({"rows": rows, "steps": {n: -(-t["train_size"] // mbs) for n, t in
                                                zip(names, spec["tasks"])},
                        "scores": scores, "passed": passed, "wall_seconds": wall})
        print(json.dumps(budgets[-1]), flush=True)
        if passed:
            chosen = rows
            break
    report = {"lr": args.lr, "heldout_rows": args.heldout, "thresholds": thresholds,
              "budgets": budgets, "chosen_rows": chosen or budgets[-1]["rows"],
              "passed": chosen is not None}
    (out / "pilot.json").write_text(json.dumps(report, indent=2))


def table(args: argparse.Namespace) -> None:
    """The `table` subcommand (module docstring)."""
    # Imported here: the grid and the runs start before any table is needed.
    from ncft.analysis.bootstrap import compare_runs, run_table, table_markdown

    rows = [run_table(Path(r), samples=args.samples, seed=args.seed) for r in args.runs]
    markdown = table_markdown(rows)
    for row, diff in zip(rows, compare_runs(rows)):
        row.pop("_replicates")
        row["vs_first_run"] = diff
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    Path(args.out).with_suffix(".md").write_text(markdown + "\n")
    print(markdown)


def trainable_elements(run_dir: Path) -> int | None:
    """Elements a run trained: its NeuronSet's rows/columns, or its LoRA adapters' A and B.

    Shapes come from the run's exported model (`final/`), where LoRA is merged.
    """
    from safetensors import safe_open

    from ncft.neuron_set import NeuronSet

    spec = yaml.safe_load(RunPaths(run_dir).spec.read_text())
    with safe_open(str(RunPaths(run_dir).final / "model.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
    if method(spec["method"]).lora and not method(spec["method"]).adapter_per_task:
        targets = tuple(spec["lora"]["target_modules"])
        return sum(spec["lora"]["r"] * (shape[0] + shape[1]) for name, shape in shapes.items()
                   if name.endswith(".weight") and name[: -len(".weight")].endswith(targets))
    neuron_files = sorted(RunPaths(run_dir).neurons.glob("*.safetensors"))
    if not neuron_files:
        return None
    nset = NeuronSet.load(neuron_files[0])
    return sum(len(sel.indices) * shapes[fqn][1 - sel.axis] for fqn, sel in nset.entries.items())


def bleu(args: argparse.Namespace) -> None:
    """The `bleu` subcommand: BLEU with 95% intervals, paired differences vs the first run."""
    from launcher.run.task_data import load_task
    from launcher.spec.schema import load_spec
    from ncft.analysis.bootstrap import bleu_replicates, interval

    rows, reference = [], None
    for run in map(Path, args.runs):
        results = json.loads(RunPaths(run).results.read_text())
        spec = load_spec(RunPaths(run).spec)
        task = spec.tasks[0]
        refs = [ex.answer for ex in load_task(task, spec.data_root).test]
        detail = results["details"][task.name][0]
        hyps = detail["hypotheses"]
        reps = bleu_replicates(hyps, refs[: len(hyps)], args.samples, args.seed)
        reference = reps if reference is None else reference
        utilization = RunPaths(run).neft_utilization(task.name)
        rows.append({"run": str(run), "method": results["method"], "lr": spec.training.lr,
                     "trainable_elements": trainable_elements(run), "bleu": detail["bleu"],
                     "ci95": interval(reps),
                     "vs_first_run": None if reps is reference else interval(reps - reference),
                     "utilization": json.loads(utilization.read_text())
                     if utilization.is_file() else None})
    Path(args.out).write_text(json.dumps(rows, indent=2))
    lines = ["| run | method | lr | trainable | BLEU | Δ vs first |", "|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["ci95"]
        delta = "-" if r["vs_first_run"] is None else "[{:.4f}, {:.4f}]".format(
            *r["vs_first_run"])
        lines.append(f"| {Path(r['run']).name} | {r['method']} | {r['lr']} | "
                     f"{r['trainable_elements']:,} | {100 * r['bleu']:.2f} "
                     f"[{100 * lo:.2f}, {100 * hi:.2f}] | {delta} |")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def grid_markdown(report: dict) -> str:
    """The grid as a table: one row per family, held-out accuracy per rate, best in bold."""
    lines = ["| family | rate: held-out accuracy | chosen |", "|---|---|---|"]
    for family, scores in report["scores"].items():
        cells = ", ".join(
            (f"**{r}: {v:.2f}**" if r == report["best"][family] else f"{r}: {v:.2f}")
            for r, v in sorted(scores.items(), key=lambda kv: float(kv[0])))
        lines.append(f"| {family} | {cells} | {report['best'][family]} |")
    return "\n".join(lines)


def matrix_markdown(row: dict) -> str:
    """One run's accuracy matrix (task i after stage j) with per-cell 95% intervals."""
    tasks = row["tasks"]
    lines = ["| task \\ after | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for i, name in enumerate(tasks):
        cells = []
        for j in range(len(tasks)):
            value, ci = row["matrix"][i][j], row["cell_ci95"].get(f"{i},{j}")
            cells.append("" if value is None else
                         f"{value:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def matrices(args: argparse.Namespace) -> None:
    """The `matrices` subcommand: the grid and each table row's matrix, as Markdown."""
    parts = []
    if args.grid:
        parts += ["### Learning-rate grid", grid_markdown(json.loads(Path(args.grid).read_text()))]
    for row in json.loads(Path(args.table).read_text()) if args.table else []:
        parts += [f"### {row['method']} (lr {row['lr']})", matrix_markdown(row)]
    print("\n\n".join(parts))


def main(argv: list[str] | None = None) -> None:  # noqa: D103
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("grid")
    g.add_argument("spec")
    g.add_argument("--out", required=True)
    g.add_argument("--family", action="append", required=True)
    g.add_argument("--heldout", type=int, default=100)
    g.add_argument("--select-on", choices=("first-task", "heldout-sequence"),
                   default="first-task",
                   help="score a rate on the first task alone (old protocol) or by the "
                   "held-out AP of all tasks after the whole sequence (module docstring)")
    g.add_argument("--pilot", help="pilot.json: cap every task's train_size at its "
                   "chosen rows (`pilot`)")
    g.add_argument("--extend", type=int, default=2,
                   help="rates to add past a grid end that scored best (x3 or /3 each)")
    r = sub.add_parser("run")
    r.add_argument("spec")
    r.add_argument("--grid", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--methods", required=True)
    r.add_argument("--prefix", default="o1_")
    r.add_argument("--pilot", help="pilot.json: cap every task's train_size at its "
                   "chosen rows (`pilot`)")
    r.add_argument("--rate", action="append", default=[],
                   help="KEY=FAMILY: set spec key KEY to FAMILY's chosen rate")
    r.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="a spec override for every method's run")
    p = sub.add_parser("pilot")
    p.add_argument("spec")
    p.add_argument("--out", required=True)
    p.add_argument("--rows", required=True, help="training rows per task, comma-separated")
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--heldout", type=int, default=100)
    p.add_argument("--threshold", action="append", default=[], metavar="TASK=ACC")
    p.add_argument("--default-threshold", type=float, default=0.8)
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="a spec override for every run")
    t = sub.add_parser("table")
    t.add_argument("runs", nargs="+")
    t.add_argument("--out", required=True)
    t.add_argument("--samples", type=int, default=1000)
    t.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("bleu")
    b.add_argument("runs", nargs="+")
    b.add_argument("--out", required=True)
    b.add_argument("--samples", type=int, default=1000)
    b.add_argument("--seed", type=int, default=0)
    m = sub.add_parser("matrices")
    m.add_argument("--grid")
    m.add_argument("--table")
    args = parser.parse_args(argv)
    commands = {"grid": grid, "run": run, "pilot": pilot, "table": table, "bleu": bleu,
                "matrices": matrices}
    commands[args.cmd](args)


if __name__ == "__main__":
    main()
