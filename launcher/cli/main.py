"""The `ncft` command line: a few subcommands; experiment knobs live in the spec.

Each subcommand imports its module inside its handler, so `ncft --help` starts in
1.4 s on the 2-core CI machine instead of 2.5 s with the run path (torch,
transformers) imported. Elsewhere, imports inside functions are kept only for heavy
optional third-party modules (deepspeed, peft, datasets, matplotlib, sacrebleu,
rouge_score, tensorboard) and to break an import cycle (`TYPE_CHECKING`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import fields

from launcher.errors import (
    DEBUG_ENV,
    EXIT_DIVERGED,
    RanksDiverged,
    RanksFailed,
    UserError,
    debugging,
)


def _add_masked_train(sub) -> None:
    # The light module: building the parser must not import torch (every command does).
    from launcher.run.masked_train_args import MaskedTrainArgs

    p = sub.add_parser(
        "masked-train",
        help="train N steps with a NeuronSet (or random units) on an engine; export + report",
    )
    p.add_argument("--model", required=True, help="HF model directory or id")
    p.add_argument("--data", required=True, help="UTF-8 text file to train on")
    p.add_argument("--out", required=True, help="output directory (model/, report.json)")
    p.add_argument("--nproc", type=int, default=1, help="local ranks to spawn")
    for f in fields(MaskedTrainArgs):
        if f.name in {"model", "data", "out"}:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = float if f.type in ("float",) else int if f.type in ("int",) else str
        p.add_argument(flag, type=kind, default=f.default, help=f"default: {f.default}")
    p.set_defaults(func=_masked_train)


def _masked_train(ns: argparse.Namespace) -> int:
    from launcher.run.masked_train import run
    from launcher.run.masked_train_args import MaskedTrainArgs
    from launcher.run.models import resolve_model
    from launcher.run.spawn import run_local
    from ncft.sparse_delta import UPDATE_MODES

    values = {f.name: getattr(ns, f.name) for f in fields(MaskedTrainArgs)}
    if ns.update not in UPDATE_MODES:  # before any rank starts
        raise ValueError(f"--update must be one of {list(UPDATE_MODES)}, got {ns.update!r}")
    if ns.backend == "single" and ns.nproc != 1:
        raise SystemExit("--backend single runs one process; use --nproc 1")
    values["model"] = resolve_model(ns.model)  # convert once, before ranks start
    run_local(run, ns.nproc, MaskedTrainArgs(**values))
    return 0


def _add_spec_command(sub, name: str, help: str, func) -> argparse.ArgumentParser:
    """Add subcommand `name` taking a spec path and `key.sub=value` overrides."""
    p = sub.add_parser(name, help=help)
    p.add_argument("spec")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    p.set_defaults(func=func)
    return p


def _invalid_spec(path: str, err: Exception) -> int:
    """Print a SpecError's field-by-field message; exit status 2 (a user error)."""
    print(f"invalid spec {path}:\n{err}", file=sys.stderr)
    return 2


def _add_validate(sub) -> None:
    _add_spec_command(sub, "validate", "check a spec; print it resolved and its stages",
                      _validate)


def _validate(ns: argparse.Namespace) -> int:
    from launcher.run.preflight import check_data, check_model, check_output
    from launcher.spec import SpecError, describe_stages, dump_resolved, load_spec

    try:
        spec = load_spec(ns.spec, ns.overrides)
    except SpecError as err:
        return _invalid_spec(ns.spec, err)
    check_model(spec.model.name_or_path)
    check_data(spec)
    print(dump_resolved(spec))
    print("# planned stages")
    for line in describe_stages(spec):
        print(f"# - {line}")
    try:  # the directory's state is not the spec's fault: `ncft run` will refuse it
        check_output(spec)
    except UserError as err:
        print(f"# note: {err}")
    return 0


def _add_run(sub) -> None:
    _add_spec_command(sub, "run", "run an experiment spec (spawns the ranks it asks for)",
                      _run)


def _run(ns: argparse.Namespace) -> int:
    from launcher.run.experiment import main_run
    from launcher.spec import SpecError

    try:
        main_run(ns.spec, ns.overrides)
    except SpecError as err:
        return _invalid_spec(ns.spec, err)
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a finished run again under changed inference settings "
        "(W-NCFT temperature/query, eval.*), into a new output.dir; trains nothing")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", help="key.sub=value (inference keys only)")
    p.set_defaults(func=_eval)


