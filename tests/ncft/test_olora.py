import math

import pytest
import torch

from ncft import olora
from ncft.continual.config import LoraOptions
from ncft.lora import merge_lora
from tests.support.tiny import tiny_llama

OPTS = LoraOptions(r=2, alpha=4, dropout=0.0, target_modules=("q_proj", "v_proj"))
IDS = torch.tensor([[1, 5, 9, 14, 3, 7]])


def test_loss_terms_by_hand():
    a_prev = torch.tensor([[1.0, 2.0, 0.0]])  # r=1, d=3
    a_new = torch.tensor([[0.0, 1.0, -1.0], [-1.0, 0.0, 0.0]])  # r=2
    # A_prev A_new^T = [[2, -1]] -> |.|.sum() = 3; two previous adapters add up.
    assert float(olora.orthogonality([a_prev], a_new)) == 3.0
    assert float(olora.orthogonality([a_prev, 2 * a_prev], a_new)) == 9.0
    assert float(olora.orthogonality([], a_new)) == 0.0
    b_new = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    # Frobenius norms, not squared: sqrt(3) + 5.
    assert float(olora.l2(a_new, b_new)) == pytest.approx(math.sqrt(3) + 5)


def test_penalty_sums_modules_and_reaches_only_the_new_adapter():
    model = olora.with_adapters(tiny_llama(seed=5), 2, OPTS, seed=0)
    expected_orth, expected_l2 = 0.0, 0.0
    for module in olora._modules(model):
        a0, a1 = module.lora_A["task0"].weight, module.lora_A["task1"].weight
        b1 = module.lora_B["task1"].weight
        expected_orth += float((a0 @ a1.T).abs().sum().detach())
        expected_l2 += float((a1.norm() + b1.norm()).detach())
    loss = olora.penalty(model, 1, 0.5, 0.1)
    assert float(loss) == pytest.approx(0.5 * expected_orth + 0.1 * expected_l2, rel=1e-6)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_A" in n}
    assert all(g is None for n, g in grads.items() if ".task0." in n)
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".task1." in n)
    assert float(olora.penalty(model, 0, 0.5, 0.0)) == 0.0  # first task: nothing to be
    with pytest.raises(ValueError, match="task2"):  # orthogonal to, and no L2 by default
        olora.penalty(model, 2, 0.5, 0.0)


def test_new_adapter_trains_earlier_frozen_bit_identical_and_all_sum():
    from launcher.dist import DistInfo
    from launcher.engines import OptimConfig, build_engine

    model = olora.with_adapters(tiny_llama(seed=5), 1, OPTS, seed=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)  # stands for a trained first adapter
    task0 = {n: p.detach().clone() for n, p in model.named_parameters() if ".task0." in n}
    model = olora.with_adapters(model, 2, OPTS, seed=0)  # adds task1, keeps task0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".task1." in n for n in trainable)
    info = DistInfo(rank=0, world_size=1, local_rank=0, backend="gloo", device=torch.device("cpu"))
    engine = build_engine("single", model, OptimConfig(lr=1e-2), info)
    for _ in range(2):
        loss = engine.forward({"input_ids": IDS, "labels": IDS}).loss
        engine.backward(loss + olora.penalty(model, 1, 0.5, 0.0))
        engine.step()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in task0.items())
    assert any(p.abs().sum() > 0 for n, p in params.items() if "lora_B.task1" in n)
    # Both adapters are active: each contributes, and merging folds in both.
    model.eval()
    with torch.no_grad():
        both = model(input_ids=IDS).logits
        with model.disable_adapter():
            plain = model(input_ids=IDS).logits
        model.base_model.set_adapter(["task0"])
        only0 = model(input_ids=IDS).logits
        model.base_model.set_adapter(["task0", "task1"])
        merged = merge_lora(model)(input_ids=IDS).logits
    assert not torch.allclose(both, only0, atol=1e-4) and not torch.allclose(only0, plain)
    torch.testing.assert_close(merged, both, rtol=1e-5, atol=1e-5)


def test_adapter_init_depends_on_seed_and_stage_only():
    a = olora.with_adapters(tiny_llama(seed=5), 2, OPTS, seed=3)
    torch.manual_seed(123)  # the global stream must not matter
    b = olora.with_adapters(olora.with_adapters(tiny_llama(seed=5), 1, OPTS, seed=3), 2, OPTS, 3)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa[next(k for k in sa if "lora_A.task0" in k)],
                           sa[next(k for k in sa if "lora_A.task1" in k)])
