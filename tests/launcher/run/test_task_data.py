"""Spec task -> examples: the held-out evaluation split."""

import pytest

from launcher.run.task_data import load_task, read_jsonl
from launcher.spec.schema import validate_spec
from launcher.spec.tasks import data_files


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
