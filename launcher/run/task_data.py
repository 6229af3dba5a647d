"""A spec task -> prompt/answer examples.

Local JSONL (the data root's cl_benchmark and translation sets, or `json` sources) is
read line by line; hub datasets (`hf` sources) go through `datasets.load_dataset`.
The local files need no `datasets` import: it costs seconds per rank, and a GPU image
that lacks the package (the gpu-check found one) still runs every shipped spec. Sizes
are upper bounds: the first `train_size` / `eval_size` rows are used (the shipped
files are already shuffled).
"""

from __future__ import annotations

import sys
from pathlib import Path

from launcher.spec.tasks import TaskSpec, data_files
from ncft.continual.loop import TaskData
from ncft.data.examples import (
    Example,
    classification_examples,
    generation_examples,
    read_jsonl,
)
from ncft.evaluate import CONTENT_FREE


def _load_split(task: TaskSpec, data_root: Path | None, split: str, limit: int) -> list[dict]:
    source = task.source
    if source.type == "hf":
        import datasets

        name = source.train_split if split == "train" else source.test_split
        ds = datasets.load_dataset(source.path, source.name, split=name)
        return ds.select(range(min(limit, len(ds)))).to_list()
    return read_jsonl(data_files(task, data_root)[split], limit)


def _examples(task: TaskSpec, rows: list[dict]) -> list[Example]:
    source = task.source
    if task.format == "generation":
        if source.type == "translation":
            return generation_examples(rows, task.prompt, "source", "target")
        return generation_examples(rows, task.prompt, source.text_field, source.label_field)
    text_field = getattr(source, "text_field", "text")
    label_field = getattr(source, "label_field", "label")
    return classification_examples(rows, task.labels, task.prompt, text_field, label_field)


def _heldout(task: TaskSpec, data_root: Path | None) -> tuple[list[Example], list[Example]]:
    """`eval_split: heldout`: train on the first rows, evaluate on the last ones.

    Raises:
        ValueError: If the split has fewer than `train_size + eval_size` rows, so the
            two would overlap (naming the fields to shrink).
    """
    rows = _load_split(task, data_root, "train", sys.maxsize)
    if len(rows) < task.train_size + task.eval_size:
        raise ValueError(
            f"tasks[{task.name}].eval_split: heldout needs train_size + eval_size <= the "
            f"{len(rows)} training rows, got {task.train_size} + {task.eval_size}; shrink "
            "train_size or eval_size")
    return (_examples(task, rows[: task.train_size]),
            _examples(task, rows[len(rows) - task.eval_size :]))


def load_task(task: TaskSpec, data_root: Path | None) -> TaskData:
    """Read a task's train and test examples.

    Raises:
        ValueError: If a row lacks a field or has a label outside the label set.
    """
    if task.eval_split == "heldout":
        train, test = _heldout(task, data_root)
    else:
        train = _examples(task, _load_split(task, data_root, "train", task.train_size))
        test = _examples(task, _load_split(task, data_root, "test", task.eval_size))
    if not train or not test:
        raise ValueError(f"tasks[{task.name}]: empty train or test split")
    content_free = (tuple(task.render(text) for text in CONTENT_FREE)
                    if task.format == "classification" else ())
    return TaskData(
        name=task.name, format=task.format, labels=task.labels, train=train, test=test,
        max_length=task.max_length, content_free=content_free,
    )
