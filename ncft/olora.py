"""O-LoRA: a new LoRA adapter per task, orthogonal to the frozen earlier ones.

Wang et al. 2023, "Orthogonal Subspace Learning for Language Model Continual
Learning"; code: github.com/cmnfriend/O-LoRA.

Task i (stage i) trains a fresh adapter `task{i}` while the adapters of tasks < i stay
frozen; all adapters are active in every forward, so their low-rank updates SUM, at
training time and at inference (no task identity is needed). The training loss adds

    lambda_orth * sum_{j<i} sum_modules |A_j A_i^T|.sum()   (elementwise abs of [r, r])
  + lambda_l2   * sum_modules (||A_i||_2 + ||B_i||_2)       (Frobenius norms, not squared)

as O-LoRA's trainer computes them (`src/uie_trainer_lora.py`: `torch.abs(torch.mm(
lora_A, loranew_A.T)).sum()` with `lora_A` the earlier tasks' A matrices stacked along
the rank axis, so the sum over j is the same number, and `torch.norm(param, p=2)` over
the new A and B). Defaults are O-LoRA's `lamda_1 = 0.5`, `lamda_2 = 0` (its scripts
and its TRACE port use these; the spec's `olora` section changes them).

The penalty is added to every micro-batch's loss, so it weighs as much in the step's
gradient as the task loss does (O-LoRA adds it per batch too). `penalty` is that
definition on a whole (unsharded) peft model. Training uses `add_penalty_grad`, which
runs on every engine: per LoRA module it gathers the new A and B and the earlier A
matrices (`Engine.gathered`, a few parameters at a time), differentiates the same
terms on those copies, and adds the gradient once per step to this rank's local
gradient shards (`Engine.segments`). The per-micro-batch penalty's gradient is the
same: each of the G micro-batch losses is divided by G, and the weights do not move
within a step. The penalty is the same on every rank, so the data-parallel mean of
the gradients leaves it as is.

Everything here works on a peft model; `merge_lora` (`ncft.lora`) folds all active
adapters into the base weights for export.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ncft.continual.config import LoraOptions
from ncft.engine import Engine


def adapter_name(stage: int) -> str:
    """The peft adapter name of stage `stage`'s task (0-based)."""
    return f"task{stage}"


def _config(opts: LoraOptions):
    from peft import LoraConfig, TaskType

    return LoraConfig(r=opts.r, lora_alpha=opts.alpha, lora_dropout=opts.dropout,
                      target_modules=list(opts.target_modules), bias="none",
                      task_type=TaskType.CAUSAL_LM)


def with_adapters(model: nn.Module, num: int, opts: LoraOptions, seed: int) -> nn.Module:
    """`model` with adapters `task0..task{num-1}`, all active, only the last trainable.

    Args:
        model: A plain HF causal LM, or a peft model from an earlier call (its adapters
            are kept and only the missing ones added).
        num: Adapters wanted (>= 1).
        opts: Adapter shape (every adapter has the same).
        seed: Each new adapter `task{i}` is initialised from `seed * 1000 + i`, so a
            stage that is run again (a resume) starts from the same adapter.

    Returns:
        The peft model.
    """
    from peft import PeftModel, get_peft_model

    if num < 1:
        raise ValueError(f"with_adapters needs num >= 1, got {num}")
    config = _config(opts)
    for i in range(num):
        name = adapter_name(i)
        if isinstance(model, PeftModel) and name in model.peft_config:
            continue
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + i)
            if isinstance(model, PeftModel):
                model.add_adapter(name, config)
            else:
                model = get_peft_model(model, config, adapter_name=name)
    names = [adapter_name(i) for i in range(num)]
    model.base_model.set_adapter(names)  # all active: the forward sums them
    trainable = f".{names[-1]}."
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n and trainable in n)
    return model


