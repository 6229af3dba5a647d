"""The CLI stays small: knobs go into the spec, not into new flags."""

import pytest

from launcher.cli import build_parser, main


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
