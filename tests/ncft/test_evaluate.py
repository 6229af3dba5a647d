import math

import pytest
import sacrebleu
import torch
from torch import nn

from ncft.data.examples import Example
from ncft.evaluate import (
    _prompt_ids,
    classification_accuracy,
    evaluate_task,
    generate_greedy,
    generated_accuracy,
    normalize_answer,
    rank_records,
    share,
    task_score,
    text_scores,
)
from tests.support.fake_engine import FakeEngine, ThreadWorld
from tests.support.tiny import tiny_llama, word_tokenizer

WORDS = "review : the film was great bad fine dull movie plot acting good poor . Answer".split()
LABELS = ["good", "bad", "fine"]
PROMPTS = [
    "review : the film was great . Answer :",
    "review : the plot was dull . Answer :",
    "review : the acting was poor . Answer :",
    "review : the movie was fine . Answer :",
    "review : great film great plot . Answer :",
]


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(WORDS)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=3).eval()


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
        return classification_accuracy(engine, tok, examples, LABELS, batch_size, 64)

    assert acc(best) == 1.0
    assert acc(worst) == 0.0
    assert acc(best[:2] + worst[2:], batch_size=1) == pytest.approx(2 / 5)
    assert acc(best[:3] + worst[3:], batch_size=15) == pytest.approx(3 / 5)


