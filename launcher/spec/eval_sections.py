"""The spec's evaluation sections: `eval` (scoring) and `study` (the analyses).

`eval` says how every stage is scored, `study` which analyses run around the sequence.

Split from `launcher.spec.sections`; `launcher.spec.schema` assembles them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from launcher.spec.sections import _Section, section_config
from launcher.spec.tasks import Problems, absolute, base_dir

if TYPE_CHECKING:
    from ncft.continual import config



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
