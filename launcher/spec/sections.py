"""The spec's sections, one pydantic model each (`launcher.spec.schema` assembles them).

Here: the base class, `section_config`, and `model`, `engine`, `training`, `output`.
The method sections (`selection`, `lora`, `olora`, `wncft`) are in
`launcher.spec.method_sections`, the evaluation ones (`eval`, `study`) in
`launcher.spec.eval_sections`. Each section owns its defaults and the checks that need
only itself; checks across sections live on `launcher.spec.schema.Spec`. Every section
forbids unknown keys.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from launcher.spec.tasks import Problems, absolute, base_dir

if TYPE_CHECKING:
    from ncft.continual import config

MODULES = ("gate", "up", "down", "fc_in", "fc_out", "attention")


class _Section(BaseModel):
    # No number in a spec may be inf or nan: `training.lr=inf` passed validation once
    # and trained to a model of nans without a word.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def section_config(cls: type, section: BaseModel, **given: Any) -> Any:
    """The dataclass `cls` filled from `section`'s fields of the same names, plus `given`.

    This is how an option reaches the code that reads it: defined once on the section,
    copied by name (lists become tuples, the configs are frozen). A dataclass field
    the section lacks is an AttributeError here, never a silent default;
    tests/launcher/spec/test_to_config.py checks that every section field arrives.
    """
    names = [f.name for f in dataclasses.fields(cls) if f.name not in given]
    values = {n: getattr(section, n) for n in names}
    return cls(**{n: tuple(v) if isinstance(v, list) else v for n, v in values.items()},
               **given)


class ModelSpec(_Section):
    """The pretrained causal LM to fine-tune."""

    name_or_path: str = Field(
        "smollm2-135m-instruct",
        description="HF hub id, local directory, or a name the project resolves to a "
        "converted local cache (e.g. smollm2-135m-instruct).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Compute dtype. bfloat16: bf16 forward/backward with fp32 "
        "master weights and fp32 AdamW moments on every engine (masks act on the fp32 "
        "masters); float16: deepspeed only (loss scaling)."
    )

    @model_validator(mode="before")
    @classmethod
    def _removed_keys(cls, data: Any) -> Any:
        # Both were accepted once and never used; say so rather than "extra field".
        if isinstance(data, dict):
            removed = {
                "architecture": "the adapter is always inferred from the model config "
                "(ncft/arch.py); remove model.architecture",
                "gguf_file": "GGUF files are not loaded from the spec; convert the model to "
                "a HF directory once (transformers' from_pretrained(..., gguf_file=...) then "
                "save_pretrained) and give that directory as model.name_or_path",
            }
            problems = [(key, msg) for key, msg in removed.items() if key in data]
            if problems:
                raise Problems(problems)
        return data


class EngineSpec(_Section):
    """How the model is wrapped and how many processes run it."""

    backend: Literal["single", "deepspeed", "fsdp2", "fsdp1"] = Field(
        "single", description="single process, DeepSpeed ZeRO-3, FSDP2 or FSDP1 (flat)."
    )
    ds_config: str = Field(
        "zero3",
        description="DeepSpeed JSON: a name in ds_configs/ (zero3, zero3_offload) or a path "
        "to a .json file (relative to the spec file). Used by backend deepspeed.",
    )
    nnodes: int = Field(1, gt=0, description="Number of nodes.")
    nproc_per_node: int = Field(1, gt=0, description="Processes (ranks) per node.")

    @property
    def world_size(self) -> int:
        """Total number of ranks."""
        return self.nnodes * self.nproc_per_node

    @field_validator("ds_config")
    @classmethod
    def _ds_config_exists(cls, value: str, info: ValidationInfo) -> str:
        from launcher.engines.ds_config import resolve_path  # imports torch: only when validating

        if value.endswith(".json"):
            value = str(absolute(Path(value), base_dir(info)))
        resolve_path(value)
        return value

    @model_validator(mode="after")
    def _single_is_one_rank(self) -> EngineSpec:
        if self.backend == "single" and self.world_size != 1:
            field = "nproc_per_node" if self.nproc_per_node != 1 else "nnodes"
            raise Problems([(field, f"backend single runs 1 process, but nnodes x nproc_per_node"
                             f" = {self.world_size}; use fsdp2/deepspeed/fsdp1 or 1 process")])
        return self


class TrainingSpec(_Section):
    """Optimizer and schedule, per task."""

    lr: float = Field(1e-4, gt=0, description="AdamW learning rate.")
    steps: int | None = Field(
        100, gt=0, description="Optimizer steps per task; unset when epochs is given."
    )
    epochs: int | None = Field(None, gt=0, description="Epochs per task, instead of steps.")
    micro_batch_size: int = Field(4, gt=0, description="Examples per rank per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled AdamW weight decay.")
    grad_clip: float = Field(1.0, ge=0, description="Max gradient norm; 0 disables clipping.")
    seed: int = Field(0, description="Seed of data order and initialisation.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up steps.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1).")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    activation_checkpointing: bool = Field(
        False, description="Recompute each decoder layer's activations in backward instead of "
        "storing them (less memory, about one more forward of compute); every engine, masks "
        "unaffected. Scoring and evaluation run without it.",
    )
    update: Literal["masked", "sparse_delta"] = Field(
        "masked", description="How neuron methods train their selection. masked: whole "
        "matrices train with masked gradients and updates (full-size gradients and AdamW "
        "state for every matrix holding a selected element). sparse_delta: the selected "
        "rows/columns become small trainable parameters and the matrices are frozen, so "
        "gradients and optimizer state exist for the selected elements only; same model "
        "within fp32 rounding (ncft/sparse_delta.py). Only for neuron methods.",
    )

    on_nonfinite: Literal["stop", "skip_step"] = Field(
        "stop", description="What a step whose loss or gradient norm is inf/nan does. stop: "
        "the run stops at that step (exit code 76, naming task, stage and step); nothing "
        "from the step is saved, the last checkpoint stays the resume point. skip_step: the "
        "update is skipped (DeepSpeed's loss-scaler behaviour) and counted in metrics.jsonl "
        "and results.json; see max_skipped_steps. Under model.dtype float16 the loss "
        "scaler's own overflow steps are always skipped, never stopped on.",
    )
    max_skipped_steps: int | None = Field(
        None, gt=0, description="on_nonfinite skip_step: stop once more than this many steps "
        "of one task were skipped; null: no limit.",
    )
    unit_distill_weight: float = Field(
        0.0, ge=0, description="ncft's own regulariser, not from the papers (docs/methods.md): "
        "from the second task on, add weight * mean squared change of the earlier tasks' "
        "selected units' activations (each example's mean over its tokens) on the CURRENT "
        "task's training inputs, against the model at the start of the stage; no earlier "
        "task's data is used. Costs one extra no-grad forward per training micro-batch. "
        "0: off. Needs a continual method that selects neurons per task (ncft, wncft).",
    )

    @model_validator(mode="before")
    @classmethod
    def _epochs_replace_steps(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("epochs") is not None and "steps" not in data:
            data = {**data, "steps": None}
        return data

    @model_validator(mode="after")
    def _check(self) -> TrainingSpec:
        problems = []
        if (self.steps is None) == (self.epochs is None):
            problems.append(("steps", "give exactly one of training.steps or training.epochs "
                             "(set the other to null)"))
        if not all(0 <= b < 1 for b in self.betas):
            problems.append(("betas", f"each beta must be in [0, 1), got {list(self.betas)}"))
        if self.steps is not None and self.warmup_steps > self.steps:
            problems.append(("warmup_steps", f"{self.warmup_steps} exceeds steps={self.steps}"))
        if self.max_skipped_steps is not None and self.on_nonfinite != "skip_step":
            problems.append(("max_skipped_steps", "limits skipped steps, which only "
                             "on_nonfinite: skip_step takes; set that or remove the limit"))
        if problems:
            raise Problems(problems)
        return self

    def to_config(self) -> config.TrainConfig:
        """The options the continual loop reads (the optimizer's go to the engine)."""
        from ncft.continual.config import TrainConfig

        return section_config(TrainConfig, self)


class OutputSpec(_Section):
    """The run directory and what is written into it."""

    dir: Path = Field(description="Run directory (relative to the spec file).")
    resume: bool = Field(False, description="Continue an existing run from its checkpoints.")
    overwrite: bool = Field(False, description="Delete an existing run directory first.")
    checkpoint_every: int = Field(
        0, ge=0, description="Also checkpoint every N optimizer steps within a task (each "
        "rank writes its own shard; a resume needs the same backend and world size); 0: "
        "only after each task, so a resumed run repeats at most one task."
    )
    log_every: int = Field(1, gt=0, description="Log metrics every N steps.")
    tensorboard: bool = Field(False, description="Also write TensorBoard event files.")
    report: bool = Field(True, description="Write analyses and plots at the end.")

    @field_validator("dir")
    @classmethod
    def _absolute(cls, path: Path, info: ValidationInfo) -> Path:
        return absolute(path, base_dir(info))

    @model_validator(mode="after")
    def _check(self) -> OutputSpec:
        problems = []
        if self.resume and self.overwrite:
            problems.append(("resume", "resume and overwrite exclude each other; pick one"))
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            problems.append(("tensorboard", "needs the tensorboard package: "
                             "pip install tensorboard, or set it to false"))
        if problems:
            raise Problems(problems)
        return self
