from benchmarks.forgetting_diagnosis import calibrated


def test_calibration_subtracts_the_content_free_shift_by_hand():
    labels = ["Good", "Bad"]
    gold = ["Good", "Bad", "Bad", "Bad"]
    # s = log p(Good) - log p(Bad): uncalibrated, sign(s) gets 2 of 4 right.
    rows = [None, {"stage": 1, "_s": [2.0, 1.5, -1.0, 1.0]}]
    calibrated(rows, {1: 1.6}, gold, labels)
    # s - 1.6 = [0.4, -0.1, -2.6, -0.6]: Good, Bad, Bad, Bad, all right.
    assert rows[1]["content_free_s"] == 1.6 and rows[1]["accuracy_calibrated"] == 1.0
    rows = [{"stage": 0, "_s": [2.0, 1.5, -1.0, 1.0]}]
    calibrated(rows, {0: -3.0}, gold, labels)  # a prior toward Bad makes all say Good
    assert rows[0]["accuracy_calibrated"] == 0.25
