"""Adapters find the right modules, and unit_entries owns exactly unit j's storage.

The ground truth for "unit j" is behavioural: zeroing activation j (the input of the
down projection) with a forward pre-hook. Zeroing the storage entries that
`unit_entries` returns must reproduce those logits exactly, for every family,
GPT-2's transposed Conv1D included.
"""

import copy
import types

import pytest
import torch
import transformers as T
from torch import nn

from ncft.arch import (
    ADAPTERS,
    get_adapter,
    make_projection,
    row_entries,
    unit_entries,
)
from tests.support.tiny import ARCH_CONFIGS as CONFIGS
from tests.support.tiny import ARCH_D_FF as FF
from tests.support.tiny import ARCH_HIDDEN as H
from tests.support.tiny import ARCH_LAYERS as L
from tests.support.tiny import ARCH_VOCAB as V

EXPECTED = {
    "llama_mlp_bias": ("llama", FF, ("gate", "up", "down")),
    "bloom": ("bloom", 4 * H, ("fc_in", "fc_out")),
    "gpt_neox": ("gpt_neox", FF, ("fc_in", "fc_out")),
    "gpt2": ("gpt2", FF, ("fc_in", "fc_out")),
}


def _model(key: str) -> nn.Module:
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(CONFIGS[key]()).to(torch.float64).eval()
    # HF initialises biases and norms to constants; random values make every owned
    # bias element matter and keep the comparison from passing by accident.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def arch(request):
    return request.param, _model(request.param)


def test_adapter_finds_blocks(arch):
    key, model = arch
    name, d_ff, roles = EXPECTED.get(key, (key, FF, ("gate", "up", "down")))
    adapter = get_adapter(model)
    assert adapter.name == name
    blocks = adapter.mlp_blocks(model)
    assert [b.layer for b in blocks] == list(range(L))
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    for b in blocks:
        assert b.d_ff == d_ff
        assert tuple(p.role for p in b.projections) == roles
        assert b.down_fqn == b.projections[-1].module_fqn
        for p in b.projections:
            assert params[p.weight_fqn].shape[p.unit_axis] == d_ff
            assert p.row_count == params[p.weight_fqn].shape[0]
            assert (p.bias_fqn in params) if p.bias_fqn else (modules[p.module_fqn].bias is None)
    attn = adapter.attention_projections(model)
    assert len(attn) == L * (4 if len(roles) == 3 else 2)
    assert all(isinstance(modules[a].weight, torch.Tensor) for a in attn)


def test_unit_entries_match_activation_zeroing(arch):
    key, model = arch
    blocks = get_adapter(model).mlp_blocks(model)
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))
    base = _logits(model, ids)
    units = torch.tensor([17, 3, 39, 3])  # unsorted with a duplicate on purpose
    for block in blocks:
        hooked = dict(model.named_modules())[block.down_fqn]
        handle = hooked.register_forward_pre_hook(
            lambda _m, args: (args[0].index_fill(-1, units, 0.0),) + args[1:]
        )
        want = _logits(model, ids)
        handle.remove()
        assert not torch.allclose(want, base)

        entries = unit_entries(block, units)
        assert all(torch.equal(idx, torch.tensor([3, 17, 39])) for _, idx in entries.values())
        owned_bias = {p.bias_fqn for p in block.projections if p.role != block.projections[-1].role}
        down = block.projections[-1]
        assert down.bias_fqn not in entries
        assert {k for k in entries if k.endswith(".bias")} == owned_bias - {None}
        # Each projection's share alone already silences the unit (act(0) == 0 for every
        # activation here), so checking them one by one pins down every axis, not just
        # the down projection's.
        for proj in block.projections:
            share = {proj.weight_fqn, proj.bias_fqn}
            pruned = copy.deepcopy(model)
            params = dict(pruned.named_parameters())
            with torch.no_grad():
                for fqn, (axis, idx) in entries.items():
                    if fqn in share:
                        params[fqn].index_fill_(axis, idx, 0.0)
            got = _logits(pruned, ids)
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=proj.weight_fqn)


def test_row_entries_zero_output_features(arch):
    _, model = arch
    adapter = get_adapter(model)
    block = adapter.mlp_blocks(model)[0]
    names = [p.module_fqn for p in block.projections] + adapter.attention_projections(model)[:2]
    for name in names:
        role = next((p.role for p in block.projections if p.module_fqn == name), "attn")
        proj = make_projection(model, name, role)
        module = copy.deepcopy(model.get_submodule(name))
        params = dict(module.named_parameters())
        d_in = module.nx if isinstance(module, T.pytorch_utils.Conv1D) else module.in_features
        x = torch.randn(3, d_in, dtype=torch.float64)
        before = module(x).detach()
        rows = torch.tensor([0, 5])
        with torch.no_grad():
            for fqn, (axis, idx) in row_entries(proj, rows).items():
                params[fqn.rsplit(".", 1)[1]].index_fill_(axis, idx, 0.0)
        after = module(x).detach()
        assert torch.all(after[:, rows] == 0), name
        keep = torch.ones(after.shape[1], dtype=torch.bool)
        keep[rows] = False
        torch.testing.assert_close(after[:, keep], before[:, keep])


def test_unit_entries_rejects_bad_indices():
    model = _model("gpt2")
    block = get_adapter(model).mlp_blocks(model)[0]
    for bad in (torch.tensor([FF]), torch.tensor([-1]), torch.tensor([[1]]), torch.tensor([1.0])):
        with pytest.raises(ValueError, match="indices"):
            unit_entries(block, bad)


def test_unknown_architecture_names_model_and_type():
    class MysteryForCausalLM(nn.Module):
        config = types.SimpleNamespace(model_type="mystery")

    with pytest.raises(ValueError, match="MysteryForCausalLM.*mystery") as err:
        get_adapter(MysteryForCausalLM())
    assert "ADAPTERS" in str(err.value) and "llama" in str(err.value)
    with pytest.raises(ValueError, match="override 'nope'"):
        get_adapter(T.LlamaConfig(), override="nope")
    assert (
        get_adapter(types.SimpleNamespace(model_type="mystery"), override="llama").name == "llama"
    )


def test_registry_names():
    assert set(ADAPTERS) >= {
        "llama",
        "mistral",
        "qwen2",
        "gemma",
        "gemma2",
        "gemma3_text",
        "bloom",
        "gpt_neox",
        "gpt2",
    }
    assert T.Gemma3TextConfig.model_type == "gemma3_text"


def test_wrong_layout_and_bloom_slow_but_exact():
    model = _model("gpt2")
    with pytest.raises(ValueError, match="no layer list"):
        ADAPTERS["llama"].mlp_blocks(model)
    bloom = T.BloomForCausalLM(T.BloomConfig(hidden_size=H, n_layer=1, n_head=2, vocab_size=V))
    bloom.config.pretraining_tp, bloom.config.slow_but_exact = 2, True
    with pytest.raises(ValueError, match="slow_but_exact"):
        get_adapter(bloom).mlp_blocks(bloom)


def test_base_model_and_zero3_shapes():
    model = _model("llama")
    blocks = get_adapter(model).mlp_blocks(model.model)  # bare LlamaModel: no "model." prefix
    assert blocks[0].down_fqn == "layers.0.mlp.down_proj"
    # ZeRO-3 leaves an empty tensor behind and records the full shape in ds_shape.
    down = model.model.layers[0].mlp.down_proj
    down.weight = nn.Parameter(torch.empty(0))
    down.weight.ds_shape = torch.Size([H, FF])
    assert get_adapter(model).mlp_blocks(model)[0].d_ff == FF
