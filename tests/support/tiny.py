"""Tiny random models and tokenizers for tests, built from configs (no downloads).

Shapes are chosen awkward on purpose: d_ff = 37 (prime) and hidden = 24, so rows do
not divide by 2 or 3 ranks, and flat ZeRO-3 partitions cut rows in the middle.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as T
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 96

# One tiny config per architecture family the adapters support (tests/ncft/test_arch.py
# runs each; others pick a family). Bloom's MLP width is fixed at 4 * hidden.
ARCH_HIDDEN, ARCH_D_FF, ARCH_LAYERS, ARCH_VOCAB = 16, 40, 2, 64
_COMMON = dict(hidden_size=ARCH_HIDDEN, intermediate_size=ARCH_D_FF,
               num_hidden_layers=ARCH_LAYERS, num_attention_heads=2, num_key_value_heads=1,
               vocab_size=ARCH_VOCAB)
ARCH_CONFIGS = {
    "llama": lambda: T.LlamaConfig(**_COMMON),
    "llama_mlp_bias": lambda: T.LlamaConfig(**_COMMON, mlp_bias=True),
    "mistral": lambda: T.MistralConfig(**_COMMON, head_dim=8),
    "qwen2": lambda: T.Qwen2Config(**_COMMON),
    "gemma": lambda: T.GemmaConfig(**_COMMON, head_dim=8),
    "gemma2": lambda: T.Gemma2Config(**_COMMON, head_dim=8),
    "gemma3_text": lambda: T.Gemma3TextConfig(**_COMMON, head_dim=8),
    "bloom": lambda: T.BloomConfig(hidden_size=ARCH_HIDDEN, n_layer=ARCH_LAYERS, n_head=2,
                                   vocab_size=ARCH_VOCAB),
    "gpt_neox": lambda: T.GPTNeoXConfig(hidden_size=ARCH_HIDDEN, intermediate_size=ARCH_D_FF,
                                        num_hidden_layers=ARCH_LAYERS, num_attention_heads=2,
                                        vocab_size=ARCH_VOCAB),
    "gpt2": lambda: T.GPT2Config(n_embd=ARCH_HIDDEN, n_inner=ARCH_D_FF, n_layer=ARCH_LAYERS,
                                 n_head=2, vocab_size=ARCH_VOCAB, n_positions=32,
                                 bos_token_id=0, eos_token_id=0),
}


def tiny_llama(seed: int = 0, mlp_bias: bool = True, layers: int = 2) -> LlamaForCausalLM:
    """A 2-layer Llama with biased MLPs (biases exercise 1-D masks), fp32, eval dropout."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=24, intermediate_size=37, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, mlp_bias=mlp_bias, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A real (tokenizers-backed) word-level tokenizer over `words`, vocab <= VOCAB."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(words)))}
    assert len(vocab) <= VOCAB, len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>",
    )


SAMPLE_TEXT = " ".join(
    f"the {a} {b} jumps over {c} dogs and cats"
    for a in ("quick", "slow", "red", "blue", "old")
    for b in ("fox", "hen", "cow")
    for c in ("lazy", "happy", "sad", "tall")
)


def save_tiny_model_dir(path: Path, seed: int = 0) -> Path:
    """Write a tiny Llama + word tokenizer as a HF directory; return it."""
    model = tiny_llama(seed)
    model.save_pretrained(path)
    word_tokenizer(SAMPLE_TEXT.split()).save_pretrained(path)
    return path


def bos_word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """`word_tokenizer(words)` that prepends <s> like Llama tokenizers do."""
    from tokenizers import processors

    tok = word_tokenizer(words)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    return tok
