import copy
import math

import pytest
import torch

from ncft.arch import get_adapter
from ncft.continual.wncft import (
    TaskStore,
    apply_mixture,
    mixed,
    mixing_weights,
    prompt_batches,
    restore,
    snapshot,
    task_vector,
)
from ncft.neuron_set import NeuronSet, Selection
from tests.support.fake_engine import FakeEngine, ThreadWorld
from tests.support.tiny import tiny_llama, word_tokenizer

WORDS = "the a cat dog sat ran on in mat park . translate classify".split()
PROMPTS = ["the cat sat on the mat .", "a dog ran", "classify the dog .", "translate a cat",
           "the mat"]


def test_mixing_weights_by_hand():
    q = torch.tensor([1.0, 0.0])
    vs = [torch.tensor([2.0, 0.0]), torch.tensor([0.0, 3.0]), torch.tensor([-1.0, 0.0])]
    w = mixing_weights(q, vs, temperature=0.5)  # cosines 1, 0, -1 -> logits 2, 0, -2
    z = math.exp(2) + 1 + math.exp(-2)
    assert w.tolist() == pytest.approx([math.exp(2) / z, 1 / z, math.exp(-2) / z])
    assert mixing_weights(q, vs, temperature=1e6).tolist() == pytest.approx([1 / 3] * 3, abs=1e-5)
    assert mixing_weights(q, vs, temperature=1e-3)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="wncft.temperature"):
        mixing_weights(q, vs, temperature=0.0)
    with pytest.raises(ValueError, match="size"):
        mixing_weights(torch.ones(3), vs, 1.0)


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(WORDS)


def test_task_vector_is_mean_over_real_prompt_tokens(tok):
    model = tiny_llama(seed=1).eval()
    rows = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = torch.tensor([tok(p)["input_ids"]])
            rows.append(model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0])
    expected = torch.cat(rows).double().mean(0).float()
    engine = FakeEngine(model)
    got = task_vector(engine, prompt_batches(tok, PROMPTS, 2, 64, 0, 1))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    first_layer = task_vector(engine, prompt_batches(tok, PROMPTS, 4, 64, 0, 1), layer=1)
    assert not torch.allclose(first_layer, got)
    # Three ranks, 5 prompts, batch 1: ranks pad with filler rows, which must not count.
    world = ThreadWorld(3)
    results = world.run(
        model, lambda e: task_vector(e, prompt_batches(tok, PROMPTS, 1, 64, e.rank, e.world_size))
    )
    for r in results:
        torch.testing.assert_close(r, expected, rtol=0, atol=1e-6)
    assert len({e.forwards for e in world.engines}) == 1


def neuron_sets(model):
    blocks = get_adapter(model).mlp_blocks(model)
    s1 = NeuronSet.from_units(blocks, {0: torch.tensor([0, 3, 5, 8]), 1: torch.tensor([2, 7])})
    # Overlaps s1 on unit 5 of layer 0, and adds a layer s1 does not touch... plus an
    # entry on the embedding (rows) to cover a non-MLP parameter.
    s2 = NeuronSet.from_units(blocks, {0: torch.tensor([1, 5, 36])})
    s2 = s2.union(NeuronSet({"model.embed_tokens.weight": Selection(0, torch.tensor([4, 9]))}))
    return s1, s2


def train_only(engine, nset, seed):
    """What NCFT does to the model: change the selected elements, nothing else."""
    gen = torch.Generator().manual_seed(seed)
    for fqn, sel in nset.entries.items():
        with engine.edited([fqn]) as full:
            t = full[fqn]
            shape = list(t.shape)
            shape[sel.axis] = len(sel)
            t.index_add_(sel.axis, sel.indices, torch.randn(shape, generator=gen) * 0.1)


def two_task_run(engine):
    """Train two tasks NCFT-style on `engine`, capturing each; return the store and states."""
    s1, s2 = neuron_sets(engine.module)
    theta0 = copy.deepcopy(engine.module.state_dict())
    store = TaskStore()
    for name, nset, seed in (("t1", s1, 1), ("t2", s2, 2)):
        before = snapshot(engine, nset)
        train_only(engine, nset, seed)
        store.capture(name, nset, before, snapshot(engine, nset), torch.randn(24))
    return store, theta0, (s1, s2)


