import json

import pytest
import torch

from ncft.analysis.neft_stats import weight_movement_rank_shift
from ncft.analysis.neft_utilization import utilization_shift
from ncft.analysis.report import write_report
from ncft.neuron_set import NeuronSet, Selection

PNG = b"\x89PNG\r\n\x1a\n"
TASKS = ["sst2", "rte", "qqp"]


def _down(layer):
    return f"model.layers.{layer}.mlp.down_proj.weight"


def _save_set(run, name, spec):
    s = NeuronSet(
        {_down(k): Selection(1, torch.tensor(v, dtype=torch.int64)) for k, v in spec.items()},
        {"task": name, "scorer": "grad_attribution", "fraction": 0.1},
    )
    s.save(run / "neurons" / f"{name}.safetensors")


def _results():
    before = {"l0": torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])}
    return {
        "tasks": TASKS,
        "matrix": [[0.9, 0.8, 0.7], [0.2, 0.85, 0.6], [0.1, 0.3, 0.95]],
        "summary": {"cl": 0.75, "method": "ncft", "per_task": {"sst2": 0.7}},
        "deactivation": {
            "tasks": TASKS,
            "baseline": [0.8, 0.5, 1.0],
            "task_neurons_off": [[0.4, 0.45, 0.9], [0.8, 0.25, 1.0], [0.72, 0.5, 0.1]],
            "random_off": [[0.76, 0.475, 0.95]] * 3,
            "mode": "weights",
            "task_metric": {  # each task's own measure: sst2's own units halve it
                "tasks": TASKS, "baseline": [0.6, 0.5, 1.0],
                "task_neurons_off": [[0.3, 0.5, 1.0], [0.6, 0.5, 1.0], [0.6, 0.5, 1.0]],
                "random_off": [[0.6, 0.5, 1.0]] * 3,
            },
            "finetune_matrix": {
                "tasks": TASKS, "steps": 5, "baseline": [0.5, 0.25, 0.5],
                "task_neurons_trained": [[0.75, 0.25, 0.5], [0.5, 0.5, 0.5], [0.5, 0.0, 1.0]],
                "random_trained": [[0.5, 0.25, 0.5]] * 3,
                "task_metric": {
                    "tasks": TASKS, "baseline": [0.4, 0.2, 0.5],
                    "task_neurons_trained": [[0.6, 0.2, 0.5], [0.4, 0.2, 0.5],
                                             [0.4, 0.2, 0.5]],
                    "random_trained": [[0.4, 0.2, 0.5]] * 3,
                },
            },
        },
        "similarity": {
            "protocol": "paper", "tasks": TASKS, "layers": [0, 1], "steps": 5, "method": "mean",
            "per_layer": [
                [[1.0, 1.0], [0.2, 0.4], [0.1, 0.5]],
                [[0.6, 0.2], [1.0, 1.0], [0.5, 0.7]],
                [[0.0, 0.2], [0.9, 0.7], [1.0, 1.0]],
            ],
            "mean": [[1.0, 0.3, 0.3], [0.4, 1.0, 0.6], [0.1, 0.8, 1.0]],
            "performance": [[0.9, 0.4, 0.5], [0.5, 0.9, 0.6], [0.2, 0.7, 0.9]],
        },
        "similarity_final_model": {
            "tasks": TASKS,
            "layers": [0, 1],
            "method": "mean",
            "per_layer": [
                [[1.0, 1.0], [0.2, 0.4], [0.1, None]],
                [[0.2, 0.4], [1.0, 1.0], [0.5, 0.7]],
                [[0.1, None], [0.5, 0.7], [1.0, 1.0]],
            ],
            "mean": [[1.0, 0.3, 0.1], [0.3, 1.0, 0.6], [0.1, 0.6, 1.0]],
            "generalization": [[None, 0.5, 0.2], [0.55, None, 0.8], [0.25, 0.7, None]],
        },
        "weight_movement_rank_shift": weight_movement_rank_shift(
            before, {"l0": before["l0"].flip(0)}, {"l0": [4]}, 0.5),
        "neft": utilization_shift(before, {"l0": before["l0"].flip(0)}, {"l0": [4]}, 0.5),
    }


