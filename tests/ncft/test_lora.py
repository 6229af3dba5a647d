import pytest
import torch

from ncft.lora import apply_lora, merge_lora
from tests.support.tiny import tiny_llama

IDS = torch.tensor([[1, 5, 9, 14, 3, 7]])


def adapted(dropout=0.0, targets=("q_proj", "v_proj", "down_proj")):
    return apply_lora(tiny_llama(seed=5), r=4, alpha=8, dropout=dropout, target_modules=targets)


def test_only_lora_parameters_are_trainable():
    model = adapted()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [n for n, _ in model.named_parameters() if "lora_" in n]
    # 2 layers x 3 targets x (A, B).
    assert len(trainable) == 12 and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert any(".down_proj." in n for n in trainable)
    assert not any("k_proj" in n or "embed" in n for n in trainable)


def test_engines_optimise_only_the_adapter():
    from launcher.dist import DistInfo
    from launcher.engines import OptimConfig, build_engine

    info = DistInfo(rank=0, world_size=1, local_rank=0, backend="gloo", device=torch.device("cpu"))
    model = adapted()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    engine = build_engine("single", model, OptimConfig(lr=1e-2), info)
    assert {s.fqn for s in engine.segments()} == {n for n, _ in model.named_parameters()
                                                  if "lora_" in n}
    for _ in range(2):  # B starts at zero: the second step also moves A
        engine.backward(engine.forward({"input_ids": IDS, "labels": IDS}).loss)
        engine.step()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert any(p.abs().sum() > 0 for n, p in params.items() if "lora_B" in n)


def test_merge_gives_the_same_logits():
    model = adapted().eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B is zero at init; make the adapter matter
                p.normal_(std=0.5)
        adapted_logits = model(input_ids=IDS).logits
        base_logits = model.get_base_model()(input_ids=IDS).logits  # adapters still active
        merged = merge_lora(model)
        merged_logits = merged(input_ids=IDS).logits
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged_logits, adapted_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(base_logits, adapted_logits)
    plain = tiny_llama(seed=5).eval()
    with torch.no_grad():
        assert not torch.allclose(plain(input_ids=IDS).logits, merged_logits, atol=1e-3)


def test_user_errors_name_the_field():
    with pytest.raises(ValueError, match=r"lora.target_modules: \['qkv'\]"):
        adapted(targets=("q_proj", "qkv"))
    with pytest.raises(ValueError, match="lora.r"):
        apply_lora(tiny_llama(), r=0, alpha=8, dropout=0.0, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="lora.dropout"):
        adapted(dropout=1.0)
    with pytest.raises(ValueError, match="peft model"):
        merge_lora(tiny_llama())
