"""Which tasks the loop evaluates after each stage (`eval.tasks`)."""

import pytest

from ncft.continual.loop import ContinualLoop, LoopConfig, TaskData

TASKS = [TaskData(n, "classification", ["a", "b"], [], [], 16) for n in "wxyz"]


def _loop(eval_tasks: str) -> ContinualLoop:
    cfg = LoopConfig(method="ncft", steps_per_task=1, epochs=None, micro_batch_size=1,
                     grad_accum=1, seed=0, warmup_steps=0, lr=1e-3, eval_batch_size=1,
                     eval_max_examples=None, max_new_tokens=1, metrics=("bleu",),
                     wncft_samples=1, wncft_temperature=1.0, eval_tasks=eval_tasks)
    return ContinualLoop(cfg, TASKS, backend=None)


@pytest.mark.parametrize(("mode", "expected"), [
    ("all", [[0, 1, 2, 3]] * 4),
    ("seen", [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3]]),
    ("current", [[0], [1], [2], [3]]),
])
def test_evaluated_tasks_per_stage(mode, expected):
    loop = _loop(mode)
    assert [list(loop._evaluated(stage)) for stage in range(4)] == expected
