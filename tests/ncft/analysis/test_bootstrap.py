"""Bootstrap intervals over evaluation examples, paired comparisons, prediction counts."""

import json

import numpy as np
import pytest
import yaml

from ncft.analysis.bootstrap import (
    OTHER,
    bleu_replicates,
    cell_replicates,
    compare_runs,
    interval,
    outcomes,
    prediction_counts,
    run_table,
    seed_interval,
    table_markdown,
)
from ncft.continual.metrics import average_performance, backward_transfer


def _results(correct: dict[tuple[int, int], list[int]], tasks=("a", "b"), method="ncft",
             predictions=None) -> dict:
    n = len(tasks)
    matrix = [[None] * n for _ in range(n)]
    details = {t: [None] * n for t in tasks}
    for (i, j), values in correct.items():
        matrix[i][j] = sum(values) / len(values)
        details[tasks[i]][j] = {"correct": values, "accuracy": matrix[i][j],
                                "predictions": (predictions or {}).get((i, j), [])}
    return {"tasks": list(tasks), "method": method, "matrix": matrix, "details": details}


def _write(tmp_path, name, results, lr=1e-3):
    run = tmp_path / name
    run.mkdir()
    (run / "results.json").write_text(json.dumps(results))
    (run / "spec.resolved.yaml").write_text(yaml.safe_dump(
        {"training": {"lr": lr}, "tasks": [{"name": "a", "labels": ["Good", "Bad"]},
                                            {"name": "b", "labels": ["x", "y"]}]}))
    return run


def test_point_estimates_and_intervals_cover_them(tmp_path):
    rng = np.random.default_rng(1)
    cells = {(0, 0): rng.integers(0, 2, 200).tolist(), (0, 1): rng.integers(0, 2, 200).tolist(),
             (1, 1): rng.integers(0, 2, 200).tolist()}
    results = _results(cells)
    row = run_table(_write(tmp_path, "r", results), samples=400)
    assert row["point"]["average_performance"] == pytest.approx(
        average_performance(results["matrix"]))
    assert row["point"]["backward_transfer"] == pytest.approx(
        backward_transfer(results["matrix"]))
    assert row["point"]["diagonal_mean"] == pytest.approx(
        (results["matrix"][0][0] + results["matrix"][1][1]) / 2)
    for metric in ("average_performance", "backward_transfer", "average_forgetting",
                   "diagonal_mean"):
        lo, hi = row["ci95"][metric]
        assert lo < row["point"][metric] < hi
    # 200 Bernoulli(0.5) examples per task: AP averages two tasks, so its 95% interval
    # is about 2 * 1.96 * sqrt(0.25 / 200) / sqrt(2) = 0.098 wide.
    lo, hi = row["ci95"]["average_performance"]
    assert 0.07 < hi - lo < 0.13
    assert row["eval_examples"] == {"a": 200, "b": 200} and row["lr"] == 1e-3


def test_resample_is_paired_across_stages_of_a_task():
    same = np.arange(50) % 2
    reps = cell_replicates({(0, 0): same.astype(float), (0, 1): same.astype(float)}, 100, 0)
    assert np.array_equal(reps[(0, 0)], reps[(0, 1)])  # one index draw per task


def test_paired_difference_is_tighter_than_two_separate_intervals(tmp_path):
    rng = np.random.default_rng(2)
    base = rng.integers(0, 2, 300)
    better = base.copy()
    better[np.flatnonzero(base == 0)[:15]] = 1  # 15 more right answers, same examples
    a = _write(tmp_path, "a", _results({(0, 0): base.tolist(), (0, 1): base.tolist(),
                                        (1, 1): base.tolist()}))
    b = _write(tmp_path, "b", _results({(0, 0): base.tolist(), (0, 1): better.tolist(),
                                        (1, 1): base.tolist()}, method="seqft"))
    rows = [run_table(a, samples=300), run_table(b, samples=300)]
    diff = compare_runs(rows)[1]["average_performance"]
    assert diff["delta"] == pytest.approx(15 / 300 / 2)
    lo, hi = diff["ci95"]
    assert 0 < lo < diff["delta"] < hi  # the gain is clearly positive when paired
    separate = rows[0]["ci95"]["average_performance"]
    assert hi - lo < (separate[1] - separate[0]) / 2
    text = table_markdown(rows)
    assert "| seqft |" in text and "ΔAP vs ncft" in text


