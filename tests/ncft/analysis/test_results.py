import pytest

from ncft.analysis.results import (
    check_matrix,
    continual_metrics,
    deactivation_matrix,
)

MATRIX = [[0.9, 0.8, 0.7], [0.2, 0.85, 0.6], [0.1, 0.3, 0.95]]
DEACT = {
    "tasks": ["a", "b", "c"],
    "baseline": [0.8, 0.5, 1.0],
    "task_neurons_off": [[0.4, 0.45, 0.9], [0.8, 0.25, 1.0], [0.72, 0.5, 0.1]],
    "random_off": [[0.76, 0.475, 0.95], [0.76, None, 0.95], [0.76, 0.475, 0.95]],
}


def test_continual_metrics_known_values():
    cm = continual_metrics({"tasks": ["a", "b", "c"], "matrix": MATRIX})
    assert cm["final"] == [0.7, 0.6, 0.95]
    assert cm["average_performance"] == pytest.approx(0.75)
    assert cm["backward_transfer"] == pytest.approx((-0.2 - 0.25) / 2)
    assert cm["fg"] is None  # no per-task reference: no FG, only retention
    assert cm["kept"][0] is None
    assert cm["kept"][1] == pytest.approx(0.8 / 0.9)
    assert cm["kept"][2] == pytest.approx((0.7 / 0.9 + 0.6 / 0.85) / 2)
    summary = {"forgetting": {"reference": [1.0, 0.8, 0.95]}}
    with_ref = continual_metrics({"tasks": ["a", "b", "c"], "matrix": MATRIX,
                                  "summary": summary})
    assert with_ref["fg"][2] == pytest.approx((0.7 / 1.0 + 0.6 / 0.8) / 2)


def test_continual_metrics_with_unevaluated_entries():
    m = [[0.0, 0.5, None], [None, 0.8, 0.4], [None, None, 0.9]]
    cm = continual_metrics({"tasks": ["a", "b", "c"], "matrix": m})
    # a[0][0] == 0: ratio undefined; a[0][2] missing -> stage 2 uses only task 1.
    assert cm["kept"] == [None, None, pytest.approx(0.5)]
    assert cm["final"] == [None, 0.4, 0.9] and cm["average_performance"] is None


def test_deactivation_drop_matrix():
    d = deactivation_matrix(DEACT)
    expect = [[0.5, 0.1, 0.1], [0.0, 0.5, 0.0], [0.1, 0.0, 0.9]]
    for row, exp in zip(d["drop"], expect):
        assert row == pytest.approx(exp)
    s = d["summary"]
    assert s["diag"] == pytest.approx(1.9 / 3)
    assert s["offdiag"] == pytest.approx(0.3 / 6)
    assert s["specificity"] == pytest.approx(1.9 / 3 - 0.05)
    assert d["random_drop"][1][1] is None
    assert s["random_diag"] == pytest.approx(0.05) and s["random_offdiag"] == pytest.approx(0.05)
    assert s["random_mean"] == pytest.approx(0.05)


def test_deactivation_without_random_and_zero_baseline():
    d = deactivation_matrix({**DEACT, "random_off": None, "baseline": [0.8, 0.0, 1.0]})
    assert d["random_drop"] is None and d["summary"]["random_diag"] is None
    assert d["drop"][0][1] is None  # relative to a zero baseline: undefined


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"baseline": [1.0, 2.0]}, "deactivation.baseline"),
        ({"task_neurons_off": [[1.0, 2.0, 3.0]]}, "deactivation.task_neurons_off"),
        ({"random_off": [[1, 2, "x"]] * 3}, r"deactivation.random_off\[0\]\[2\]"),
        ({"tasks": []}, "deactivation.tasks"),
    ],
)
def test_deactivation_errors_name_the_field(patch, field):
    with pytest.raises(ValueError, match=field):
        deactivation_matrix({**DEACT, **patch})


def test_check_matrix_rejects_nan_and_bool():
    with pytest.raises(ValueError, match=r"m\[0\]\[1\]"):
        check_matrix([[1.0, float("nan")], [1.0, 1.0]], "m", 2)
    with pytest.raises(ValueError, match=r"m\[1\]\[0\]"):
        check_matrix([[1.0, 1.0], [True, 1.0]], "m", 2)
    with pytest.raises(ValueError, match="results.matrix"):
        continual_metrics({"tasks": ["a"], "matrix": [[1.0, 2.0]]})
