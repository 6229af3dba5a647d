from benchmarks.forgetting_diagnosis import calibrated


def test_calibration_subtracts_the_content_free_shift_by_hand():
    labels = ["Good", "Bad"]
    gold = ["Good", "Bad", "Bad", "Bad"]
    # s = log p(Good) - log p(Bad): uncalibrated, sign(s) gets 2 of 4 right.
    # Stored margins are gold minus other, so s = margin * (+1 if gold is Good else -1).
    details = [None, {"margins": [2.0, -1.5, 1.0, -1.0]}]
    rows = [None, {"stage": 1}]
    calibrated(rows, details, {1: 1.6}, gold, labels)
    # s - 1.6 = [0.4, -0.1, -2.6, -0.6]: Good, Bad, Bad, Bad, all right.
    assert rows[1]["content_free_s"] == 1.6 and rows[1]["accuracy_calibrated"] == 1.0
    rows = [{"stage": 0}]
    calibrated(rows, details[1:], {0: -3.0}, gold, labels)  # a prior toward Bad: all Good
    assert rows[0]["accuracy_calibrated"] == 0.25
