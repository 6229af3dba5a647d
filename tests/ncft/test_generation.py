import pytest
import torch
from torch import nn

from ncft.data.examples import Example
from ncft.data.prompt import prompt_ids
from ncft.evaluate import evaluate_task
from ncft.generation import generate_greedy, generated_records, normalize_answer
from tests.support.fake_engine import FakeEngine, ThreadWorld
from tests.support.review_lm import MIXED, PROMPTS, sharp_model
from tests.support.tiny import word_tokenizer


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

@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_kv_cache_generation_gives_the_same_tokens(tok, batch_size, monkeypatch):
    """Cached decoding = re-running the prefix, token for token, at mixed lengths."""
    import ncft.generation as gen

    model = sharp_model()

    ids = {}
    for use_cache in (True, False):
        seen = []
        decode = gen._greedy_batch_cached if use_cache else gen._greedy_batch

        def spy(*args, decode=decode, seen=seen, **kwargs):
            seen.append(decode(*args, **kwargs))
            return seen[-1]

        monkeypatch.setattr(gen, "_greedy_batch_cached" if use_cache else "_greedy_batch", spy)
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

    assert prompt_ids(BosTok(), "0 1 2 3 4", 3) == [1, 13, 14]
    assert prompt_ids(BosTok(), "0 1", 3) == [1, 10, 11]

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
    records = generated_records(engine, tok, examples, 3, 2)
    assert records["predictions"] == [normalize_answer(t) for t in texts]
    assert records["correct"] == [1, 0, 1] and records["accuracy"] == pytest.approx(2 / 3)
    labels = sorted(set(golds))
    result = evaluate_task(engine, tok, examples, format="classification", labels=labels,
                           max_new_tokens=3, classification="generate")
    assert result["accuracy"] == pytest.approx(2 / 3) == result["score"]
    with pytest.raises(ValueError, match="eval.classification"):
        evaluate_task(engine, tok, examples, format="classification", labels=labels,
                      classification="argmax")