def freeze_all(model: nn.Module) -> nn.Module:
    """Mark every parameter frozen (a loaded model that is only evaluated or exported)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def orthogonality(previous: Sequence[torch.Tensor], new: torch.Tensor) -> torch.Tensor:
    """`sum_j |A_j A_new^T|.sum()` for one module: A_j [r_j, d], A_new [r, d]."""
    total = new.new_zeros(())
    for a in previous:
        total = total + torch.mm(a.to(new.dtype), new.T).abs().sum()
    return total


def l2(a_new: torch.Tensor, b_new: torch.Tensor) -> torch.Tensor:
    """`||A_new|| + ||B_new||` (Frobenius norms, not squared, as O-LoRA's `torch.norm`)."""
    return torch.linalg.vector_norm(a_new) + torch.linalg.vector_norm(b_new)


def _modules(model: nn.Module):
    """The LoRA layers: modules holding `lora_A` / `lora_B` ModuleDicts."""
    for module in model.modules():
        if isinstance(getattr(module, "lora_A", None), nn.ModuleDict):
            yield module


def penalty(model: nn.Module, stage: int, lambda_orth: float, lambda_l2: float) -> torch.Tensor:
    """O-LoRA's regulariser for training stage `stage`'s adapter (module docstring).

    Args:
        model: The peft model with adapters `task0..task{stage}`.
        stage: The stage being trained (its adapter is the new one).
        lambda_orth: Weight of the orthogonality term (`olora.lambda_orth`).
        lambda_l2: Weight of the L2 term (`olora.lambda_l2`).

    Returns:
        A scalar with gradients into the new adapter only.
    """
    new = adapter_name(stage)
    old = [adapter_name(i) for i in range(stage)]
    orth, norm, found = None, None, False
    for module in _modules(model):
        if new not in module.lora_A:
            continue
        found = True
        a_new, b_new = module.lora_A[new].weight, module.lora_B[new].weight
        o = orthogonality([module.lora_A[j].weight for j in old], a_new)
        n = l2(a_new, b_new)
        orth = o if orth is None else orth + o
        norm = n if norm is None else norm + n
    if not found:
        raise ValueError(f"the model has no LoRA adapter {new!r} (stage {stage})")
    return lambda_orth * orth + lambda_l2 * norm


def add_penalty_grad(engine: Engine, stage: int, lambda_orth: float, lambda_l2: float) -> float:
    """Add the gradient of `penalty` to this rank's gradient shards; return its value.

    Call once per optimizer step, after every micro-batch's backward and before the
    step (where `ncft.train.train_step` calls it): the gradients then hold the
    data-parallel mean of the task loss, and the penalty's gradient (the same on every
    rank) is added to the new adapter's local elements. A collective on sharded
    engines: every rank must call it.

    Args:
        engine: An engine over a peft model with adapters `task0..task{stage}`, the
            last one trainable.
        stage: The stage being trained (its adapter is the new one).
        lambda_orth: Weight of the orthogonality term.
        lambda_l2: Weight of the L2 term.

    Returns:
        The penalty's value (what `penalty` returns), as a float.

    Raises:
        ValueError: If the model has no adapter of `stage`, or a new adapter matrix has
            no gradient on this rank yet.
    """
    new = adapter_name(stage)
    suffix = f".lora_A.{new}.weight"
    prefixes = [name[: -len(suffix)] for name, _ in engine.named_parameter_shapes()
                if name.endswith(suffix)]
    if not prefixes:
        raise ValueError(f"the model has no LoRA adapter {new!r} (stage {stage})")
    local: dict[str, list] = {}
    for seg in engine.segments():
        local.setdefault(seg.fqn, []).append(seg)
    total = 0.0
    for prefix in prefixes:
        a_name, b_name = f"{prefix}.lora_A.{new}.weight", f"{prefix}.lora_B.{new}.weight"
        old = [f"{prefix}.lora_A.{adapter_name(j)}.weight" for j in range(stage)]
        with engine.gathered([a_name, b_name, *old]) as full:
            a_new = full[a_name].detach().float().clone().requires_grad_(True)
            b_new = full[b_name].detach().float().clone().requires_grad_(True)
            with torch.enable_grad():
                value = (lambda_orth * orthogonality([full[o].float() for o in old], a_new)
                         + lambda_l2 * l2(a_new, b_new))
                grads = torch.autograd.grad(value, [a_new, b_new])
        total += float(value.detach())
        for name, grad in zip((a_name, b_name), grads):
            flat = grad.reshape(-1)
            for seg in local.get(name, []):
                target = seg.grad()
                if target is None:
                    raise ValueError(f"{name} has no gradient on rank {engine.rank}: call "
                                     "add_penalty_grad after the micro-batches' backward")
                target.add_(flat[seg.start : seg.stop].to(target))
    return total
