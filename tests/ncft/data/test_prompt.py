"""Prompts: parts kept apart, only the input text cut, parts kept across pickling."""

import pickle

import pytest

from ncft.data.prompt import Prompt, fit_prompt, fixed_length, prompt_ids, render, token_ids
from tests.support.tiny import bos_word_tokenizer

WORDS = "a b c d e f g h Text: {x} , . Answer:".split()


@pytest.fixture(scope="module")
def bos_tok():
    return bos_word_tokenizer(WORDS)


def test_render_keeps_the_parts_apart():
    prompt = render("Text: {x} , {text} . Answer:", "a b c", x="{x}")
    assert prompt == "Text: {x} , a b c . Answer:" and isinstance(prompt, Prompt)
    assert (prompt.head, prompt.text, prompt.tail) == ("Text: {x} , ", "a b c", " . Answer:")
    assert prompt.with_text("d") == "Text: {x} , d . Answer:"
    with pytest.raises(ValueError, match="exactly once"):
        render("{text} {text}", "a")
    with pytest.raises(ValueError, match="exactly once"):
        render("no slot", "a")


def test_fit_prompt_cuts_the_text_end_only(bos_tok):
    prompt = render("Text: {x} , {text} . Answer:", "a b c d e f g h", x="{x}")
    assert fixed_length(bos_tok, prompt) == 6  # <s> Text: {x} , . Answer:
    fitted = fit_prompt(bos_tok, prompt, 9)
    assert (fitted.text_tokens, fitted.kept_tokens, fitted.truncated) == (8, 3, True)
    assert bos_tok.convert_ids_to_tokens(fitted.ids) == [
        "<s>", "Text:", "{x}", ",", "a", "b", "c", ".", "Answer:"]
    assert not fit_prompt(bos_tok, prompt, None).truncated
    assert prompt_ids(bos_tok, prompt, 9) == fitted.ids
    with pytest.raises(ValueError, match="fixed parts .* take 6 tokens"):
        fit_prompt(bos_tok, prompt, 5)


def test_plain_string_is_cut_from_the_left_keeping_bos(bos_tok):
    ids = fit_prompt(bos_tok, "a b c d e", 3).ids
    assert bos_tok.convert_ids_to_tokens(ids) == ["<s>", "d", "e"]
    assert token_ids(bos_tok, "a b", False) == token_ids(bos_tok, "a b", True)[1:]


def test_parts_survive_pickling():
    # Ranks and workers receive examples by pickle.
    prompt = render("Text: {text} . Answer:", "a b")
    again = pickle.loads(pickle.dumps(prompt))
    assert isinstance(again, Prompt) and again == prompt
    assert (again.head, again.text, again.tail) == ("Text: ", "a b", " . Answer:")
