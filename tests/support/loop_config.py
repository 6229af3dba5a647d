"""A complete `LoopConfig` for loop tests, with any section field changed by keyword.

`LoopConfig` has no defaults on purpose (every spec option is copied by name,
`ncft/continual/config.py`), so tests that build a loop without a spec take this one
and change what they exercise: `loop_config(training={"lr": 2e-2}, eval={...})`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ncft.continual.config import (
    EvalConfig,
    LoopConfig,
    LoraOptions,
    OloraConfig,
    TrainConfig,
    WncftConfig,
)


def loop_config(method: str = "ncft", **sections: dict[str, Any]) -> LoopConfig:
    """A small single-process `LoopConfig`; `sections` maps a section to its changes."""
    cfg = LoopConfig(
        method=method,
        training=TrainConfig(lr=1e-3, steps=1, epochs=None, micro_batch_size=1, grad_accum=1,
                             seed=0, warmup_steps=0, update="masked", on_nonfinite="stop",
                             max_skipped_steps=None, unit_distill_weight=0.0),
        eval=EvalConfig(batch_size=1, max_examples=None, max_new_tokens=1,
                        classification="rank", calibration="none", metrics=("bleu",),
                        tasks="all", zero_shot=False),
        wncft=WncftConfig(num_samples=1, temperature=1.0, query="task"),
        olora=OloraConfig(lambda_orth=0.5, lambda_l2=0.0),
        lora=LoraOptions(r=2, alpha=4, dropout=0.0, target_modules=("q_proj",)),
        log_every=1, loss_scaler=False,
    )
    return replace(cfg, **{name: replace(getattr(cfg, name), **changes)
                           for name, changes in sections.items()})