class ConstantLM(nn.Module):
    """Every token equally likely: every label of the same length ties."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 96) + self.w})()


def test_ties_go_to_the_first_label(tok):
    examples = [Example(p, LABELS[i % 3]) for i, p in enumerate(PROMPTS)]  # good bad fine good bad
    acc = classification_accuracy(FakeEngine(ConstantLM()), tok, examples, LABELS, 4, 64)
    assert acc == pytest.approx(2 / 5)


@pytest.mark.parametrize("world_size", [2, 4, 7])  # shares 2-3; 1-2; 0-1
def test_accuracy_same_on_every_world_size_with_equal_forward_counts(model, tok, world_size):
    examples = [Example(p, LABELS[i % 3]) for i, p in enumerate(PROMPTS)]
    expected = classification_accuracy(FakeEngine(model), tok, examples, LABELS, 2, 64)
    world = ThreadWorld(world_size)
    results = world.run(model, lambda e: classification_accuracy(e, tok, examples, LABELS, 2, 64))
    assert results == [pytest.approx(expected, abs=1e-12)] * world_size
    counts = {e.forwards for e in world.engines}
    largest_share = math.ceil(5 / world_size)
    assert counts == {math.ceil(largest_share * len(LABELS) / 2)}


def test_accuracy_rejects_unknown_gold_label(model, tok):
    with pytest.raises(ValueError, match=r"examples\[1\].answer 'great'"):
        classification_accuracy(FakeEngine(model), tok, [Example(PROMPTS[0], "good"),
                                Example(PROMPTS[1], "great")], LABELS, 2, 64)
    with pytest.raises(ValueError, match="distinct"):
        classification_accuracy(
            FakeEngine(model), tok, [Example(PROMPTS[0], "good")], ["good", "good"], 2, 64
        )


def hf_greedy(model, tok, prompt, max_new_tokens):
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=0,
            eos_token_id=2,
        )
    new = [t for t in out[0, ids.shape[1] :].tolist() if t != 2]
    return tok.decode(new, skip_special_tokens=True).strip()


def test_generate_matches_hf_generate(model, tok):
    expected = [hf_greedy(model, tok, p, 5) for p in PROMPTS[:3]]
    assert any(expected)  # the comparison is not between empty strings
    for batch_size in (1, 3):
        got = generate_greedy(FakeEngine(model), tok, PROMPTS[:3], 5, batch_size)
        assert got == expected


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_stops_everywhere_at_eos(use_cache):
    class EosLM(nn.Module):
        """Predicts token 5 after the prompt, EOS afterwards."""

        def forward(self, input_ids, attention_mask=None, use_cache=None, past_key_values=None,
                    position_ids=None):
            logits = torch.zeros(*input_ids.shape, 8)
            logits[..., 2] = 1.0
            if past_key_values is None:  # after the 1-token prompt: "b"; then EOS
                logits[:, :1, 5] = 2.0
            return type("Out", (), {"logits": logits, "past_key_values": "cache"})()

    tok = word_tokenizer(["a", "b"])
    engine = FakeEngine(EosLM())
    engine.module.register_parameter("p", nn.Parameter(torch.zeros(1)))
    texts = generate_greedy(engine, tok, ["a"], max_new_tokens=10, batch_size=1,
                            use_cache=use_cache)
    assert texts == ["b"]
    assert engine.forwards == 2  # one token, then EOS stops the batch long before 10


MIXED = ["review : great . Answer :", *PROMPTS,
         "review : the film was great but the plot was dull and the acting poor . Answer :"]


def sharp_model():
    """The tiny Llama with q/k scaled x30: sharp, position-dependent attention.

    At init scale attention is nearly uniform, so a wrong position id in the cached
    path (checked: dropping `position_ids`) changes no token; here it changes several.
    """
    model = tiny_llama(seed=3).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                param.mul_(30)
    return model


@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_kv_cache_generation_gives_the_same_tokens(tok, batch_size, monkeypatch):
    """Cached decoding = re-running the prefix, token for token, at mixed lengths."""
    import ncft.evaluate as ev

    model = sharp_model()

    ids = {}
    for use_cache in (True, False):
        seen = []
        decode = ev._greedy_batch_cached if use_cache else ev._greedy_batch

        def spy(*args, decode=decode, seen=seen, **kwargs):
            seen.append(decode(*args, **kwargs))
            return seen[-1]

        monkeypatch.setattr(ev, "_greedy_batch_cached" if use_cache else "_greedy_batch", spy)
        texts = generate_greedy(FakeEngine(model), tok, MIXED, 12, batch_size,
                                use_cache=use_cache)
        ids[use_cache] = (texts, torch.cat(seen))
    assert ids[True][0] == ids[False][0]
    assert torch.equal(ids[True][1], ids[False][1])
    assert int((ids[True][1] > 0).sum()) > len(MIXED) * 6, "too few tokens to compare"


def test_kv_cache_feeds_one_token_per_step(model, tok):
    """The cached path runs the prefix once, then single-token forwards."""
    widths = []
    engine = FakeEngine(model)
    forward = engine.forward
    engine.forward = lambda batch: (widths.append(batch["input_ids"].shape[1]), forward(batch))[1]
    generate_greedy(engine, tok, MIXED[:3], 6, 3)
    assert widths[0] > 1 and widths[1:] == [1] * (len(widths) - 1) and len(widths) > 2


@pytest.mark.parametrize("world_size", [3, 7])
def test_generate_same_on_every_world_size(model, tok, world_size):
    expected = generate_greedy(FakeEngine(model), tok, PROMPTS, 5, 1)
    world = ThreadWorld(world_size)  # batch 1: ranks with 1 prompt run a dummy batch
    results = world.run(model, lambda e: generate_greedy(e, tok, PROMPTS, 5, 1))
    assert results == [expected] * world_size
    assert len({e.forwards for e in world.engines}) == 1


def test_generate_cuts_long_prompts_from_the_left(model, tok):
    long_prompt = "review : " + "great " * 40 + ". Answer :"
    cut = generate_greedy(FakeEngine(model), tok, [long_prompt], 3, 1, max_prompt_length=8)
    tail = " ".join(long_prompt.split()[-8:])
    assert cut == generate_greedy(FakeEngine(model), tok, [tail], 3, 1)


def test_prompt_cut_keeps_bos():
    class BosTok:
        bos_token_id = 1

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [1] + [10 + int(w) for w in text.split()]}

    assert _prompt_ids(BosTok(), "0 1 2 3 4", 3) == [1, 13, 14]
    assert _prompt_ids(BosTok(), "0 1", 3) == [1, 10, 11]


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


def test_normalize_answer_as_o_lora():
    assert normalize_answer("  Positive. ") == "positive"
    assert normalize_answer("Not_Entailment!") == "notentailment"  # punctuation dropped
    assert normalize_answer("the\tGreat   Film") == "the great film"  # articles kept
    assert normalize_answer("negative") != normalize_answer("positive")


def test_generate_mode_is_exact_match_after_normalisation(model, tok):
    engine = FakeEngine(model)
    texts = generate_greedy(engine, tok, PROMPTS[:3], 3, 2)
    assert all(texts)
    # Gold 0: the generated text in upper case with punctuation; gold 1: something else;
    # gold 2: the generated text itself. By hand: 2 of 3 match.
    golds = [texts[0].upper() + " .", "xyz", texts[2]]
    examples = [Example(p, g) for p, g in zip(PROMPTS[:3], golds)]
    acc, got = generated_accuracy(engine, tok, examples, 3, 2)
    assert got == texts and acc == pytest.approx(2 / 3)
    labels = sorted(set(golds))
    result = evaluate_task(engine, tok, examples, format="classification", labels=labels,
                           max_new_tokens=3, classification="generate")
    assert result["accuracy"] == pytest.approx(2 / 3) == result["score"]
    with pytest.raises(ValueError, match="eval.classification"):
        evaluate_task(engine, tok, examples, format="classification", labels=labels,
                      classification="argmax")


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
