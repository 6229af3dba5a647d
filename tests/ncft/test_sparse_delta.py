"""Sparse deltas: masked gradients, write-back, and what they refuse (one process)."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from launcher.dist import DistInfo
from launcher.engines import OptimConfig, build_engine
from launcher.run.checkpoint import gather_state_dict
from ncft import sparse_delta
from ncft.arch import get_adapter, make_projection, row_entries
from ncft.masks.install import freeze_unselected
from ncft.neuron_set import NeuronSet, Selection
from tests.support.tiny import ARCH_CONFIGS, tiny_llama

INFO = DistInfo(rank=0, world_size=1, local_rank=0, backend="gloo", device=torch.device("cpu"))


def _gpt2():
    torch.manual_seed(0)
    return T.GPT2LMHeadModel(ARCH_CONFIGS["gpt2"]()).eval()


MODELS = {
    "llama": (lambda: tiny_llama(0), "model.layers.1.self_attn.q_proj"),
    "gpt2": (_gpt2, "transformer.h.1.attn.c_attn"),  # Conv1D: [in, out] storage, biases
}


def _nset(model, attn: str) -> NeuronSet:
    blocks = get_adapter(model).mlp_blocks(model)
    units = NeuronSet.from_units(blocks, {0: torch.tensor([0, 5, 17]), 1: torch.tensor([2, 30])})
    rows = row_entries(make_projection(model, attn, "attn"), torch.tensor([1, 7]))
    return units.union(NeuronSet({k: Selection(*v) for k, v in rows.items()}))


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_delta_gradient_is_the_masked_gradient(arch):
    build, attn = MODELS[arch]
    masked, sparse = build(), build()
    nset = _nset(masked, attn)
    freeze_unselected(masked, nset.entries)
    entries = sparse_delta.install(sparse, nset.entries)
    ids = torch.randint(0, 60, (3, 10), generator=torch.Generator().manual_seed(0))
    loss_m = masked(input_ids=ids, labels=ids).loss
    loss_s = sparse(input_ids=ids, labels=ids).loss
    assert float(loss_s) == pytest.approx(float(loss_m), abs=1e-6)
    loss_m.backward()
    loss_s.backward()
    params_m, params_s = dict(masked.named_parameters()), dict(sparse.named_parameters())
    trained = {n for n, p in params_s.items() if p.requires_grad}
    assert trained and all(sparse_delta.is_delta_fqn(n) for n in trained)
    covered = set()
    for entry in entries:
        for delta, base, axis, idx in entry.pairs:
            expected = params_m[base].grad.index_select(axis, idx)
            torch.testing.assert_close(params_s[delta].grad, expected, atol=1e-7, rtol=1e-5)
            assert params_s[base].grad is None
            covered.add(base)
    assert covered == set(nset.entries)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_write_back_puts_trained_values_into_full_matrices(arch):
    build, attn = MODELS[arch]
    model = build()
    nset = _nset(model, attn)
    entries = sparse_delta.install(model, nset.entries)
    engine = build_engine("single", model, OptimConfig(lr=1e-2), INFO)
    ids = torch.randint(0, 60, (2, 8), generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine.backward(engine.forward({"input_ids": ids, "labels": ids}).loss)
    engine.step()
    with torch.no_grad():
        trained_logits = engine.forward({"input_ids": ids}).logits.clone()
    sparse_delta.write_back(engine, entries)
    assert all(not e.delta.active for e in entries)
    with torch.no_grad():  # the original forward on the full matrices: same model
        torch.testing.assert_close(engine.forward({"input_ids": ids}).logits, trained_logits,
                                   atol=1e-5, rtol=0)
    state = gather_state_dict(engine)
    names = {n for n, _ in model.named_parameters() if not sparse_delta.is_delta_fqn(n)}
    assert set(state) == names
    params = dict(model.named_parameters())
    for entry in entries:
        for delta, base, axis, idx in entry.pairs:
            torch.testing.assert_close(state[base].index_select(axis, idx), params[delta].detach(),
                                       atol=0, rtol=0)
            outside = ~nset.dense_mask(base, state[base].shape)
            assert torch.equal(state[base][outside], before[base][outside])


def test_install_on_meta_model_gives_meta_deltas():
    with torch.device("meta"):
        model = tiny_llama(0)
    entries = sparse_delta.install(model, _nset(model, MODELS["llama"][1]).entries)
    assert all(p.device.type == "meta" for e in entries for p in e.delta.parameters())


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_mirror_gives_a_fresh_copy_the_same_deltas(arch):
    """ZeRO-3's twin path: same parameter names and shapes, values set afterwards."""
    build, attn = MODELS[arch]
    model, twin = build(), build()
    entries = sparse_delta.install(model, _nset(model, attn).entries)
    mirrored = sparse_delta.mirror(twin, sparse_delta.installed(model))
    assert [e.pairs[0][0] for e in mirrored] == [e.pairs[0][0] for e in entries]
    shapes = {n: p.shape for n, p in model.named_parameters()}
    assert {n: p.shape for n, p in twin.named_parameters()} == shapes
    with torch.no_grad():
        for entry in entries:  # deltas unlike their base slices: the forward must use them
            for param in entry.delta.parameters():
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(2)))
        for name, param in twin.named_parameters():  # as the loader fills it from files
            param.copy_(dict(model.named_parameters())[name])
    ids = torch.randint(0, 60, (2, 8), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(twin(input_ids=ids).logits, model(input_ids=ids).logits)
    for a, b in zip(mirrored, entries):
        assert a.delta is not b.delta and a.delta.transposed == b.delta.transposed
        for (_, _, axis_a, idx_a), (_, _, axis_b, idx_b) in zip(a.pairs, b.pairs):
            assert axis_a == axis_b and torch.equal(idx_a, idx_b)


def test_refuses_non_projection_selection():
    model = tiny_llama(0)
    bad = {"model.layers.0.input_layernorm.weight": Selection(0, torch.tensor([1]))}
    with pytest.raises(ValueError, match="training.update"):
        sparse_delta.install(model, bad)


