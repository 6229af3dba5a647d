import json

import pytest

from launcher.cli.compare import compare_table


def _run(path, method, matrix, protocol=None):
    path.mkdir()
    res = {"tasks": ["a", "b"], "method": method, "matrix": matrix,
           "summary": {"average_performance": 0.5, "backward_transfer": -0.1}}
    if protocol:
        res["protocol"] = protocol
    (path / "results.json").write_text(json.dumps(res))
    return str(path)


def test_compare_shows_fg_as_retention_and_forgetting_beside_it(tmp_path):
    old = _run(tmp_path / "old", "ncft", [[0.8, 0.6], [0.1, 0.9]])  # written before protocol
    new = _run(tmp_path / "new", "wncft", [[0.5, 0.5], [0.2, 0.7]],
               {"classification": "generate", "wncft_query": "example"})
    table = compare_table([old, new])
    assert "retention" in table.splitlines()[0] and "lower = less forgotten" in table
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines()
            if line.startswith("| old") or line.startswith("| new")}
    # FG = 0.6 / 0.8 = 0.75, forgetting = 0.8 - 0.6 = 0.2; the other run lost nothing.
    assert rows["old"][-3:] == ["0.750", "0.200", "rank |"]
    assert rows["new"][-3:] == ["1.000", "0.000", "generate, query=example |"]
    calibrated = _run(tmp_path / "cal", "ncft", [[0.8, 0.6], [0.1, 0.9]],
                      {"classification": "rank", "calibration": "content_free"})
    assert compare_table([calibrated]).splitlines()[-1].endswith(
        "rank, calibration=content_free |")
    with pytest.raises(ValueError, match="no results.json"):
        compare_table([str(tmp_path)])
