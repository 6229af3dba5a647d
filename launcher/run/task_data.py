"""A spec task -> prompt/answer examples.

Local JSONL (the data root's cl_benchmark and translation sets, or `json` sources) is
read line by line; hub datasets (`hf` sources) go through `datasets.load_dataset`.
Every row is checked before an example is built from it (`check_split`), and an error
names the task, the split, the file, the physical line and the field; the preflight
runs this before any rank starts.
The local files need no `datasets` import: it costs seconds per rank, and a GPU image
that lacks the package (the gpu-check found one) still runs every shipped spec. Sizes
are upper bounds: the first `train_size` / `eval_size` rows are used (the shipped
files are already shuffled).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

from launcher.errors import UserError
from launcher.spec.tasks import TaskSpec, data_files
from ncft.continual.task import TaskData
from ncft.data.examples import (
    Example,
    classification_examples,
    generation_examples,
    read_jsonl_lines,
)
from ncft.evaluate import CONTENT_FREE


@dataclass(frozen=True)
class Split:
    """Rows of one split and where each came from, so an error can point at its line.

    Attributes:
        task: The task's name.
        split: "train" or "test" (the split the rows were read from).
        where: The file (local JSONL) or the hub dataset and split (hf).
        rows: The rows, in order.
        lines: Each row's physical line in the file (1-based, blank lines counted),
            or its 1-based row number in a hub dataset.
    """

    task: str
    split: str
    where: str
    rows: list[dict]
    lines: list[int]
    is_file: bool = True

    def at(self, i: int) -> str:
        """Where row `i` is: "FILE line N" (or "DATASET row N")."""
        return f"{self.where} {'line' if self.is_file else 'row'} {self.lines[i]}"

    def error(self, text: str) -> ValueError:
        """A `ValueError` naming the task and split first (`UserError` for the CLI)."""
        return UserError(f"tasks[{self.task}] {self.split} split: {text}")

    def sliced(self, part: slice) -> Split:
        """The rows `part` of this split (with their lines)."""
        return replace(self, rows=self.rows[part], lines=self.lines[part])


def _load_split(task: TaskSpec, data_root: Path | None, split: str, limit: int) -> Split:
    source = task.source
    if source.type == "hf":
        import datasets

        name = source.train_split if split == "train" else source.test_split
        ds = datasets.load_dataset(source.path, source.name, split=name)
        rows = ds.select(range(min(limit, len(ds)))).to_list()
        return Split(task.name, split, f"hf dataset {source.path} split {name}", rows,
                     list(range(1, len(rows) + 1)), is_file=False)
    path = data_files(task, data_root)[split]
    try:
        rows, lines = read_jsonl_lines(path, limit)
    except ValueError as err:
        raise UserError(f"tasks[{task.name}] {split} split: {err}") from None
    return Split(task.name, split, str(path), rows, lines)


def _fields(task: TaskSpec) -> tuple[str, str]:
    """(input field, answer field) of the task's rows."""
    source = task.source
    if source.type == "translation":
        return "source", "target"
    return getattr(source, "text_field", "text"), getattr(source, "label_field", "label")


def check_split(task: TaskSpec, split: Split) -> None:
    """Check every row of a split before any example is built from it.

    Raises:
        UserError: Naming task, split, file, physical line and field: a row without
            a field, an answer that is not a string or number, a label outside the
            task's labels, or an empty split.
    """
    if not split.rows:
        raise split.error(f"{split.where} has no rows (only blank lines, or no lines); "
                          "fill it or point the task at another file")
    text_field, answer_field = _fields(task)
    known = set(task.labels or ())
    for i, row in enumerate(split.rows):
        for name in (text_field, answer_field):
            if name not in row:
                raise split.error(f"{split.at(i)}: no field {name!r} (fields: {sorted(row)})")
            if not isinstance(row[name], (str, int, float)) or isinstance(row[name], bool):
                raise split.error(f"{split.at(i)}: field {name!r} is "
                                  f"{type(row[name]).__name__}, not text")
        label = str(row[answer_field])
        if task.format == "classification" and label not in known:
            raise split.error(f"{split.at(i)}: field {answer_field!r} is {label!r}, not one of "
                              f"the task's labels {task.labels}; fix the line or tasks[].labels")


def _examples(task: TaskSpec, split: Split) -> list[Example]:
    check_split(task, split)
    text_field, answer_field = _fields(task)
    if task.format == "generation":
        return generation_examples(split.rows, task.prompt, text_field, answer_field)
    return classification_examples(split.rows, task.labels, task.prompt, text_field,
                                   answer_field)


def _heldout(task: TaskSpec, data_root: Path | None) -> tuple[list[Example], list[Example]]:
    """`eval_split: heldout`: train on the first rows, evaluate on the last ones.

    Raises:
        ValueError: If the split has fewer than `train_size + eval_size` rows, so the
            two would overlap (naming the fields to shrink).
    """
    split = _load_split(task, data_root, "train", sys.maxsize)
    if len(split.rows) < task.train_size + task.eval_size:
        raise UserError(
            f"tasks[{task.name}].eval_split: heldout needs train_size + eval_size <= the "
            f"{len(split.rows)} training rows of {split.where}, got {task.train_size} + "
            f"{task.eval_size}; shrink train_size or eval_size")
    test = replace(split.sliced(slice(len(split.rows) - task.eval_size, None)),
                   split="train (held out)")
    return _examples(task, split.sliced(slice(task.train_size))), _examples(task, test)


def load_task(task: TaskSpec, data_root: Path | None) -> TaskData:
    """Read a task's train and test examples (`launcher.run.preflight` calls it first).

    Raises:
        UserError: If a split is empty or a row is bad (`check_split`), naming the
            task, split, file, physical line and field.
    """
    if task.eval_split == "heldout":
        train, test = _heldout(task, data_root)
    else:
        train = _examples(task, _load_split(task, data_root, "train", task.train_size))
        test = _examples(task, _load_split(task, data_root, "test", task.eval_size))
    content_free = (tuple(task.render(text) for text in CONTENT_FREE)
                    if task.format == "classification" else ())
    return TaskData(
        name=task.name, format=task.format, labels=task.labels, train=train, test=test,
        max_length=task.max_length, content_free=content_free,
    )
