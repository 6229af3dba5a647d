"""What the loop needs from outside `ncft/`: the launcher's `Backend` and a `Selector`.

Both are protocols, so the loop never imports an engine library or the launcher
(docs/architecture.md); `launcher.run.backend.LauncherBackend` and
`ncft.selection.pipeline.SelectionPipeline` implement them.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import nn

from ncft.continual.task import TaskData
from ncft.engine import Engine
from ncft.neuron_set import NeuronSet
from ncft.train import StepLog

__all__ = ["Backend", "Selector"]


class Selector(Protocol):
    """Chooses a task's neurons (`ncft.selection.pipeline.SelectionPipeline`)."""

    def select(self, engine: Engine, model: nn.Module, task: TaskData, stage: int) -> NeuronSet:
        """Score on `engine` (over `model`, unwrapped) and return `task`'s NeuronSet."""
        ...


class Backend(Protocol):
    """Services the launcher provides."""

    tokenizer: Any

    def load_model(self, stage: int | None) -> nn.Module:
        """The model after stage `stage` (None: the base model), unwrapped.

        Its weights may be deferred (a meta-device model that `build_engine` fills,
        each rank reading only its shard): use it for structure, the engine for values.
        """

    def build_engine(self, model: nn.Module, keep_weights: bool = False) -> Engine:
        """Wrap a model whose frozen parameters are already marked.

        `keep_weights`: the next `load_model` of the same stage follows; the backend
        may keep this build's weights for it instead of reading them again.
        """

    def save_neurons(self, task: str, nset: NeuronSet) -> None:
        """Persist a task's NeuronSet (rank 0)."""

    def load_neurons(self, task: str) -> NeuronSet:
        """The NeuronSet `save_neurons` stored for `task` (a resumed stage reuses it)."""

    def save_stage(self, engine: Engine, stage: int, state: dict[str, Any]) -> None:
        """Checkpoint the model after stage `stage` with the loop's bookkeeping."""

    def resume_step(self, stage: int) -> int:
        """Optimizer steps a mid-task checkpoint of `stage` holds (0: none)."""

    def restore_progress(self, engine: Engine, stage: int) -> None:
        """Load that mid-task checkpoint into an engine built from the stage's start."""

    def after_step(self, engine: Engine, stage: int, step: int, total: int) -> None:
        """Called after every optimizer step (mid-task checkpoints are its business)."""

    def after_eval(self, stage: int, task_index: int) -> None:
        """Called after each task's evaluation in stage `stage` (fault injection)."""

    def log_step(self, stage: int, task: str, log: StepLog, lr: float) -> None:
        """Record one training step."""

    def log_line(self, text: str) -> None:
        """Print progress (rank 0)."""
