"""Every training method, described once as data.

The spec's allowed values (`launcher.spec.tasks`), the stages `ncft validate`
prints, the launcher's model loading and the continual loop all read `METHODS`, so a
new method is one row here plus its own module (O-LoRA: `ncft.olora`), not string
checks spread over the code base.

| method | tasks | trains per stage | a stage starts from | selects | eval mixes |
|---|---|---|---|---|---|
| full | 1 | every parameter | base | no | no |
| neurons | 1 | the task's selected neurons | base | yes | no |
| random_neurons | 1 | random units, same count | base | yes | no |
| lora | 1 | one LoRA adapter | base | no | no |
| seqft | >= 2 | every parameter | previous stage | no | no |
| ncft | >= 2 | the task's selected neurons | previous stage | yes | no |
| wncft | >= 2 | the task's selected neurons | previous stage | yes | yes (W-NCFT) |
| seqlora | >= 2 | one LoRA adapter, continued | previous stage | no | no |
| olora | >= 2 | a NEW LoRA adapter per task, earlier ones frozen | previous stage | no | no |
| per_task | >= 2 | every parameter | base | no | no |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Trains = Literal["all", "neurons", "lora"]


@dataclass(frozen=True)
class Method:
    """What one `method:` value does.

    Attributes:
        name: The spec value.
        continual: Trains a sequence of >= 2 tasks (else exactly one).
        trains: "all" parameters, the selected "neurons" (or rows), or "lora" adapters.
        from_base: Every stage starts from the base model (else from the previous stage).
        random: Selection draws random units of the scorer's count (the control).
        adapter_per_task: LoRA only: each task gets a new adapter and the earlier ones
            are frozen (O-LoRA); otherwise one adapter continues across tasks.
        mixes: Evaluation mixes the tasks' neurons (W-NCFT, `ncft.continual.wncft`).
        summary: One line for docs and `ncft validate`.
    """

    name: str
    continual: bool
    trains: Trains
    from_base: bool = False
    random: bool = False
    adapter_per_task: bool = False
    mixes: bool = False
    summary: str = ""

    @property
    def selects(self) -> bool:
        """Whether each stage selects a NeuronSet before training."""
        return self.trains == "neurons"

    @property
    def lora(self) -> bool:
        """Whether the model is wrapped in peft LoRA adapters."""
        return self.trains == "lora"


_ROWS = (
    Method("full", False, "all", summary="train every parameter"),
    Method("neurons", False, "neurons", summary="train the task's selected neurons"),
    Method("random_neurons", False, "neurons", random=True,
           summary="train random units, as many as the scorer selects"),
    Method("lora", False, "lora", summary="train one LoRA adapter"),
    Method("seqft", True, "all", summary="train every parameter, task after task"),
    Method("seqlora", True, "lora", summary="train one LoRA adapter across all tasks"),
    Method("olora", True, "lora", adapter_per_task=True,
           summary="a new LoRA adapter per task, orthogonal to the frozen earlier ones"),
    Method("ncft", True, "neurons", summary="train each task's selected neurons in turn"),
    Method("wncft", True, "neurons", mixes=True,
           summary="NCFT, evaluating with the tasks' neurons mixed by similarity"),
    Method("per_task", True, "all", from_base=True,
           summary="train every parameter, each task from the base model"),
)

METHODS: dict[str, Method] = {m.name: m for m in _ROWS}
SINGLE_TASK_METHODS = tuple(m.name for m in _ROWS if not m.continual)
CONTINUAL_METHODS = tuple(m.name for m in _ROWS if m.continual)


def method(name: str) -> Method:
    """The `Method` row of spec value `name`.

    Raises:
        ValueError: Naming `method` and the allowed values.
    """
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method: unknown {name!r}; choose one of {list(METHODS)}") from None
