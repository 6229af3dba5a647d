import json

import pytest

from ncft.continual.metrics import (
    average_forgetting,
    average_performance,
    backward_transfer,
    cl_summary,
    forgetting,
    forward_transfer,
    reference_scores,
    retention,
)

# a[i][j]: task i after training task j (3 tasks).
A = [
    [0.80, 0.60, 0.40],
    [0.30, 0.90, 0.45],
    [0.20, 0.25, 0.50],
]


def test_average_performance_is_mean_of_last_column():
    assert average_performance(A) == pytest.approx((0.40 + 0.45 + 0.50) / 3)


def test_backward_transfer_by_hand():
    # (0.40 - 0.80) + (0.45 - 0.90) = -0.85 over 2 earlier tasks.
    assert backward_transfer(A) == pytest.approx(-0.425)
    assert backward_transfer([[0.7]]) is None


# A_i: each task's score after training it alone (a per_task run's diagonal).
REFERENCE = {"method": "per_task", "tasks": ["yelp", "sst2", "agnews"],
             "matrix": [[0.70, None, None], [None, 0.96, None], [None, None, 0.90]]}


def test_fg_is_eq5_against_the_per_task_reference_by_hand():
    a_i = reference_scores(REFERENCE, ["sst2", "agnews", "yelp"])  # matched by name
    assert a_i == [0.96, 0.90, 0.70]
    fg = forgetting(A, a_i)
    assert fg[0] is None
    assert fg[1] == pytest.approx(0.60 / 0.96)  # not 0.60 / 0.80, the run's own diagonal
    assert fg[2] == pytest.approx((0.40 / 0.96 + 0.45 / 0.90) / 2)
    assert fg[2] == pytest.approx(0.458333, abs=1e-6)
    with pytest.raises(ValueError, match="must be a per_task run"):
        reference_scores({**REFERENCE, "method": "ncft"}, ["sst2"])
    with pytest.raises(ValueError, match=r"no task \['rte'\]"):
        reference_scores(REFERENCE, ["rte"])
    with pytest.raises(ValueError, match="reference has 2 scores for 3 tasks"):
        forgetting(A, [0.9, 0.9])


def test_retention_divides_by_the_runs_own_diagonal():
    kept = retention(A)
    assert kept[0] is None
    assert kept[1] == pytest.approx(0.60 / 0.80)
    assert kept[2] == pytest.approx((0.40 / 0.80 + 0.45 / 0.90) / 2)


def test_ratios_skip_unlearned_and_missing_entries():
    a = [[0.0, 0.1, None], [0.2, 0.5, 0.25], [0.1, 0.2, 0.3]]
    kept = retention(a)
    assert kept[1] is None  # the only earlier task has a[0][0] == 0
    assert kept[2] == pytest.approx(0.25 / 0.5)  # a[0][2] missing and a[0][0] == 0
    assert forgetting(a, [0.5, None, 0.3]) == [None, pytest.approx(0.2), None]


def test_forward_transfer_against_baseline():
    # a[1][0] - b1 = 0.30 - 0.10, a[2][1] - b2 = 0.25 - 0.20.
    assert forward_transfer(A, [0.5, 0.10, 0.20]) == pytest.approx((0.20 + 0.05) / 2)
    with pytest.raises(ValueError, match="baseline"):
        forward_transfer(A, [0.1])


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="3x3"):
        average_performance([[0.1, 0.2, 0.3], [0.1, 0.2], [0.1, 0.2, 0.3]])
    with pytest.raises(ValueError, match=r"matrix\[0\]\[1\]"):
        average_performance([[0.1, "x"], [0.1, 0.2]])
    with pytest.raises(ValueError, match=r"\(1, 1\)"):
        average_performance([[0.1, 0.2], [0.1, None]])


def test_cl_summary_is_json_ready_and_lenient():
    summary = cl_summary(A, ["sst2", "agnews", "yelp"], baseline=[0.3, 0.1, 0.2],
                         reference=[0.96, 0.90, 0.70])
    assert json.loads(json.dumps(summary)) == summary
    assert summary["average_performance"] == pytest.approx(0.45)
    assert summary["backward_transfer"] == pytest.approx(-0.425)
    assert summary["forgetting"]["per_stage"]["agnews"] == pytest.approx(0.625)
    assert summary["forgetting"]["reference"] == [0.96, 0.90, 0.70]
    assert summary["retention"]["per_stage"]["agnews"] == pytest.approx(0.75)
    assert summary["retention"]["final"] == pytest.approx(0.5)
    assert cl_summary(A, ["sst2", "agnews", "yelp"])["forgetting"] is None  # no A_i, no FG
    assert summary["diagonal_mean"] == pytest.approx((0.8 + 0.9 + 0.5) / 3)
    assert summary["forward_transfer"] == pytest.approx(0.125)
    # A per_task run evaluates only the diagonal: what needs more is None.
    diag = cl_summary([[0.8, None], [None, 0.9]], ["a", "b"])
    assert diag["average_performance"] is None and diag["backward_transfer"] is None
    assert diag["diagonal_mean"] == pytest.approx(0.85)
    with pytest.raises(ValueError, match="task_names"):
        cl_summary(A, ["a", "a", "b"])


def test_average_forgetting_by_hand():
    # F_1 = 0.80 - 0.60; F_2 = mean(max(0.80, 0.60) - 0.40, 0.90 - 0.45).
    assert average_forgetting(A) == pytest.approx([None, 0.20, 0.425])
    # A task that improved later counts its best earlier score, never a negative gap
    # from its first one: max(0.2, 0.7) - 0.6 = 0.1.
    b = [[0.2, 0.7, 0.6], [0.0, 0.5, 0.5], [0.0, 0.0, 0.9]]
    assert average_forgetting(b) == pytest.approx([None, -0.5, 0.05])
    summary = cl_summary(A, ["a", "b", "c"])
    assert summary["average_forgetting"]["final"] == pytest.approx(0.425)
    assert "not FG" in summary["retention"]["note"]
    assert "lower is better" in summary["average_forgetting"]["note"]