def state(engine):
    return {k: v.clone() for k, v in engine.module.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def elements(nset, fqn, t):
    sel = nset.entries[fqn]
    return t.index_select(sel.axis, sel.indices)


def test_apply_and_restore_round_trip_bit_identical():
    engine = FakeEngine(tiny_llama(seed=2))
    store, _, _ = two_task_run(engine)
    current = state(engine)
    previous = apply_mixture(engine, store, torch.tensor([0.3, 0.7], dtype=torch.float64))
    assert engine.edits >= len(store.base)  # one parameter per edit
    changed = state(engine)
    assert any(not torch.equal(changed[k], current[k]) for k in current)
    restore(engine, store, previous)
    assert_same_state(state(engine), current)
    with pytest.raises(RuntimeError, match="boom"), mixed(engine, store, torch.tensor([1.0, 0.0])):
        raise RuntimeError("boom")
    assert_same_state(state(engine), current)


def test_one_hot_weights_give_that_tasks_trained_neurons():
    engine = FakeEngine(tiny_llama(seed=2))
    store, theta0, (s1, s2) = two_task_run(engine)
    current = state(engine)
    for k, nset in enumerate((s1, s2)):
        weights = torch.zeros(2, dtype=torch.float64)
        weights[k] = 1.0
        other = (s2, s1)[k].difference(nset)
        with mixed(engine, store, weights):
            now = state(engine)
            for fqn in nset.entries:
                assert torch.equal(elements(nset, fqn, now[fqn]), store.values[k][fqn]), fqn
            for fqn in other.entries:  # owned only by the other task: back to the base
                assert torch.equal(elements(other, fqn, now[fqn]),
                                   elements(other, fqn, theta0[fqn])), fqn
            unowned = [f for f in current if f not in store.base]
            assert unowned and all(torch.equal(now[f], current[f]) for f in unowned)
    # After task 2, task 2's values ARE the current model: one-hot on it changes only
    # task-1-only elements (back to theta_0).
    assert torch.equal(store.values[1]["model.embed_tokens.weight"],
                       current["model.embed_tokens.weight"][[4, 9]])


def test_overlap_gets_weighted_sum_of_deltas_without_renormalising():
    engine = FakeEngine(tiny_llama(seed=2))
    store, theta0, (s1, s2) = two_task_run(engine)
    w1, w2 = 0.25, 0.75
    fqn = "model.layers.0.mlp.down_proj.weight"  # units are columns (axis 1)
    t0 = theta0[fqn].double()
    after1 = store.values[0][fqn].double()  # columns 0 3 5 8 after task 1
    after2 = store.values[1][fqn].double()  # columns 1 5 36 after task 2
    with mixed(engine, store, torch.tensor([w1, w2], dtype=torch.float64)):
        now = engine.module.state_dict()[fqn].double()
    shared = t0[:, 5] + w1 * (after1[:, 2] - t0[:, 5]) + w2 * (after2[:, 1] - t0[:, 5])
    torch.testing.assert_close(now[:, 5], shared, rtol=0, atol=1e-6)
    only1 = t0[:, 3] + w1 * (after1[:, 1] - t0[:, 3])  # not renormalised to weight 1
    torch.testing.assert_close(now[:, 3], only1, rtol=0, atol=1e-6)
    assert not torch.allclose(now[:, 3], after1[:, 1])
    torch.testing.assert_close(now[:, 2], t0[:, 2], rtol=0, atol=0)  # unowned column


def test_capture_validates_and_store_round_trips(tmp_path):
    engine = FakeEngine(tiny_llama(seed=2))
    store, _, (s1, _) = two_task_run(engine)
    with pytest.raises(ValueError, match="already captured"):
        store.capture("t1", s1, {}, {}, torch.zeros(24))
    with pytest.raises(ValueError, match="before lacks"):
        store.capture("t3", s1, {}, {}, torch.zeros(24))
    fqn = "model.layers.0.mlp.down_proj.weight"
    rows = NeuronSet({fqn: Selection(0, torch.tensor([0]))})
    snap = snapshot(engine, rows)
    with pytest.raises(ValueError, match="axis 0 here, 1 before"):
        store.capture("t3", rows, snap, snap, torch.zeros(24))
    store.save(tmp_path / "store")
    loaded = TaskStore.load(tmp_path / "store")
    assert loaded.names == ["t1", "t2"] and loaded.nsets == store.nsets
    w = torch.tensor([0.4, 0.6], dtype=torch.float64)
    for name in store.base:
        assert torch.equal(loaded.mixture(name, w), store.mixture(name, w))
    assert torch.equal(loaded.weights(torch.ones(24), 1.0), store.weights(torch.ones(24), 1.0))


def test_real_single_engine_round_trip():
    from launcher.dist import DistInfo
    from launcher.engines import OptimConfig, build_engine

    info = DistInfo(rank=0, world_size=1, local_rank=0, backend="gloo", device=torch.device("cpu"))
    engine = build_engine("single", tiny_llama(seed=4), OptimConfig(), info)
    store, _, (_, s2) = two_task_run(engine)
    current = state(engine)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        before = engine.forward({"input_ids": ids}).logits
        with mixed(engine, store, torch.tensor([1.0, 0.0], dtype=torch.float64)):
            during = engine.forward({"input_ids": ids}).logits
        after = engine.forward({"input_ids": ids}).logits
    assert not torch.equal(before, during)
    assert torch.equal(before, after)
    assert_same_state(state(engine), current)