@pytest.fixture
def run(tmp_path):
    run = tmp_path / "run"
    (run / "neurons").mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(_results()))
    _save_set(run, "sst2", {0: [0, 1, 2, 3], 1: [0, 1]})
    _save_set(run, "rte", {0: [2, 3, 4, 5], 1: [0, 1]})
    _save_set(run, "qqp", {1: [7]})
    return run


def test_full_report(run):
    path = write_report(run)
    assert path == run / "report.md"
    md = path.read_text()
    for name in ("accuracy_matrix", "forgetting", "deactivation", "iou", "similarity_layers",
                 "similarity_correlation", "weight_movement_rank_shift", "neft_utilization",
                 "finetune_matrix", "similarity_paper_layers", "similarity_paper_correlation"):
        png = run / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == PNG, name
        assert f"(plots/{name}.png)" in md
    for name in ("continual", "deactivation", "overlap", "similarity", "neft",
                 "weight_movement_rank_shift", "finetune_matrix", "similarity_final_model"):
        json.loads((run / "analysis" / f"{name}.json").read_text())
    assert "Skipped" not in md
    # AP, BWT, FG_1, FG_2 of the score matrix
    for number in ("0.750", "-0.225", "0.889", "0.742"):
        assert number in md
    assert "| sst2 | 0.900 | 0.800 | 0.700 |" in md  # first matrix row, training order
    assert "| own task (diagonal) | 0.633 | 0.050 |" in md
    assert "| other tasks (off-diagonal) | 0.050 | 0.050 |" in md
    assert "weights zeroed: gate/up rows and biases, down column" in md
    # fine-tuning matrix: change vs zero-shot; diagonal (0.25 + 0.25 + 0.5) / 3
    assert "| sst2 | 0.250 | 0.000 | 0.000 |" in md
    assert "| own task (diagonal) | 0.333 | 0.000 |" in md
    # paper similarity vs M_i's score over i != j: x = [.3,.3,.4,.6,.1,.8],
    # y = [.4,.5,.5,.6,.2,.7]; by hand Sxy = 0.201667, Sxx = 0.308333, Syy = 0.148333,
    # r = Sxy / sqrt(Sxx Syy) = 0.94298
    paper = json.loads((run / "analysis" / "similarity.json").read_text())
    assert paper["correlation"]["pearson"]["r"] == pytest.approx(0.94298, abs=1e-4)
    assert paper["correlation"]["n"] == 6 and len(paper["per_layer_pearson"]) == 2
    # the matrices by each task's own measure, beside teacher-forced accuracy
    own = json.loads((run / "analysis" / "deactivation_task_metric.json").read_text())
    assert own["drop"][0] == pytest.approx([0.5, 0.0, 0.0])
    assert "Scored by each task's own evaluation measure" in md
    assert "| sst2 | 0.500 | 0.000 | 0.000 |" in md
    ft_own = json.loads((run / "analysis" / "finetune_matrix_task_metric.json").read_text())
    assert ft_own["change"][0] == pytest.approx([0.2, 0.0, 0.0])
    # Table 4's per-test-task r: 3 tasks leave 2 models per test task, too few for r.
    assert [c["n"] for c in paper["correlation_per_task"]] == [2, 2, 2]
    assert "| test task T_j (Table 4) |" in md and "| sst2 | n/a | n/a | 2 |" in md
    # IoU sst2/rte = 4/8; rows follow results.tasks, not file names
    assert "| sst2 | 1.000 | 0.500 | 0.000 |" in md
    assert "| cl | 0.750 |" in md and "| method | ncft |" in md
    assert "| spearman |" in md and "| gained_trained | 1 | 0 |" in md
    # 5 neurons reversed: dRank = 4, 2, 0, -2, -4; threshold 0.5 x 5 = 2.5
    assert "Avg(|ΔRank|) 2.4" in md and "| strongly_affected | 2 |" in md
    assert "| suppressed | 1 |" in md and "| indirectly_affected | 1 |" in md
    overlap = json.loads((run / "analysis" / "overlap.json").read_text())
    assert overlap["tasks"] == TASKS