def _eval(ns: argparse.Namespace) -> int:
    from launcher.run.reevaluate import main_eval
    from launcher.spec import SpecError

    try:
        main_eval(ns.run_dir, ns.overrides)
    except SpecError as err:
        return _invalid_spec(ns.run_dir, err)
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="write analyses, plots and report.md for a run dir")
    p.add_argument("run_dir")
    p.set_defaults(func=_report)


def _report(ns: argparse.Namespace) -> int:
    from ncft.analysis.report import write_report

    print(write_report(ns.run_dir))
    return 0


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="tables of several finished runs (seeds grouped)")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--reference", help="a finished per_task run: its scores are A_i of FG "
                   "(Leng & Xiong eq. 5); without it the table shows retention, not FG")
    p.add_argument("--samples", type=int, default=1000,
                   help="bootstrap replicates of the seeds table (default: 1000)")
    p.set_defaults(func=_compare)


def _compare(ns: argparse.Namespace) -> int:
    from launcher.cli.compare import compare_table

    print(compare_table(ns.run_dirs, ns.reference, ns.samples))
    return 0


def _add_plan(sub) -> None:
    p = _add_spec_command(
        sub, "plan", "per-rank memory of a spec (parameters, grads, optimizer, masks, "
        "activations) without loading weights", _plan
    )
    p.add_argument("--world-size", type=int, default=None,
                   help="total ranks (default: --nodes x engine.nproc_per_node)")
    p.add_argument("--nodes", type=int, default=None, help="nodes (default: engine.nnodes)")
    p.add_argument("--gpu-memory", type=float, default=80.0,
                   help="GiB per GPU to check the plan against (default: 80)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (bytes)")


def _plan(ns: argparse.Namespace) -> int:
    from launcher.plan.report import plan_command

    return plan_command(ns)


def build_parser() -> argparse.ArgumentParser:
    """The full `ncft` parser."""
    parser = argparse.ArgumentParser(prog="ncft", description=__doc__)
    parser.add_argument("--debug", action="store_true",
                        help=f"show tracebacks instead of one-line errors (or {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_eval(sub)
    _add_validate(sub)
    _add_plan(sub)
    _add_report(sub)
    _add_compare(sub)
    from launcher.cli.data import add_data_commands
    from launcher.cli.neurons import add_neuron_commands

    add_neuron_commands(sub)
    add_data_commands(sub)
    _add_masked_train(sub)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a command line; `key.sub=value` overrides may stand anywhere after the spec.

    argparse gives a `nargs="*"` positional only the run of words before the first
    option, so `ncft plan S --world-size 8 a.b=1` leaves `a.b=1` unrecognized. Those
    leftovers are the subcommand's overrides, in the order typed; anything else left
    over is still an error.
    """
    parser = build_parser()
    ns, rest = parser.parse_known_args(argv)
    unknown = [w for w in rest if w.startswith("-") or "=" not in w]
    if unknown or (rest and not hasattr(ns, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or rest)}")
    if rest:
        ns.overrides = [*ns.overrides, *rest]
    return ns


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ncft` console script.

    User errors (`ValueError`, `UserError`) and failed ranks print one line,
    `ncft: error: ...`, and exit 2 and 1; a run that diverged (inf/nan loss or gradient
    norm) exits `EXIT_DIVERGED`; `--debug` raises them with their traceback.
    """
    from ncft.train import Diverged

    ns = parse_args(argv)
    if ns.debug:
        os.environ[DEBUG_ENV] = "1"  # spawned ranks inherit it
    try:
        return ns.func(ns)
    except (Diverged, RanksDiverged) as err:
        if debugging():
            raise
        print(f"ncft: error: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except (ValueError, RanksFailed) as err:
        if debugging():
            raise
        # A UserError's message is the whole story; any other error may be a bug.
        hint = "" if isinstance(err, UserError) else f" ({DEBUG_ENV}=1 shows the traceback)"
        print(f"ncft: error: {err}{hint}", file=sys.stderr)
        return 2 if isinstance(err, ValueError) else 1


if __name__ == "__main__":
    sys.exit(main())
