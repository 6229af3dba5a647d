import json

import pytest
import yaml

from launcher.cli import main
from launcher.cli.compare import compare_table


def _run(path, method, matrix, protocol=None, seed=None, details=None, **extra):
    path.mkdir()
    res = {"tasks": ["a", "b"], "method": method, "matrix": matrix,
           "summary": {"average_performance": 0.5, "backward_transfer": -0.1},
           "details": details or {}, **extra}
    if protocol:
        res["protocol"] = protocol
    (path / "results.json").write_text(json.dumps(res))
    if seed is not None:
        # Seeds differ in every section's seed; the later run's spec also spells out a
        # default the earlier one lacks (written before the field existed).
        spec = {"method": method, "training": {"seed": seed, "lr": 0.001},
                "selection": {"seed": seed}, "output": {"dir": str(path)},
                **({"eval": {"calibration": "none"}} if seed else {})}
        (path / "spec.resolved.yaml").write_text(yaml.safe_dump(spec))
    return str(path)


def _rows(table: str, prefix: str) -> dict[str, list[str]]:
    return {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines()
            if line.startswith(prefix)}


def test_without_a_reference_the_column_is_retention_not_fg(tmp_path):
    old = _run(tmp_path / "old", "ncft", [[0.8, 0.6], [0.1, 0.9]])  # written before protocol
    new = _run(tmp_path / "new", "ncft", [[0.5, 0.5], [0.2, 0.7]],
               {"classification": "rank", "wncft_query": "example"})
    table = compare_table([old, new])
    assert "retention (own diagonal, not FG)" in table and "FG (eq. 5, higher" not in table
    assert "lower = less forgotten" in table
    rows = _rows(table, "| old") | _rows(table, "| new")
    # retention = 0.6 / 0.8 = 0.75, forgetting = 0.8 - 0.6 = 0.2; the other lost nothing.
    assert rows["old"][-4:-1] == ["0.750", "0.200", "n/a"]
    assert rows["new"][-4:-1] == ["1.000", "0.000", "n/a"]
    assert rows["new"][-1] == "rank, query=example |"
    with pytest.raises(ValueError, match="no results.json"):
        compare_table([str(tmp_path)])


def test_fg_divides_by_the_per_task_reference_by_hand(tmp_path, capsys):
    run = _run(tmp_path / "seq", "ncft", [[0.8, 0.6], [0.1, 0.9]],
               in_label_set=[[1.0, 0.5], [None, 1.0]])
    ref = _run(tmp_path / "ref", "per_task", [[0.96, None], [None, 0.9]])
    assert main(["compare", run, "--reference", ref]) == 0
    table = capsys.readouterr().out
    assert "FG (eq. 5, higher better)" in table and "per-task reference ref" in table
    # FG_1 = a[0][1] / A_0 = 0.6 / 0.96 = 0.625 (the run's own a[0][0] = 0.8 would give
    # 0.75); the final in-label-set share is the mean of 0.5 and 1.0.
    assert _rows(table, "| seq")["seq"][-4:-1] == ["0.625", "0.200", "0.750"]
    with pytest.raises(ValueError, match="must be a per_task run"):
        compare_table([run], reference=run)


def test_raw_and_calibrated_scores_get_separate_tables(tmp_path):
    cal = {"classification": "rank", "calibration": "content_free"}
    plain = _run(tmp_path / "plain", "seqft", [[0.7, 0.3], [0.2, 0.8]])
    calibrated = _run(tmp_path / "cal", "ncft", [[0.8, 0.6], [0.1, 0.9]], cal,
                      raw_matrix=[[0.8, 0.4], [0.1, 0.9]])
    table = compare_table([plain, calibrated])
    raw_part, cal_part = table.split("### calibrated")
    assert raw_part.startswith("### raw: uncalibrated")
    # The raw table holds every run, the calibrated run with its raw scores (0.4).
    raw = _rows(raw_part, "| ")
    assert raw["cal"][2] == "0.400" and raw["cal"][-1] == "rank, uncalibrated read-out |"
    assert raw["plain"][2] == "0.300"
    # The calibrated table holds only the calibrated run, with its calibrated scores.
    calibrated_rows = _rows(cal_part, "| ")
    assert "plain" not in calibrated_rows and calibrated_rows["cal"][2] == "0.600"
    assert calibrated_rows["cal"][-1] == "rank, calibration=content_free |"


def test_seeds_of_one_method_are_grouped_with_paired_intervals(tmp_path):
    def details(first: list[int]) -> dict:
        ones = [1] * 10
        return {"a": [{"correct": ones}, {"correct": first}],
                "b": [None, {"correct": ones}]}

    def matrix(first: list[int]) -> list:
        return [[1.0, sum(first) / 10], [None, 1.0]]

    strong = [[1] * 10, [1] * 5 + [0] * 5]
    weak = [[0] + s[1:] for s in strong]  # one example worse at each seed
    runs = [_run(tmp_path / f"{name}{seed}", method, matrix(firsts[seed]), seed=seed,
                 details=details(firsts[seed]))
            for name, method, firsts in (("ncft", "ncft", strong), ("seqft", "seqft", weak))
            for seed in (0, 1)]
    table = compare_table(runs, samples=500)
    seeds = _rows(table, "| ncft") | _rows(table, "| seqft")
    # AP per seed: (final a + final b) / 2; seqft is exactly 0.05 lower at each seed.
    assert seeds["ncft"][1:3] == ["0, 1", "1.000, 0.750"]
    assert seeds["seqft"][1:3] == ["0, 1", "0.950, 0.700"]
    assert seeds["ncft"][3].startswith("0.875 [")
    assert seeds["seqft"][4] == "-0.050, -0.050"
    low, high = map(float, seeds["seqft"][5].split("[")[1].rstrip("] |").split(", "))
    assert low <= -0.05 <= high and high - low < 0.2  # paired: the seed spread cancels