def test_missing_inputs_are_skipped_with_notes(tmp_path):
    md = write_report(tmp_path).read_text()
    assert md.count("_Skipped:") == 6
    assert "no results.json" in md and "no NeuronSets" in md
    assert not (tmp_path / "plots").exists()


def test_malformed_section_does_not_cost_the_rest(run):
    res = _results()
    res["deactivation"]["baseline"] = [1.0]
    del res["similarity"], res["similarity_final_model"]
    (run / "results.json").write_text(json.dumps(res))
    with pytest.warns(UserWarning, match="deactivation.baseline"):
        md = write_report(run).read_text()
    assert "_Skipped: error: deactivation.baseline must be a list of 3 entries._" in md
    assert "_Skipped: results.json has no `similarity` or `similarity_final_model`._" in md
    assert (run / "plots" / "accuracy_matrix.png").exists()
    assert (run / "plots" / "iou.png").exists()


def test_not_a_directory(tmp_path):
    with pytest.raises(ValueError, match="run_dir"):
        write_report(tmp_path / "nope")


def test_neft_per_task(run):
    results = json.loads((run / "results.json").read_text())
    for key in ("neft", "weight_movement_rank_shift"):
        results[key] = {"sst2": results[key], "rte": results[key]}
    (run / "results.json").write_text(json.dumps(results))
    md = write_report(run).read_text()
    for task in ("sst2", "rte"):
        for fig in ("weight_movement_rank_shift", "neft_utilization"):
            assert (run / "plots" / f"{fig}_{task}.png").read_bytes()[:8] == PNG
        assert f"Task `{task}`: 1 of" in md and f"Task `{task}`: 5 neurons, 1 trained" in md
    assert md.count("| gained_trained | 1 | 0 |") == 2
    results["weight_movement_rank_shift"]["rte"] = {"counts": {}}
    results["neft"]["rte"] = {"counts": {}}
    (run / "results.json").write_text(json.dumps(results))
    with pytest.warns(UserWarning):
        md = write_report(run).read_text()
    assert "results.weight_movement_rank_shift.rte is missing `hist`" in md
    assert "results.neft.rte is missing `buckets`" in md


def test_calibrated_run_reports_raw_and_calibrated_tables_apart(tmp_path):
    run = tmp_path / "cal"
    run.mkdir()
    results = {"tasks": ["a", "b"], "matrix": [[0.8, 0.6], [None, 0.9]],
               "raw_matrix": [[0.7, 0.35], [None, 0.85]],
               "in_label_set": [[1.0, 0.5], [None, 1.0]],
               "protocol": {"classification": "rank", "calibration": "content_free"},
               "summary": {"forgetting": {"reference": [0.75, 0.9]}},
               "raw_summary": {"forgetting": {"reference": [0.7, 0.8]}}}
    (run / "results.json").write_text(json.dumps(results))
    text = write_report(run).read_text()
    calibrated, raw = text.split("### Uncalibrated (raw) read-out")
    assert "### Calibrated read-out" in calibrated
    # FG (eq. 5) per read-out, each against its own reference: 0.6 / 0.75 and 0.35 / 0.7.
    assert "| FG after b (stage 1; eq. 5" in calibrated and "| 0.800 |" in calibrated
    assert "| 0.500 |" in raw.split("Share of answers")[0]
    assert "0.35" in raw and "0.35" not in calibrated.split("### Calibrated")[1]
    assert "Share of answers inside the task's own label set" in raw
