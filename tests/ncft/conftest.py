"""Fixtures shared by the evaluation and generation tests: the review vocabulary's
tokenizer and a tiny random Llama in eval mode (one of each per test module)."""

import pytest

from tests.support.review_lm import WORDS
from tests.support.tiny import tiny_llama, word_tokenizer


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(WORDS)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=3).eval()
