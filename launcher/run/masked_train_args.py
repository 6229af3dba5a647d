"""The arguments of `ncft masked-train`, apart from the job itself.

Standard library only: the CLI builds its parser from these fields for every command,
and importing the job (`launcher.run.masked_train`: torch, transformers) would cost
every `ncft validate`/`plan`/`data` call about 1.5 s.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MaskedTrainArgs"]


@dataclass(frozen=True)
class MaskedTrainArgs:
    """Arguments of one masked-train job (all picklable, for spawned ranks)."""

    model: str
    data: str
    out: str
    backend: str = "single"
    ds_config: str = "zero3"
    steps: int = 10
    neurons: str | None = None
    fraction: float = 0.05
    seed: int = 0
    seq_len: int = 64
    micro_batch_size: int = 2
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    dtype: str = "float32"  # compute dtype; the engine keeps fp32 masters (bfloat16 too)
    update: str = "masked"
