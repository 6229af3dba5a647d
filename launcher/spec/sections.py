"""The spec's sections, one pydantic model each (`launcher.spec.schema` assembles them).

`model`, `engine`, `selection`, `training`, `lora`, `olora`, `wncft`, `study`, `eval`,
`output`: each section owns its defaults and the checks that need only itself; checks
across sections live on `launcher.spec.schema.Spec`. Every section forbids unknown keys.
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
    from ncft.selection.pipeline import SelectConfig

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


class StudySpec(_Section):
    """Neuron studies (Leng & Xiong's matrices and similarity, NeFT §6.1 utilization)."""

    deactivation: bool = Field(
        False, description="Tune on all tasks, find each task's units, switch them off."
    )
    deactivation_mode: Literal["activation", "weights"] = Field(
        "activation", description="How the deactivation study switches units off (Leng & "
        "Xiong 4.1 name both): activation = zero the unit's activation entering the down "
        "projection (forward hook); weights = zero the unit's gate and up rows (and their "
        "biases) and its down column. Both give the same logits.",
    )
    finetune_matrix: bool = Field(
        False, description="With deactivation: Leng & Xiong's Fig. 5 right half. From the "
        "base model, train only task i's units for `finetune_steps` steps on task i, then "
        "score every task j (results.deactivation.finetune_matrix).",
    )
    finetune_steps: int = Field(
        20, gt=0, description="Full fine-tuning steps on the union of the tasks first; also "
        "the steps of each fine-tuning-matrix row and each similarity model.",
    )
    finetune_lr: float | None = Field(
        None, gt=0, description="Learning rate of the fine-tuning matrix's rows (only a "
        "task's units train, which usually wants a larger rate than the full fine-tunes "
        "of the study); default training.lr.",
    )
    eval_examples: int = Field(48, gt=0, description="Evaluation examples per task.")
    task_metric: bool = Field(
        True, description="Also score the deactivation and fine-tuning matrices by each "
        "task's own evaluation measure (eval.classification, eval.metrics: what the accuracy "
        "matrix stores, as Leng & Xiong score), beside teacher-forced answer accuracy.",
    )
    neft_utilization: bool | None = Field(
        None, description="NeFT §6.1: after the run, for each task with a neuron set, the "
        "max Pearson score of every candidate's hidden state on the model before and after "
        "the task, ΔRank and the neuron categories (results.neft); two forward passes over "
        "eval_examples per task. Default (null): on with NeFT's selection (selection.scorer "
        "weight_cosine, reversed or neft_plus_reversed), off otherwise.",
    )
    neft_strong_fraction: float = Field(
        100_000 / 1_359_872, gt=0, le=1, description="|ΔRank| threshold of NeFT's strongly "
        "affected neurons, as a fraction of the ranked neurons: the paper's 100,000 of "
        "Llama-2-7b's 1,359,872 projection rows.",
    )
    weight_movement_rank_shift: bool = Field(
        True, description="With selection.scorer weight_cosine or reversed: after the run, "
        "repeat the selection probe (1 - cos weight movement) on each task's trained model and "
        "record its rank shift (results.weight_movement_rank_shift; our measure, not NeFT "
        "§6.1's); costs one probe per task.",
    )
    similarity: Literal["final_model", "paper", "both"] = Field(
        "final_model", description="Leng & Xiong Fig. 3 parameter similarity. final_model: "
        "task neurons' parameters read in the final model of the sequence (ours, cheap); "
        "paper: per task i a separate full fine-tune M_i from the base (`finetune_steps` "
        "steps), P_i vs P_j inside M_i per layer, M_i scored on every task j, correlated; "
        "both: the two.",
    )

    def to_config(self) -> config.StudyConfig:
        """The studies' options (`ncft.studies.run.RunStudies`)."""
        from ncft.continual.config import StudyConfig

        return section_config(StudyConfig, self)

    @model_validator(mode="after")
    def _finetune_needs_deactivation(self) -> StudySpec:
        if self.finetune_matrix and not self.deactivation:
            raise Problems([("finetune_matrix", "the fine-tuning matrix uses the deactivation "
                             "study's neuron sets; set study.deactivation: true too")])
        return self


class EvalSpec(_Section):
    """Evaluation after each task, on every task of the sequence."""

    batch_size: int = Field(8, gt=0, description="Evaluation batch size per rank.")
    max_examples: int | None = Field(
        None, gt=0, description="Examples per task; default each task's eval_size."
    )
    max_new_tokens: int = Field(64, gt=0, description="Generation length limit.")
    classification: Literal["rank", "generate"] = Field(
        "rank",
        description="rank: the label with the highest log-probability wins; generate: greedy "
        "decoding, exact match after O-LoRA's normalisation (lower case, no punctuation, "
        "single spaces).",
    )
    calibration: Literal["none", "content_free"] = Field(
        "none",
        description="content_free: divide each label's probability by the model's prior "
        "on the task's template filled with content-free texts ('N/A', '', '[MASK]'; Zhao "
        "et al. 2021), measured after every stage with the model evaluated. Removes a "
        "shift of the label prior, the main part of the forgetting benchmarks/EVIDENCE.md "
        "section 3 found; needs classification: rank.",
    )
    metrics: list[Literal["bleu", "rougeL"]] = Field(
        ["bleu", "rougeL"], min_length=1, description="Metrics of generation tasks."
    )
    zero_shot: bool = Field(
        False,
        description="Evaluate the base model on every task before the first stage: the "
        "baseline of forward transfer (results `zero_shot`, summary `forward_transfer`; "
        "needs tasks: all). Costs one more evaluation of every task.",
    )
    reference: Path | None = Field(
        None,
        description="A finished `per_task` run directory (same tasks and eval protocol): "
        "its diagonal is A_i, the single-task score Leng & Xiong's FG (eq. 5) divides by. "
        "Without it the summary has no FG, only retention against the run's own "
        "diagonal; `ncft compare --reference RUN` adds FG afterwards.",
    )
    tasks: Literal["all", "seen", "current"] = Field(
        "all",
        description="Which tasks are evaluated after each stage: all (the full accuracy "
        "matrix, forward transfer included), seen (the tasks trained so far: all that "
        "AP, BWT and forgetting need, at about half the cost) or current (the diagonal: "
        "enough for per_task).",
    )

    def to_config(self) -> config.EvalConfig:
        """What the loop evaluates after each stage, and how."""
        from ncft.continual.config import EvalConfig

        return section_config(EvalConfig, self)

    @field_validator("reference")
    @classmethod
    def _reference_absolute(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return None if path is None else absolute(path, base_dir(info))


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
