"""LoRA adapters (via `peft`), the baseline users compare neuron tuning against.

`apply_lora` wraps the model before the engine is built, so the engine's optimizer
sees only the adapter: peft sets `requires_grad=False` on every base parameter, and the
engines optimise exactly the parameters with `requires_grad` (no NeuronSet masks are
installed for LoRA methods).

SeqLoRA (method `seqlora`) follows the O-LoRA paper's baseline: ONE adapter of fixed
size keeps training across the whole task sequence (no regularisation, no replay, no
merge between tasks), so it forgets the way sequential fine-tuning does, in a low-rank
subspace. The adapter and the engine's optimizer state simply carry over from task to
task. `merge_lora` folds the adapter into the base weights for export (the consolidated
`final` model is a plain HF model); call it on an unwrapped, unsharded model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def apply_lora(
    model: nn.Module, r: int, alpha: float, dropout: float, target_modules: Sequence[str],
    seed: int | None = None,
) -> nn.Module:
    """Add LoRA adapters to `model` and freeze everything else.

    Args:
        model: A HF causal LM.
        r: Adapter rank (`lora.r`).
        alpha: Scaling numerator, scale = alpha / r (`lora.alpha`).
        dropout: Dropout on the adapter input (`lora.dropout`).
        target_modules: Module names (suffixes) that get adapters (`lora.target_modules`).
        seed: Seed of the adapters' random init (peft draws A from torch's global
            generator); None draws from the global stream as it stands. A run passes
            its seed, so a stage redone after a resume starts from the same adapter
            whatever ran before in the process.

    Returns:
        The `peft.PeftModel`; only parameters named `lora_` require grad.

    Raises:
        ValueError: Naming the `lora.*` field at fault.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    if not isinstance(r, int) or r < 1:
        raise ValueError(f"lora.r must be a positive integer, got {r!r}")
    if not alpha > 0:
        raise ValueError(f"lora.alpha must be > 0, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"lora.dropout must be in [0, 1), got {dropout!r}")
    if not target_modules:
        raise ValueError("lora.target_modules must name at least one module")
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(target_modules) - present)
    if missing:
        raise ValueError(f"lora.target_modules: {missing} not found in the model; "
                         f"linear layers include {_linear_names(model)}")
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        bias="none",
        task_type=TaskType.CAUSAL_LM,
    )
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    wrong = [n for n, p in peft_model.named_parameters() if p.requires_grad != ("lora_" in n)]
    assert not wrong, f"peft left the wrong parameters trainable: {wrong[:3]}"
    return peft_model


def _linear_names(model: nn.Module) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, nn.Linear)})


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights and return the plain base model.

    The result computes what the adapted model computes (up to float rounding) and has
    no peft wrappers, so `save_pretrained` writes a standard HF checkpoint.
    """
    merge = getattr(model, "merge_and_unload", None)
    if merge is None:
        raise ValueError(f"merge_lora needs a peft model (from apply_lora), got "
                         f"{type(model).__name__}")
    return merge()
