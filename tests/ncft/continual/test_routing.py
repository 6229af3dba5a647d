import pytest
import torch

from ncft.continual import routing
from ncft.continual.wncft import TaskStore, mixed, prompt_batches, task_vector
from tests.ncft.continual.test_wncft import PROMPTS, WORDS, neuron_sets, state, two_task_run
from tests.support.fake_engine import FakeEngine
from tests.support.tiny import tiny_llama, word_tokenizer


class Ex:
    def __init__(self, prompt, answer="a"):
        self.prompt, self.answer = prompt, answer


def test_groups_by_hand():
    w = torch.tensor([[1.0, 0.0], [0.2, 0.8], [1.0, 0.0]], dtype=torch.float64)
    got = {tuple(k.tolist()): v for k, v in routing.groups(w)}
    assert got == {(1.0, 0.0): [0, 2], (0.2, 0.8): [1]}


def _probe(engine, fqn):
    return engine.module.state_dict()[fqn].double().sum().item()


def test_each_example_is_evaluated_under_its_own_mixture():
    engine = FakeEngine(tiny_llama(seed=2))
    store, _, _ = two_task_run(engine)
    fqn = next(iter(store.base))
    before = state(engine)
    seen = {}
    for k in range(2):  # what the probe reads under each one-hot mixture
        with mixed(engine, store, torch.eye(2, dtype=torch.float64)[k]):
            seen[k] = _probe(engine, fqn)
    assert seen[0] != seen[1]

    def evaluate(subset):  # "correct" iff the model holds task 0's mixture
        return {"accuracy": float(_probe(engine, fqn) == seen[0])}

    weights = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    result = routing.evaluate_routed(engine, store, [Ex("x")] * 3, weights, evaluate)
    assert result["accuracy"] == pytest.approx(2 / 3) == result["score"]
    assert result["top_task_share"] == pytest.approx([2 / 3, 1 / 3])
    assert result["mixing_weights"] == pytest.approx([2 / 3, 1 / 3])
    after = state(engine)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_identical_inputs_route_like_the_task_query():
    tok = word_tokenizer(WORDS)
    engine = FakeEngine(tiny_llama(seed=2))
    store, _, _ = two_task_run(engine)
    # Task vectors that the prompt is close to, so the weights are far from uniform.
    store.vectors = [task_vector(engine, prompt_batches(tok, PROMPTS[:2], 2, 64, 0, 1)),
                     task_vector(engine, prompt_batches(tok, PROMPTS[3:], 2, 64, 0, 1))]
    prompts = [PROMPTS[0]] * 4
    query = task_vector(engine, prompt_batches(tok, prompts, 2, 64, 0, 1))
    task_w = store.weights(query, 0.05)
    example_w = routing.example_weights(engine, tok, store, prompts, 3, 64, 0.05)
    assert example_w.shape == (4, 2) and abs(float(task_w[0] - task_w[1])) > 0.1
    torch.testing.assert_close(example_w, task_w.expand(4, 2), rtol=0, atol=1e-6)

    def evaluate(subset):
        return {"accuracy": _probe(engine, "model.layers.0.mlp.down_proj.weight")}

    with mixed(engine, store, task_w):
        expected = evaluate(None)["accuracy"]
    got = routing.evaluate_routed(engine, store, [Ex(p) for p in prompts], example_w, evaluate)
    assert got["score"] == pytest.approx(expected, rel=1e-6)


def test_truncated_store_drops_later_tasks_and_recaptures_equal():
    engine = FakeEngine(tiny_llama(seed=2))
    store, _, (s1, s2) = two_task_run(engine)
    first = store.truncated(1)
    assert first.names == ["t1"] and store.truncated(2) is store
    for fqn, base in first.base.items():
        assert torch.equal(base.indices, s1.entries[fqn].indices)
        full = store.base[fqn]
        pos = torch.searchsorted(full.indices, base.indices)
        assert torch.equal(base.values, full.values.index_select(full.axis, pos))
    assert "model.embed_tokens.weight" not in first.base  # only task 2 selected it
    # Re-capturing task 2 on the truncated store gives the original store back.
    again = TaskStore()
    again.__dict__.update({k: (list(v) if isinstance(v, list) else dict(v))
                           for k, v in first.__dict__.items()})
    assert neuron_sets(engine.module)[1] == s2
    w = torch.tensor([0.3, 0.7], dtype=torch.float64)
    again.names.append("t2")
    again.nsets.append(s2)
    again.vectors.append(store.vectors[1])
    again.values.append(store.values[1])
    for fqn, b in store.base.items():  # theta_0 of task 2's new elements: from the store
        if fqn not in again.base or len(again.base[fqn].indices) != len(b.indices):
            again._extend_base(fqn, b.axis, b.indices, b.values)
    for fqn in store.base:
        assert torch.equal(again.mixture(fqn, w), store.mixture(fqn, w)), fqn


def test_example_weights_same_on_every_rank_with_equal_forwards():
    from tests.support.fake_engine import ThreadWorld

    tok = word_tokenizer(WORDS)
    model = tiny_llama(seed=2)
    store = TaskStore()
    store.vectors = [torch.randn(24, generator=torch.Generator().manual_seed(k))
                     for k in range(2)]
    store.names = ["t1", "t2"]
    want = routing.example_weights(FakeEngine(model), tok, store, PROMPTS, 2, 64, 0.5)
    # Row n is the n-th prompt's own vector (no cross-talk through padding or batching).
    one = routing.example_weights(FakeEngine(model), tok, store, PROMPTS[2:3], 1, 64, 0.5)
    torch.testing.assert_close(want[2], one[0], rtol=0, atol=1e-6)
    world = ThreadWorld(3)
    got = world.run(model, lambda e: routing.example_weights(e, tok, store, PROMPTS, 2, 64, 0.5))
    for g in got:
        torch.testing.assert_close(g, want, rtol=0, atol=0)
    assert len({e.forwards for e in world.engines}) == 1


def test_generation_scores_all_hypotheses_together():
    from ncft.evaluate import text_scores
    from ncft.generation import generate_greedy

    tok = word_tokenizer(WORDS)
    engine = FakeEngine(tiny_llama(seed=2))
    store, _, _ = two_task_run(engine)
    weights = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    examples = [Ex(p, "the cat sat") for p in PROMPTS[:3]]
    texts = []
    for n, ex in enumerate(examples):  # by hand: each prompt under its own mixture
        with mixed(engine, store, weights[n]):
            texts += generate_greedy(engine, tok, [ex.prompt], 3, 1, 63)
    want = text_scores(texts, [ex.answer for ex in examples], ["rougeL", "bleu"])
    gen = {"tokenizer": tok, "metrics": ("rougeL", "bleu"), "max_new_tokens": 3,
           "batch_size": 2, "max_prompt_length": 63}
    got = routing.evaluate_routed(engine, store, examples, weights, None, gen)
    assert got["rougeL"] == pytest.approx(want["rougeL"]) and got["score"] == got["rougeL"]
    assert got["bleu"] == pytest.approx(want["bleu"])
