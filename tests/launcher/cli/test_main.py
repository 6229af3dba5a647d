"""The CLI stays small: knobs go into the spec, not into new flags."""

from pathlib import Path

import pytest

from launcher.cli import build_parser, main
from launcher.cli.main import parse_args

REPO = Path(__file__).resolve().parents[3]


def _subcommands(parser):
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


def test_subcommands_are_frozen():
    subs = _subcommands(build_parser())
    assert sorted(subs) == [
        "compare", "data", "eval", "masked-train", "neurons", "plan", "report", "run",
        "validate",
    ]
    assert sorted(_subcommands(subs["neurons"])) == ["inspect", "overlap", "score"]
    run_flags = {o for a in subs["run"]._actions for o in a.option_strings}
    assert run_flags == {"-h", "--help"}, "ncft run takes a spec and key=value overrides only"
    # issue #9 names these flags; spec knobs stay overrides
    plan_flags = {o for a in subs["plan"]._actions for o in a.option_strings}
    assert plan_flags == {"-h", "--help", "--world-size", "--nodes", "--gpu-memory", "--json"}


def test_errors_print_one_line_and_debug_raises(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NCFT_DEBUG", raising=False)
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ncft: error: run_dir") and err.count("\n") == 1, err
    monkeypatch.setenv("NCFT_DEBUG", "1")
    with pytest.raises(ValueError, match="is not a directory"):
        main(["report", str(tmp_path / "missing")])


@pytest.mark.parametrize("command", ["validate", "run"])
def test_spec_errors_name_the_spec_and_exit_2(command, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NCFT_DEBUG", raising=False)
    missing = str(tmp_path / "nope.yaml")
    assert main([command, missing]) == 2
    assert capsys.readouterr().err.startswith(f"invalid spec {missing}:\n")


def _leaf_commands(parser, path=()):
    """`(words, subparser)` of every runnable subcommand, nested ones included."""
    for name, sub in _subcommands(parser).items():
        if any(a.__class__.__name__ == "_SubParsersAction" for a in sub._actions):
            yield from _leaf_commands(sub, (*path, name))
        else:
            yield (*path, name), sub


def _options_between(sub) -> list[str]:
    """Every option of `sub` with a plausible value, to put between two overrides."""
    words = []
    for action in sub._actions:
        if not action.option_strings or action.dest == "help":
            continue
        words.append(action.option_strings[-1])
        if action.choices:  # e.g. `data show --split train|test`
            words.append(str(next(iter(action.choices))))
        elif action.nargs != 0:  # store_true takes no value
            words.append({int: "2", float: "1.5"}.get(action.type, "x.safetensors"))
    return words


TAKES_OVERRIDES = [(words, sub) for words, sub in _leaf_commands(build_parser())
                   if any(a.dest == "overrides" for a in sub._actions)]


def test_the_override_commands_are_the_spec_commands():
    assert sorted(" ".join(w) for w, _ in TAKES_OVERRIDES) == [
        "data show", "data stats", "eval", "neurons score", "plan", "run", "validate"]


@pytest.mark.parametrize("words", [w for w, _ in TAKES_OVERRIDES], ids=" ".join)
def test_overrides_are_accepted_anywhere(words):
    sub = dict(TAKES_OVERRIDES)[words]
    options = _options_between(sub)
    # The positional before the overrides: a spec, or a run directory (`ncft eval`).
    target = next(a.dest for a in sub._actions
                  if not a.option_strings and a.dest not in ("help", "overrides"))
    argv = [*words, "target", "a.b=1", *options, "c.d=[x,y]", *options[:2], "e=3"]
    ns = parse_args(argv)
    assert getattr(ns, target) == "target" and ns.overrides == ["a.b=1", "c.d=[x,y]", "e=3"]


def test_other_leftovers_are_still_errors(capsys):
    with pytest.raises(SystemExit):
        parse_args(["plan", "spec.yaml", "--world-size", "2", "--bogus", "a=1"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["report", "run_dir", "a=1"])  # report takes no overrides
    assert "unrecognized arguments: a=1" in capsys.readouterr().err


def test_an_override_after_an_option_reaches_the_spec(capsys):
    """The issue's command line: the override must change what `ncft plan` plans."""
    spec = str(REPO / "examples" / "standard_cl_o1.yaml")
    assert main(["plan", spec, "--world-size", "1", "training.update=sparse_delta"]) == 0
    sparse = capsys.readouterr().out
    assert main(["plan", spec, "--world-size", "1"]) == 0
    assert sparse != capsys.readouterr().out and "sparse_delta" in sparse
