"""The review-sentiment toy shared by the evaluation and generation tests.

A word-level tokenizer over `WORDS`, five prompts, three labels, and a tiny Llama whose
attention is sharp enough for position mistakes to change generated tokens.
"""

from __future__ import annotations

import torch

from ncft.data.examples import Example, encode
from ncft.evaluate import _answer_logprobs
from tests.support.tiny import tiny_llama

WORDS = "review : the film was great bad fine dull movie plot acting good poor . Answer".split()
LABELS = ["good", "bad", "fine"]
PROMPTS = [
    "review : the film was great . Answer :",
    "review : the plot was dull . Answer :",
    "review : the acting was poor . Answer :",
    "review : the movie was fine . Answer :",
    "review : great film great plot . Answer :",
]
# Labels that share first tokens ("good" / "good film"), a label that is a whole prompt
# phrase, and lengths 1-3, so the label rows have different widths.
SHARED = ["good", "good film", "bad", "the plot was"]
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


def per_pair_scores(model, tok, examples, labels, max_length) -> torch.Tensor:
    """The per-label reference: every (prompt, label) sequence encoded as training
    encodes it and run on its own, unpadded, without a cache; float64 [N, K].

    Every label gets the prompt room the longest label leaves (`max_length` minus its
    tokens and EOS), as rank classification scores all labels on one prompt."""
    answer = [len(tok(" " + label, add_special_tokens=False)["input_ids"]) + 1
              for label in labels]
    out = torch.zeros(len(examples), len(labels), dtype=torch.float64)
    for i, ex in enumerate(examples):
        for k, label in enumerate(labels):
            limit = max_length - max(answer) + answer[k]
            enc = encode([Example(ex.prompt, label)], tok, limit)[0]
            with torch.no_grad():
                logits = model(input_ids=enc["input_ids"][None]).logits
            out[i, k] = _answer_logprobs(logits, enc["labels"][None])[0]
    return out
