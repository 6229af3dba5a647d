import math

import pytest
import sacrebleu
import torch
from torch import nn
from transformers import DynamicCache

from launcher.dist import DistInfo
from launcher.engines import OptimConfig, build_engine
from ncft.data.examples import Example
from ncft.engine import share
from ncft.evaluate import (
    evaluate_task,
    label_prior,
    label_scores,
    rank_records,
    task_score,
    text_scores,
)
from tests.support.fake_engine import FakeEngine, ThreadWorld
from tests.support.review_lm import (
    LABELS,
    MIXED,
    PROMPTS,
    SHARED,
    per_pair_scores,
    sharp_model,
)

CPU = DistInfo(rank=0, world_size=1, local_rank=0, backend="gloo", device=torch.device("cpu"))


def rank_accuracy(engine, tok, examples, labels, batch_size, max_length) -> float:
    """Rank-mode accuracy as `evaluate_task` computes it."""
    scores_NK = label_scores(engine, tok, examples, labels, batch_size, max_length)
    return rank_records(scores_NK, examples, labels)["accuracy"]


def reference_label_logprobs(model, tok, prompt: str) -> list[float]:
    """Unbatched, unpadded: sum of log p(label tokens + eos | prompt), one label at a time."""
    out = []
    for label in LABELS:
        prompt_ids = tok(prompt)["input_ids"]
        answer = tok(" " + label, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([prompt_ids + answer])
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
        out.append(sum(float(logp[len(prompt_ids) - 1 + k, t]) for k, t in enumerate(answer)))
    return out


@pytest.mark.parametrize("max_length", [64, 9])  # 9: prompts cut, differently per label
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_shared_prefix_scores_equal_per_label_scores(tok, max_length, batch_size):
    model = sharp_model()
    examples = [Example(p, SHARED[i % 4]) for i, p in enumerate(MIXED)]
    want = per_pair_scores(model, tok, examples, SHARED, max_length)
    got = label_scores(FakeEngine(model), tok, examples, SHARED, batch_size, max_length)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()
    assert (want.max(1).values - want.min(1).values).min() > 0.1  # the labels differ


def test_shared_prefix_scores_on_the_single_engine(tok):
    examples = [Example(p, SHARED[i % 4]) for i, p in enumerate(MIXED)]
    want = per_pair_scores(sharp_model(), tok, examples, SHARED, 64)
    engine = build_engine("single", sharp_model(), OptimConfig(), CPU)
    got = label_scores(engine, tok, examples, SHARED, 4, 64)
    assert torch.allclose(got, want, atol=1e-4, rtol=0)


def test_share_splits_contiguously_and_evenly():
    parts = [share(5, r, 3) for r in range(3)]
    assert [list(p) for p in parts] == [[0], [1, 2], [3, 4]]
    assert [len(share(2, r, 4)) for r in range(4)] == [0, 1, 0, 1]


def test_accuracy_matches_unbatched_reference(model, tok):
    scores = [reference_label_logprobs(model, tok, p) for p in PROMPTS]
    best = [LABELS[max(range(3), key=lambda k, s=s: s[k])] for s in scores]
    worst = [LABELS[min(range(3), key=lambda k, s=s: s[k])] for s in scores]
    engine = FakeEngine(model)

    def acc(answers, batch_size=4):
        examples = [Example(p, a) for p, a in zip(PROMPTS, answers)]
        return rank_accuracy(engine, tok, examples, LABELS, batch_size, 64)

    assert acc(best) == 1.0
    assert acc(worst) == 0.0
    assert acc(best[:2] + worst[2:], batch_size=1) == pytest.approx(2 / 5)
    assert acc(best[:3] + worst[3:], batch_size=15) == pytest.approx(3 / 5)


class ConstantLM(nn.Module):
    """Every token equally likely: every label of the same length ties."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, use_cache=None, **cache):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 96) + self.w,
                                "past_key_values": DynamicCache()})()


def test_ties_go_to_the_first_label(tok):
    examples = [Example(p, LABELS[i % 3]) for i, p in enumerate(PROMPTS)]  # good bad fine good bad
    acc = rank_accuracy(FakeEngine(ConstantLM()), tok, examples, LABELS, 4, 64)
    assert acc == pytest.approx(2 / 5)


@pytest.mark.parametrize("world_size", [2, 4, 7])  # shares 2-3; 1-2; 0-1
def test_accuracy_same_on_every_world_size_with_equal_forward_counts(model, tok, world_size):
    examples = [Example(p, LABELS[i % 3]) for i, p in enumerate(PROMPTS)]
    expected = rank_accuracy(FakeEngine(model), tok, examples, LABELS, 2, 64)
    world = ThreadWorld(world_size)
    results = world.run(model, lambda e: rank_accuracy(e, tok, examples, LABELS, 2, 64))
    assert results == [pytest.approx(expected, abs=1e-12)] * world_size
    counts = {e.forwards for e in world.engines}
    largest_share = math.ceil(5 / world_size)
    # Two forwards (prompts, then every label at once) per group of 2 examples.
    assert counts == {2 * math.ceil(largest_share / 2)}


def test_accuracy_rejects_unknown_gold_label(model, tok):
    with pytest.raises(ValueError, match=r"examples\[1\].answer 'great'"):
        rank_accuracy(FakeEngine(model), tok, [Example(PROMPTS[0], "good"),
                                Example(PROMPTS[1], "great")], LABELS, 2, 64)
    with pytest.raises(ValueError, match="distinct"):
        rank_accuracy(
            FakeEngine(model), tok, [Example(PROMPTS[0], "good")], ["good", "good"], 2, 64
        )

def test_text_scores_in_unit_interval():
    refs = ["the cat sat down on the mat", "a dog ran"]
    assert text_scores(refs, refs, ["bleu", "rougeL"]) == {"bleu": 1.0, "rougeL": 1.0}
    assert text_scores(["x y z w v"], ["a b c d e"], ["bleu", "rougeL"]) == {
        "bleu": 0.0,
        "rougeL": 0.0,
    }
    refs = ["the cat sat down on the mat", "a dog ran in the park"]
    hyps = ["the cat sat on the mat", "a dog ran in the park today"]
    scores = text_scores(hyps, refs, ["rougeL", "bleu"])
    assert list(scores) == ["rougeL", "bleu"]
    # Both pairs: LCS 6, lengths 6 and 7, so F1 = 2 * 6/7 / (1 + 6/7) = 12/13.
    assert scores["rougeL"] == pytest.approx(12 / 13)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score / 100)
    assert 0 < scores["bleu"] < 1
    with pytest.raises(ValueError, match="metrics"):
        text_scores(hyps, refs, ["meteor"])


def test_evaluate_task_score_is_accuracy_or_first_metric(model, tok):
    examples = [Example(p, LABELS[i % 3]) for i, p in enumerate(PROMPTS)]
    engine = FakeEngine(model)
    cls = evaluate_task(engine, tok, examples, format="classification", labels=LABELS)
    assert cls["score"] == cls["accuracy"]
    gen = evaluate_task(
        engine, tok, examples, format="generation", metrics=["rougeL", "bleu"], max_new_tokens=3
    )
    assert set(gen) == {"rougeL", "bleu", "score", "hypotheses"}
    assert gen["score"] == gen["rougeL"] and len(gen["hypotheses"]) == len(examples)
    assert gen["bleu"] == text_scores(gen["hypotheses"], [ex.answer for ex in examples],
                                      ["bleu"])["bleu"]
    assert task_score({"bleu": 0.2, "rougeL": 0.5}, ["bleu", "rougeL"]) == 0.2
    with pytest.raises(ValueError, match="format"):
        evaluate_task(engine, tok, examples, format="ranking")

def test_rank_records_give_predictions_and_margins_by_hand():
    examples = [Example("p", "good"), Example("q", "bad"), Example("r", "fine")]
    scores_NK = torch.tensor([[-1.0, -3.0, -2.0],    # good wins by 1.0: right
                              [-1.0, -1.5, -4.0],    # good beats gold bad by 0.5: wrong
                              [-2.0, -2.0, -2.0]], dtype=torch.float64)  # tie -> good
    out = rank_records(scores_NK, examples, LABELS)
    assert out["predictions"] == ["good", "good", "good"]
    assert out["correct"] == [1, 0, 0] and out["accuracy"] == pytest.approx(1 / 3)
    assert out["margins"] == [1.0, -0.5, 0.0]


@pytest.mark.parametrize("world_size", [2, 3])
def test_per_example_records_are_the_same_on_every_rank(model, tok, world_size):
    examples = [Example(p, LABELS[i % 3]) for i, p in enumerate(PROMPTS)]
    expected = evaluate_task(FakeEngine(model), tok, examples, format="classification",
                             labels=LABELS, batch_size=2)
    assert len(expected["predictions"]) == len(expected["margins"]) == len(examples)
    assert sum(expected["correct"]) / len(examples) == expected["accuracy"]
    world = ThreadWorld(world_size)
    results = world.run(model, lambda e: evaluate_task(
        e, tok, examples, format="classification", labels=LABELS, batch_size=2))
    for got in results:
        assert got["predictions"] == expected["predictions"]
        assert got["correct"] == expected["correct"]
        assert got["margins"] == pytest.approx(expected["margins"], abs=1e-6)
    gen = evaluate_task(FakeEngine(model), tok, examples, format="classification",
                        labels=LABELS, max_new_tokens=3, classification="generate")
    assert len(gen["predictions"]) == len(gen["correct"]) == len(examples)
    assert gen["accuracy"] == sum(gen["correct"]) / len(examples)


CONTENT_FREE_PROMPTS = ["review : . Answer :", "review : the . Answer :"]


def test_content_free_calibration_divides_by_the_prior(model, tok):
    examples = [Example(p, LABELS[i % 3]) for i, p in enumerate(PROMPTS)]
    engine = FakeEngine(model)
    got = evaluate_task(engine, tok, examples, format="classification", labels=LABELS,
                        batch_size=2, calibration_prompts=CONTENT_FREE_PROMPTS)
    # By hand: each content-free prompt's label probabilities normalised over the
    # labels, averaged, logged; subtracted from every example's label scores.
    cf = [Example(p, LABELS[0]) for p in CONTENT_FREE_PROMPTS]
    probs = label_scores(engine, tok, cf, LABELS, 2, 256).softmax(dim=1)
    prior = [math.log(sum(float(probs[i, k]) for i in range(2)) / 2) for k in range(3)]
    assert got["label_prior"] == pytest.approx(prior, abs=1e-6)
    assert label_prior(engine, tok, CONTENT_FREE_PROMPTS, LABELS, 2, 256).tolist() == \
        pytest.approx(prior, abs=1e-12)
    raw = label_scores(engine, tok, examples, LABELS, 2, 256)
    expected = rank_records(raw - torch.tensor(prior, dtype=torch.float64), examples, LABELS)
    assert got["predictions"] == expected["predictions"]
    assert got["margins"] == pytest.approx(expected["margins"], abs=1e-4)
    # The prior is not uniform, so the calibrated margins differ from the raw ones.
    uncalibrated = rank_records(raw, examples, LABELS)
    assert got["margins"] != pytest.approx(uncalibrated["margins"], abs=1e-3)
    world = ThreadWorld(2)  # a collective like label_scores: the same on every rank
    for other in world.run(model, lambda e: evaluate_task(
            e, tok, examples, format="classification", labels=LABELS, batch_size=2,
            calibration_prompts=CONTENT_FREE_PROMPTS)):
        assert other["predictions"] == got["predictions"]
        assert other["label_prior"] == pytest.approx(got["label_prior"], abs=1e-9)
    with pytest.raises(ValueError, match="eval.calibration needs eval.classification: rank"):
        evaluate_task(engine, tok, examples, format="classification", labels=LABELS,
                      classification="generate", calibration_prompts=CONTENT_FREE_PROMPTS)
