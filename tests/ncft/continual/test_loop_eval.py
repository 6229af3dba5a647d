"""What the loop evaluates after each stage (`eval.tasks`), and how (`eval.calibration`)."""

import pytest

import ncft.continual.loop as loop_module
from ncft.continual.config import (
    EvalConfig,
    LoopConfig,
    LoraOptions,
    OloraConfig,
    TrainConfig,
    WncftConfig,
)
from ncft.continual.loop import ContinualLoop, TaskData

TASKS = [TaskData(n, "classification", ["a", "b"], [], [], 16) for n in "wxyz"]


def _loop(eval_tasks: str = "all", calibration: str = "none") -> ContinualLoop:
    cfg = LoopConfig(
        method="ncft",
        training=TrainConfig(lr=1e-3, steps=1, epochs=None, micro_batch_size=1, grad_accum=1,
                             seed=0, warmup_steps=0, update="masked", on_nonfinite="stop",
                             max_skipped_steps=None),
        eval=EvalConfig(batch_size=1, max_examples=None, max_new_tokens=1,
                        classification="rank", calibration=calibration, metrics=("bleu",),
                        tasks=eval_tasks),
        wncft=WncftConfig(num_samples=1, temperature=1.0, query="task"),
        olora=OloraConfig(lambda_orth=0.5, lambda_l2=0.0),
        lora=LoraOptions(r=2, alpha=4, dropout=0.0, target_modules=("q_proj",)),
        log_every=1, loss_scaler=False,
    )
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
