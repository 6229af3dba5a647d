"""What the loop evaluates after each stage (`eval.tasks`), and how (`eval.calibration`)."""

import pytest

import ncft.continual.loop as loop_module
from ncft.continual.loop import ContinualLoop
from ncft.continual.task import TaskData
from tests.support.loop_config import loop_config

TASKS = [TaskData(n, "classification", ["a", "b"], [], [], 16) for n in "wxyz"]


def _loop(eval_tasks: str = "all", calibration: str = "none",
          zero_shot: bool = False) -> ContinualLoop:
    cfg = loop_config(eval={"tasks": eval_tasks, "calibration": calibration,
                            "zero_shot": zero_shot})
    return ContinualLoop(cfg, TASKS, backend=None)


@pytest.mark.parametrize(("mode", "expected"), [
    ("all", [[0, 1, 2, 3]] * 4),
    ("seen", [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3]]),
    ("current", [[0], [1], [2], [3]]),
])
def test_evaluated_tasks_per_stage(mode, expected):
    loop = _loop(mode)
    assert [list(loop._evaluated(stage)) for stage in range(4)] == expected


@pytest.mark.parametrize(("calibration", "expected"), [("none", ()),
                                                      ("content_free", ("w: N/A", "w: "))])
def test_content_free_prompts_reach_the_evaluation(monkeypatch, calibration, expected):
    seen = {}
    monkeypatch.setattr(loop_module, "evaluate_task",
                        lambda *a, **kw: seen.update(kw) or {"score": 0.0})
    loop = _loop(calibration=calibration)
    loop.backend = type("B", (), {"tokenizer": None})()
    task = TaskData("w", "classification", ["a", "b"], [], [], 16,
                    content_free=("w: N/A", "w: "))
    loop.evaluate_one(engine=None, task=task, examples=[])
    assert seen["calibration_prompts"] == expected


def test_summary_keeps_raw_and_calibrated_apart_with_zero_shot_and_label_share(monkeypatch):
    from ncft.continual.state import LoopState

    # Calibrated / raw accuracy of each evaluation, in call order: the zero-shot pass
    # (w, x), then after stage 0 (w, x) and after stage 1 (w, x).
    scores = iter([(0.1, 0.2), (0.3, 0.1), (0.8, 0.5), (0.4, 0.3), (0.6, 0.25), (0.9, 0.6)])
    answers = iter([["a", "b"]] * 4 + [["a", "Sports"], ["b", "b"]])  # one takeover

    def fake_eval(*args, **kwargs):
        cal, raw = next(scores)
        return {"score": cal, "accuracy": cal, "predictions": next(answers),
                "raw": {"accuracy": raw}}

    class Engine:
        def close(self):
            pass

    import torch

    backend = type("B", (), {"tokenizer": None,
                             "load_model": lambda self, s: torch.nn.Linear(1, 1),
                             "build_engine": lambda self, m: Engine(),
                             "log_line": lambda self, t: None,
                             "after_eval": lambda self, s, i: None})()
    monkeypatch.setattr(loop_module, "evaluate_task", fake_eval)
    loop = _loop(calibration="content_free", zero_shot=True)
    loop.tasks, loop.backend = TASKS[:2], backend
    state = LoopState(matrix=[[None] * 2 for _ in range(2)])
    state.zero_shot = loop._zero_shot()
    loop._evaluate(Engine(), 0, state)
    loop._evaluate(Engine(), 1, state)
    out = loop.summary(state, {"calibrated": [0.8, 0.9], "raw": [0.5, 0.6]})
    assert out["matrix"] == [[0.8, 0.6], [0.4, 0.9]]
    assert out["raw_matrix"] == [[0.5, 0.25], [0.3, 0.6]]
    assert out["zero_shot"] == [0.1, 0.3] and out["raw_zero_shot"] == [0.2, 0.1]
    # FG divides each read-out by the reference of the same read-out (eq. 5).
    assert out["summary"]["forgetting"]["final"] == pytest.approx(0.6 / 0.8)
    assert out["raw_summary"]["forgetting"]["final"] == pytest.approx(0.25 / 0.5)
    # Forward transfer: x after stage 0 minus x's zero-shot score, per read-out.
    assert out["summary"]["forward_transfer"] == pytest.approx(0.4 - 0.3)
    assert out["raw_summary"]["forward_transfer"] == pytest.approx(0.3 - 0.1)
    assert out["in_label_set"] == [[1.0, 0.5], [1.0, 1.0]]
    assert loop.summary(state)["summary"]["forgetting"] is None  # no reference, no FG
