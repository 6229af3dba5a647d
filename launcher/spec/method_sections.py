"""The spec's method sections: `selection`, `lora`, `olora`, `wncft`.

Split from `launcher.spec.sections` (which holds the base class and the run's own
sections); `launcher.spec.schema` assembles them. Every section forbids unknown keys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from launcher.spec.sections import MODULES, _Section, section_config
from launcher.spec.tasks import Problems

if TYPE_CHECKING:
    from ncft.continual import config
    from ncft.selection.pipeline import SelectConfig


class SelectionSpec(_Section):
    """How task-specific neurons are scored and selected."""

    scorer: Literal[
        "grad_attribution", "weight_cosine", "random", "reversed", "neft_plus_reversed"
    ] = Field(
        "grad_attribution",
        description="grad_attribution (Leng & Xiong), weight_cosine (NeFT), random, "
        "reversed (NeFT's highest-similarity control) or neft_plus_reversed (NeFT §6.2's "
        "NeFT_x%+Reversed_y%: the `fraction` most-changed plus the `reversed_fraction` "
        "least-changed candidates). Method random_neurons always uses random.",
    )
    reversed_fraction: float | None = Field(
        None, gt=0, le=1, description="scorer neft_plus_reversed only: the y of "
        "NeFT_x%+Reversed_y%, the fraction of least-changed (highest cosine) candidates added "
        "to the `fraction` most-changed ones (per layer with per_layer; disjoint).",
    )
    fraction: float | None = Field(
        0.05, gt=0, le=1, description="Fraction selected (0 < f <= 1); unset when count is given."
    )
    count: int | None = Field(None, gt=0, description="Number selected, instead of fraction.")
    per_layer: bool = Field(True, description="Top-k within each layer; false = global top-k.")
    fraction_of: Literal["candidates", "parameters"] = Field(
        "candidates", description="What `fraction` (and `reversed_fraction`) count. "
        "candidates: that share of the candidate units/rows (of each layer with per_layer). "
        "parameters: NeFT's x% (Xu et al. 2025): candidates ranked globally and taken in "
        "score order until they own that share of the model's parameters (needs "
        "per_layer: false and fraction).",
    )
    modules: list[Literal[MODULES]] = Field(  # type: ignore[valid-type]
        ["gate", "up", "down"],
        min_length=1,
        description="Module roles scored and trained: gate/up/down (gated MLP), fc_in/fc_out "
        "(plain MLP), attention (q/k/v/o projections; unit row only).",
    )
    unit: Literal["neuron", "row"] = Field(
        "neuron",
        description="neuron: FFN unit (gate row + up row + down column together); "
        "row: one weight row (NeFT's neuron).",
    )
    positions: Literal["all", "answer"] = Field(
        "answer", description="Token positions whose attribution is summed."
    )
    num_examples: int = Field(128, gt=0, description="Examples used to score.")
    batch_size: int = Field(8, gt=0, description="Scoring batch size per rank.")
    cosine_steps: int = Field(
        20, gt=0, description="Full fine-tuning steps before weight_cosine compares rows."
    )
    union_with_previous: bool = Field(
        False, description="Also train the neurons selected for earlier tasks."
    )
    exclude_previous: bool = Field(
        False, description="Choose each task's units only among units no earlier task "
        "owns (disjoint sets); an error if a layer has too few left.",
    )
    seed: int | None = Field(None, description="Seed of random selection; default training.seed.")

    @model_validator(mode="before")
    @classmethod
    def _count_replaces_fraction(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("count") is not None and "fraction" not in data:
            data = {**data, "fraction": None}
        return data

    @model_validator(mode="after")
    def _check(self) -> SelectionSpec:
        problems = []
        if (self.fraction is None) == (self.count is None):
            problems.append(("fraction", "give exactly one of selection.fraction or "
                             "selection.count (set the other to null)"))
        if len(set(self.modules)) != len(self.modules):
            problems.append(("modules", f"duplicate entries in {self.modules}"))
        if (self.scorer == "neft_plus_reversed") != (self.reversed_fraction is not None):
            problems.append(("reversed_fraction", "give selection.reversed_fraction exactly "
                             "when selection.scorer is neft_plus_reversed"))
        if self.fraction_of == "parameters" and self.per_layer:
            problems.append(("per_layer", "fraction_of: parameters ranks all candidates "
                             "together (NeFT's x% of the model's parameters); set "
                             "selection.per_layer: false"))
        if self.fraction_of == "parameters" and self.fraction is None:
            problems.append(("fraction_of", "fraction_of: parameters needs selection.fraction "
                             "(a share of the model's parameters), not selection.count"))
        if "attention" in self.modules and self.unit != "row":
            problems.append(("modules", "attention has no FFN neuron units; use unit: row"))
        if problems:
            raise Problems(problems)
        return self

    def to_config(self, model_id: str) -> SelectConfig:
        """The selection pipeline's values; `model_id` is recorded in each NeuronSet."""
        from ncft.selection.pipeline import SelectConfig

        return section_config(SelectConfig, self, model_id=model_id)


class LoraSpec(_Section):
    """LoRA adapters (methods lora, seqlora and olora)."""

    r: int = Field(8, gt=0, description="Adapter rank.")
    alpha: float = Field(16, gt=0, description="Scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        ["q_proj", "v_proj"], min_length=1, description="Module names that get adapters."
    )

    def to_config(self) -> config.LoraOptions:
        """The adapters' options (`ncft.lora.apply_lora`, `ncft.olora`)."""
        from ncft.continual.config import LoraOptions

        return section_config(LoraOptions, self)


class OloraSpec(_Section):
    """O-LoRA's loss weights (Wang et al. 2023; defaults of cmnfriend/O-LoRA's scripts)."""

    lambda_orth: float = Field(
        0.5, ge=0, description="lamda_1: weight of sum |A_prev A_new^T| over earlier adapters."
    )
    lambda_l2: float = Field(
        0.0, ge=0, description="lamda_2: weight of the L2 norms of the new adapter's A and B."
    )

    def to_config(self) -> config.OloraConfig:
        """O-LoRA's loss weights for the loop."""
        from ncft.continual.config import OloraConfig

        return section_config(OloraConfig, self)


class WncftSpec(_Section):
    """W-NCFT inference-time mixing of earlier tasks' neurons."""

    num_samples: int = Field(32, gt=0, description="Samples averaged into a task vector.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature over similarities.")
    query: Literal["task", "example"] = Field(
        "task",
        description="task: the evaluated task's prompt vector is the query (Leng & Xiong "
        "App. A.2, needs task identity); example: each example is routed by its own prompt "
        "vector, no task identity (see ncft/continual/wncft.py).",
    )

    def to_config(self) -> config.WncftConfig:
        """W-NCFT's mixing options for the loop."""
        from ncft.continual.config import WncftConfig

        return section_config(WncftConfig, self)
