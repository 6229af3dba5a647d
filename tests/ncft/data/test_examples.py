"""Examples: answer-only labels, truncation inside the encoding, rank shares.

The prompt itself (parts, fitting, pickling) is tested in test_prompt.py.
"""

import json

import pytest
import torch

from ncft.data.examples import (
    IGNORE,
    Example,
    batches,
    classification_examples,
    collate,
    data_hash,
    encode,
    generation_examples,
    read_jsonl,
    required_length,
)
from ncft.data.prompt import render
from tests.support.tiny import bos_word_tokenizer, word_tokenizer

WORDS = "a b c d e f g h i j k l m n o p Answer: Good Bad Text: {x} , .".split()


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(WORDS)


@pytest.fixture(scope="module")
def bos_tok():
    return bos_word_tokenizer(WORDS)


def test_read_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "Good"}\n\n{"text": "b", "label": "Bad"}\n[1]\n')
    rows = [{"text": "a", "label": "Good"}, {"text": "b", "label": "Bad"}]
    assert read_jsonl(path, limit=2) == rows
    with pytest.raises(ValueError, match=":4: expected a JSON object"):
        read_jsonl(path)
    with pytest.raises(ValueError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_classification_and_generation_examples():
    rows = [{"text": "a b", "label": "Good"}, {"sentence": "c", "label": "Bad"}]
    exs = classification_examples(rows[:1], ["Good", "Bad"], "Option: {labels}\n{text}\nAnswer:")
    assert exs == [Example("Option: Good, Bad\na b\nAnswer:", "Good")]
    with pytest.raises(ValueError, match="no field 'text'"):
        classification_examples(rows, ["Good", "Bad"], "{text}")
    with pytest.raises(ValueError, match="not one of"):
        classification_examples([{"text": "x", "label": "Meh"}], ["Good", "Bad"], "{text}")
    gen = generation_examples([{"src": "a", "tgt": "b c"}], "{text} =", "src", "tgt")
    assert gen == [Example("a =", "b c")]


def test_encode_labels_only_on_answer(tok):
    (enc,) = encode([Example("Text: a b Answer:", "Good")], tok, max_length=32)
    ids = tok("Text: a b Answer:", add_special_tokens=False)["input_ids"]
    good, eos = tok.convert_tokens_to_ids("Good"), tok.eos_token_id
    assert enc["input_ids"].tolist() == ids + [good, eos]
    assert enc["labels"].tolist() == [IGNORE] * len(ids) + [good, eos]
    assert enc["attention_mask"].tolist() == [1] * (len(ids) + 2)
    (no_eos,) = encode([Example("Text: a b Answer:", "Good")], tok, 32, add_eos=False)
    assert no_eos["labels"].tolist()[-1] == good


def test_truncation_keeps_bos_and_answer(bos_tok):
    prompt = "a b c d e f g h Answer:"
    (enc,) = encode([Example(prompt, "Good Bad")], bos_tok, max_length=6, add_eos=False)
    toks = bos_tok.convert_ids_to_tokens(enc["input_ids"].tolist())
    assert toks == ["<s>", "g", "h", "Answer:", "Good", "Bad"]
    assert (enc["labels"] != IGNORE).sum() == 2
    # The answer is never cut: one that leaves no room for a prompt token is refused.
    with pytest.raises(ValueError, match="answer 'a b c d e f g' takes 7 tokens"):
        encode([Example(prompt, "a b c d e f g")], bos_tok, max_length=4, add_eos=False)


def test_prompt_keeps_its_fixed_parts_and_cuts_the_text_end(bos_tok):
    # A plain prompt of the same words would lose "Text:" and "a b" (the left end).
    prompt = render("Text: {x} , {text} . Answer:", "a b c d e f g h", x="{x}")
    assert prompt == "Text: {x} , a b c d e f g h . Answer:"
    (enc,) = encode([Example(prompt, "Good")], bos_tok, max_length=10, add_eos=False)
    toks = bos_tok.convert_ids_to_tokens(enc["input_ids"].tolist())
    assert toks == ["<s>", "Text:", "{x}", ",", "a", "b", "c", ".", "Answer:", "Good"]
    # The fixed parts (5 tokens + BOS) and the answer need 7 positions; 6 is refused.
    assert required_length([Example(prompt, "Good")], bos_tok, add_eos=False) == 7
    assert required_length([Example(prompt, "Good")], bos_tok, ["Good Bad", "Good"],
                           add_eos=False) == 8
    (least,) = encode([Example(prompt, "Good")], bos_tok, max_length=7, add_eos=False)
    assert bos_tok.convert_ids_to_tokens(least["input_ids"].tolist()) == [
        "<s>", "Text:", "{x}", ",", ".", "Answer:", "Good"]
    with pytest.raises(ValueError, match="fixed parts .* take 6 tokens"):
        encode([Example(prompt, "Good")], bos_tok, max_length=6, add_eos=False)


def test_collate_right_pads(tok):
    enc = encode([Example("a", "Good"), Example("a b c", "Bad")], tok, 16)
    batch = collate(enc, pad_id=0)
    assert batch["input_ids"].shape == (2, 5)
    assert batch["input_ids"][0, 3:].tolist() == [0, 0]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
    assert batch["labels"][0, 3:].tolist() == [IGNORE, IGNORE]


def _items(n):
    return [{"input_ids": torch.tensor([i]), "labels": torch.tensor([i]),
             "attention_mask": torch.tensor([1])} for i in range(n)]


def _ids(share):
    return [int(e["input_ids"]) if int(e["labels"]) != IGNORE else -1 for e in share]


def test_batches_contiguous_shares_and_last_batch_policies():
    items = _items(10)
    # global batch of 6 = 3 ranks x 2; rank r holds items [r*2, r*2+2) of each batch
    shares = [list(batches(items, 2, r, 3, last="drop")) for r in range(3)]
    assert [_ids(b) for b in shares[1]] == [[2, 3]]
    glob = [sum((_ids(shares[r][b]) for r in range(3)), []) for b in range(1)]
    assert glob == [[0, 1, 2, 3, 4, 5]]
    rep = [[_ids(b) for b in batches(items, 2, r, 3, last="repeat")] for r in range(3)]
    assert rep == [[[0, 1], [6, 7]], [[2, 3], [8, 9]], [[4, 5], [0, 1]]]
    pad = [[_ids(b) for b in batches(items, 2, r, 3, last="pad")] for r in range(3)]
    assert pad == [[[0, 1], [6, 7]], [[2, 3], [8, 9]], [[4, 5], [-1, -1]]]
    # the global order is the same on any world size
    one = [x for b in batches(items, 6, 0, 1, last="pad") for x in _ids(b)]
    three = [x for b in range(2) for r in range(3) for x in pad[r][b]]
    assert one == three
    with pytest.raises(ValueError, match="last must be"):
        next(batches(items, 2, 0, 1, last="cycle"))


def test_data_hash_is_deterministic(tok):
    exs = [Example("a b", "Good"), Example("c", "Bad")]
    h = data_hash(encode(exs, tok, 16))
    assert h == data_hash(encode(exs, tok, 16))
    assert h != data_hash(encode(exs[::-1], tok, 16))
    assert len(json.dumps(h)) == 66
