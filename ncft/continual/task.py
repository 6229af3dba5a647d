"""A task as the loop sees it, the check that its prompts fit, and its training batches.

The launcher builds `TaskData` from the spec (`launcher.run.task_data`); the loop and
NeFT's probe (`ncft.selection.pipeline`) read a stage's batches through `stage_steps`,
so both see the very same data order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ncft.data.examples import batches as share_batches
from ncft.data.examples import collate, encode, pad_id, required_length
from ncft.engine import Engine

__all__ = ["TaskData", "check_room", "stage_steps"]


@dataclass(frozen=True)
class TaskData:
    """One task: examples and how to score it (built by the launcher from the spec)."""

    name: str
    format: str
    labels: list[str] | None
    train: list[Any]
    test: list[Any]
    max_length: int
    # The template filled with `ncft.evaluate.CONTENT_FREE` (`eval.calibration`).
    content_free: tuple[str, ...] = ()


def check_room(tasks: Sequence[TaskData], tokenizer: Any) -> None:
    """Refuse a task whose `max_length` would cut its fixed parts, before anything runs.

    The fixed parts are the template around the input text and the answer: the
    longest label for classification (rank scoring puts every label after every
    prompt), each example's own target for generation (`required_length`).

    Raises:
        ValueError: Naming the task and the `max_length` it needs.
    """
    for task in tasks:
        answers = task.labels if task.format == "classification" else None
        need = required_length([*task.train, *task.test], tokenizer, answers)
        if need > task.max_length:
            raise ValueError(
                f"tasks[{task.name}].max_length: {task.max_length} tokens cannot hold the "
                f"task's fixed parts (instruction, options, answer cue and answer), which "
                f"need {need}; set max_length >= {need}")


def stage_steps(
    tokenizer: Any, engine: Engine, task: TaskData, stage: int, seed: int,
    micro_batch_size: int, grad_accum: int,
) -> Iterator[list[dict]]:
    """Endless micro-batch lists of `task`'s training data for this rank, stage `stage`.

    The training loop and NeFT's probe (`ncft.selection.pipeline`) both read this, so
    the probe fine-tunes on the very batches the stage trains on.
    """
    encoded = encode(task.train, tokenizer, task.max_length)
    # The order depends on seed and stage only, so a resumed stage repeats itself.
    gen = torch.Generator().manual_seed(seed * 1000 + stage)
    pad = pad_id(tokenizer)
    micro = []
    while True:  # epochs until the caller stops taking steps
        order = torch.randperm(len(encoded), generator=gen).tolist()
        shuffled = [encoded[i] for i in order]
        for share in share_batches(shuffled, micro_batch_size, engine.rank, engine.world_size,
                                   "repeat"):
            micro.append(collate(share, pad))
            if len(micro) == grad_accum:
                yield micro
                micro = []
