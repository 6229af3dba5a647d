"""A spec task -> prompt/answer examples, through `datasets` for every source.

Local JSONL (the data root's cl_benchmark and translation sets, or `json` sources)
and hub datasets (`hf` sources) go through the same `datasets.load_dataset` call,
so a user's hub id and the offline files are read by one loader. Sizes are upper
bounds: the first `train_size` / `eval_size` rows are used (the shipped files are
already shuffled).
"""

from __future__ import annotations

from pathlib import Path

from launcher.spec.tasks import TaskSpec, data_files
from ncft.continual.loop import TaskData
from ncft.data.examples import Example, classification_examples, generation_examples


def _load_split(task: TaskSpec, data_root: Path | None, split: str, limit: int) -> list[dict]:
    import datasets

    source = task.source
    if source.type == "hf":
        name = source.train_split if split == "train" else source.test_split
        ds = datasets.load_dataset(source.path, source.name, split=name)
    else:
        path = data_files(task, data_root)[split]
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
    return ds.select(range(min(limit, len(ds)))).to_list()


def _examples(task: TaskSpec, rows: list[dict]) -> list[Example]:
    source = task.source
    if task.format == "generation":
        if source.type == "translation":
            return generation_examples(rows, task.prompt, "source", "target")
        return generation_examples(rows, task.prompt, source.text_field, source.label_field)
    text_field = getattr(source, "text_field", "text")
    label_field = getattr(source, "label_field", "label")
    return classification_examples(rows, task.labels, task.prompt, text_field, label_field)


def load_task(task: TaskSpec, data_root: Path | None) -> TaskData:
    """Read a task's train and test examples.

    Raises:
        ValueError: If a row lacks a field or has a label outside the label set.
    """
    train = _examples(task, _load_split(task, data_root, "train", task.train_size))
    test = _examples(task, _load_split(task, data_root, "test", task.eval_size))
    if not train or not test:
        raise ValueError(f"tasks[{task.name}]: empty train or test split")
    return TaskData(
        name=task.name, format=task.format, labels=task.labels, train=train, test=test,
        max_length=task.max_length,
    )
