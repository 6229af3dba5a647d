"""Spec task -> examples: the held-out evaluation split, content-free prompts."""

import pytest

from launcher.run.task_data import load_task
from launcher.spec.schema import validate_spec
from launcher.spec.tasks import data_files
from ncft.data.examples import read_jsonl
from ncft.evaluate import CONTENT_FREE


def _task(tmp_path, **fields):
    spec = validate_spec({"tasks": [{"source": {"type": "cl_benchmark", "name": "sst2"},
                                     **fields},
                                    {"source": {"type": "cl_benchmark", "name": "agnews"}}],
                          "method": "ncft", "output": {"dir": str(tmp_path / "run")}}, tmp_path)
    return spec.tasks[0], spec.data_root


def test_heldout_evaluates_on_the_last_training_rows_never_trained_on(tmp_path):
    task, root = _task(tmp_path, train_size=30, eval_size=20, eval_split="heldout")
    data = load_task(task, root)
    rows = read_jsonl(data_files(task, root)["train"], 10**9)
    assert [ex.prompt for ex in data.train] == [task.render(r["text"]) for r in rows[:30]]
    assert [ex.prompt for ex in data.test] == [task.render(r["text"]) for r in rows[-20:]]
    test_task, _ = _task(tmp_path, train_size=30, eval_size=20)
    assert load_task(test_task, root).test != data.test  # the default is the test split


def test_heldout_refuses_overlap_naming_the_fields(tmp_path):
    task, root = _task(tmp_path, train_size=1000, eval_size=1, eval_split="heldout")
    with pytest.raises(ValueError, match=r"tasks\[sst2\].eval_split: heldout needs "
                       r"train_size \+ eval_size <= the 1000 training rows"):
        load_task(task, root)


def test_classification_tasks_carry_their_content_free_prompts(tmp_path):
    task, root = _task(tmp_path, train_size=4, eval_size=2)
    data = load_task(task, root)
    assert data.content_free == tuple(task.render(text) for text in CONTENT_FREE)
    assert "N/A" in data.content_free[0] and task.labels[0] in data.content_free[0]