def test_outcomes_refuse_different_example_sets_per_task():
    results = _results({(0, 0): [1, 0, 1], (0, 1): [1, 0]})
    with pytest.raises(ValueError, match="task a: evaluated on \\[2, 3\\] examples"):
        outcomes(results)


def test_prediction_counts_map_normalised_labels_and_count_the_rest(tmp_path):
    results = _results({(0, 0): [1, 1, 0, 0, 0]}, predictions={
        (0, 0): ["good", "Good.", "bad", "a very good film", "Y"]})
    counts = prediction_counts(results, {"a": ["Good", "Bad"], "b": ["x", "y"]})
    assert counts["a"][0] == {"Good": 2, "Bad": 1, OTHER: 1, "b: y": 1}
    assert counts["a"][1] is None and counts["b"] == [None, None]


def test_bleu_replicates_cover_the_corpus_score_and_pair_across_systems():
    import sacrebleu

    refs = [f"el hombre {w} la casa grande {k}" for k, w in enumerate(
        ["ve", "tiene", "abre", "cierra", "pinta", "vende"] * 5)]
    good = [r if k % 3 else r.replace("grande", "pequeña") for k, r in enumerate(refs)]
    bad = [r.replace("casa", "puerta") for r in good]
    point = sacrebleu.corpus_bleu(good, [refs]).score / 100
    reps = bleu_replicates(good, refs, 200, 0)
    lo, hi = interval(reps)
    assert lo <= point <= hi and hi - lo > 0
    diff = interval(reps - bleu_replicates(bad, refs, 200, 0))
    assert diff[0] > 0  # the same sentences resampled: the better system wins every time
    with pytest.raises(ValueError, match="as many hypotheses"):
        bleu_replicates(good[:2], refs, 10, 0)


def _one_task(correct: list[int], seed: int = 0) -> dict:
    """A one-task run whose only cell is these outcomes (AP = their mean)."""
    return {"tasks": ["t"], "method": "m", "matrix": [[sum(correct) / len(correct)]],
            "details": {"t": [{"correct": correct}]}, "seed": seed}


def test_seed_bootstrap_resamples_seeds_by_hand():
    # Seed 0 gets every example right, seed 1 none: example resampling changes
    # nothing, and a draw of two seeds averages to 1 (both seed 0), 0.5 or 0 with
    # probabilities 1/4, 1/2, 1/4.
    runs = [_one_task([1] * 10), _one_task([0] * 10, seed=1)]
    out = seed_interval(runs, samples=4000, seed=3)
    assert out["per_seed"] == [1.0, 0.0] and out["mean"] == 0.5 and out["seeds"] == 2
    assert out["ci95"] == [0.0, 1.0]
    # An example-only interval of either seed would be a single point.
    assert seed_interval(runs[:1], samples=200)["ci95"] == [1.0, 1.0]


def test_paired_seed_difference_keeps_only_the_example_noise_by_hand():
    # Method B = method A with example 0 flipped to wrong, at both seeds: each seed's
    # difference is 0.1, and a replicate's difference is (draws of example 0) / 10,
    # Binomial(10, 0.1) / 10 whatever seeds are drawn: 2.5% -> 0, 97.5% -> 0.3
    # (P(>= 4 draws) = 0.013, P(>= 3 draws) = 0.070).
    a = [_one_task([1] * 10), _one_task([1] * 5 + [0] * 5, seed=1)]
    b = [_one_task([0] + [1] * 9), _one_task([0] + [1] * 4 + [0] * 5, seed=1)]
    diff = seed_interval(a, samples=4000, seed=0, against=b)
    assert diff["paired"] == pytest.approx([0.1, 0.1])
    assert diff["mean"] == pytest.approx(0.1)
    assert diff["ci95"] == pytest.approx([0.0, 0.3])
    # Unpaired, the seeds' own spread (1.0 vs 0.5) would make it far wider.
    assert seed_interval(a, samples=4000)["ci95"][1] - seed_interval(a, samples=4000)[
        "ci95"][0] > 0.4
    with pytest.raises(ValueError, match="as many runs on each side"):
        seed_interval(a, against=b[:1])
