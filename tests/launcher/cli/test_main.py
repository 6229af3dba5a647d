"""The CLI stays small: knobs go into the spec, not into new flags."""

from launcher.cli import build_parser


def _subcommands(parser):
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


def test_subcommands_are_frozen():
    subs = _subcommands(build_parser())
    assert sorted(subs) == [
        "compare", "masked-train", "neurons", "plan", "report", "run", "validate"
    ]
    assert sorted(_subcommands(subs["neurons"])) == ["inspect", "overlap", "score"]
    run_flags = {o for a in subs["run"]._actions for o in a.option_strings}
    assert run_flags == {"-h", "--help"}, "ncft run takes a spec and key=value overrides only"
    # issue #9 names these flags; spec knobs stay overrides
    plan_flags = {o for a in subs["plan"]._actions for o in a.option_strings}
    assert plan_flags == {"-h", "--help", "--world-size", "--nodes", "--gpu-memory", "--json"}
