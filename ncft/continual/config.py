"""What a run's loop and studies read from an experiment, as plain frozen values.

One dataclass per spec section the loop (or `ncft.studies.run`) reads, with the
section's own field names: the launcher builds each with `to_config()` on the
matching pydantic section (`launcher.spec.*sections`), which copies the fields by
name. So an option is defined once, in the spec, and reaches the code under the same
name; a field added to one side only fails loudly (a missing attribute or argument)
instead of falling back to a default here. No defaults, for the same reason.
Torch-free: the spec imports it while validating.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainConfig:
    """The `training` options of a stage's loop (the engine takes the optimizer's)."""

    lr: float
    steps: int | None
    epochs: int | None
    micro_batch_size: int
    grad_accum: int
    seed: int
    warmup_steps: int
    update: str  # masked | sparse_delta
    on_nonfinite: str  # stop | skip_step (`ncft.train.NonFinite`)
    max_skipped_steps: int | None
    unit_distill_weight: float  # 0: off (`ncft.continual.distill`, ncft's own)


@dataclass(frozen=True)
class EvalConfig:
    """The `eval` section: what is evaluated after each stage, and how."""

    batch_size: int
    max_examples: int | None
    max_new_tokens: int
    classification: str  # rank | generate
    calibration: str  # none | content_free (rank-mode classification)
    metrics: tuple[str, ...]
    tasks: str  # all | seen | current (`ContinualLoop._evaluated`)
    zero_shot: bool  # evaluate the base model on every task before stage 0


@dataclass(frozen=True)
class WncftConfig:
    """The `wncft` section: W-NCFT's inference-time mixing."""

    num_samples: int
    temperature: float
    query: str  # task | example


@dataclass(frozen=True)
class OloraConfig:
    """The `olora` section: O-LoRA's loss weights."""

    lambda_orth: float
    lambda_l2: float


@dataclass(frozen=True)
class LoraOptions:
    """The `lora` section: the adapters of lora, seqlora and olora (`ncft.olora`)."""

    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]


@dataclass(frozen=True)
class LoopConfig:
    """Everything `ncft.continual.loop.ContinualLoop` reads, section by section."""

    method: str
    training: TrainConfig
    eval: EvalConfig
    wncft: WncftConfig
    olora: OloraConfig
    lora: LoraOptions
    log_every: int  # output.log_every
    loss_scaler: bool  # model.dtype float16: DeepSpeed's scaler skips its overflow steps


@dataclass(frozen=True)
class StudyConfig:
    """The `study` section: which neuron studies a run adds, and their sizes."""

    deactivation: bool
    deactivation_mode: str  # activation | weights
    finetune_matrix: bool
    finetune_steps: int
    finetune_lr: float | None
    eval_examples: int
    neft_utilization: bool | None  # None: decided by the scorer (launcher.spec.stages)
    neft_strong_fraction: float
    weight_movement_rank_shift: bool
    similarity: str  # final_model | paper | both
    task_metric: bool  # also score the matrices by each task's own measure
