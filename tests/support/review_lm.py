"""The review-sentiment toy shared by the evaluation and generation tests.

A word-level tokenizer over `WORDS`, five prompts, three labels, and a tiny Llama whose
attention is sharp enough for position mistakes to change generated tokens.
"""

from __future__ import annotations

import torch

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
