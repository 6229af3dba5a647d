"""Engine-shared precision and checkpointing setup, in process (single engine)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from launcher.dist import DistInfo
from launcher.engines import OptimConfig, build_engine
from tests.support.tiny import VOCAB, tiny_llama

CPU = DistInfo(rank=0, world_size=1, local_rank=0, backend="gloo", device=torch.device("cpu"))


def test_bf16_model_gets_fp32_masters_and_bf16_compute():
    # Even a model handed over in bf16 trains on fp32 masters.
    engine = build_engine("single", tiny_llama().bfloat16(),
                          OptimConfig(compute_dtype=torch.bfloat16), CPU)
    assert engine.name == "single" and engine.device == torch.device("cpu")
    assert {p.dtype for p in engine.module.parameters()} == {torch.float32}
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    out = engine.forward({"input_ids": ids, "labels": ids})
    assert out.logits.dtype == torch.bfloat16
    engine.backward(out.loss)
    engine.step()
    state = engine.optimizer.state[next(engine.module.parameters())]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32


@pytest.mark.parametrize("backend", ["single", "fsdp2", "fsdp1"])
def test_fp16_refused_outside_deepspeed(backend):
    with pytest.raises(ValueError, match=r"model.dtype=float16 .*loss scaling"):
        build_engine(backend, tiny_llama(), OptimConfig(compute_dtype=torch.float16), CPU)


def test_checkpointing_needs_a_transformers_model():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="training.activation_checkpointing"):
        build_engine("single", model, OptimConfig(activation_checkpointing=True), CPU)


def test_checkpointing_is_switched_on():
    engine = build_engine("single", tiny_llama(), OptimConfig(activation_checkpointing=True), CPU)
    assert engine.module.is_activation_checkpointing


def test_checkpointing_composes_with_lora():
    from ncft.lora import apply_lora

    model = apply_lora(tiny_llama(), 4, 8, 0.0, ["q_proj", "v_proj"])
    engine = build_engine("single", model, OptimConfig(activation_checkpointing=True), CPU)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    engine.backward(engine.forward({"input_ids": ids, "labels": ids}).loss)
    grads = [p.grad for p in engine.module.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    engine.step()


def test_a_non_finite_gradient_norm_skips_the_update_and_clears_the_gradients():
    from launcher.engines.common import step_if_finite

    weight = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([weight], lr=0.5)
    weight.grad = torch.tensor([1.0, float("nan"), 1.0])
    step_if_finite(opt, float("nan"))
    assert torch.equal(weight.detach(), torch.ones(3)) and weight.grad is None
    weight.grad = torch.ones(3)
    step_if_finite(opt, 1.0)
    assert torch.equal(weight.detach(), torch.full((3,), 0.5)) and weight.grad is None
