"""The loop's bookkeeping across stages, saved with every stage checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LoopState"]


@dataclass
class LoopState:
    """Bookkeeping carried across stages (and saved with each checkpoint)."""

    matrix: list[list[float | None]]
    details: dict[str, list[dict | None]] = field(default_factory=dict)
    # Steps skipped for an inf/nan loss or gradient, per task (`training.on_nonfinite`).
    skipped_steps: dict[str, int] = field(default_factory=dict)
    # The base model's evaluation per task (`eval.zero_shot`), before stage 0.
    zero_shot: list[dict | None] | None = None

    def to_json(self) -> dict[str, Any]:  # noqa: D102
        return {"matrix": self.matrix, "details": self.details,
                "skipped_steps": self.skipped_steps, "zero_shot": self.zero_shot}

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> LoopState:
        """The state `to_json` saved (a stage checkpoint's state.json)."""
        return cls(saved["matrix"], saved.get("details", {}), saved.get("skipped_steps", {}),
                   saved.get("zero_shot"))

    def cells(self, names: Sequence[str], key: str) -> list[list[Any]]:
        """`details[task][stage][key]` as a matrix (None where absent)."""
        return [[(d or {}).get(key) for d in self.details.get(name, [None] * len(names))]
                for name in names]
